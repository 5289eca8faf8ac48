# salmae — the commands users run. `make help` lists them.
# The stage targets default to the data `make demo` generates; point DATA, STORE, … at yours.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The torch/torchvision pair that installs on the reference CPU machine; override on yours
# (e.g. `make setup TORCH_PIN=` to let pip pick from pyproject's ranges).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
SEEDS   ?= 1
DATA    ?= runs/demo/data/{00000..00003}.tar
STORE   ?= runs/saliency/store.zarr
RUN     ?= runs/pretrain/saliency
CLIP_MODEL ?= salmae-tiny
CLIP_PRETRAINED ?= runs/demo/clip/clip.pt
CAM     ?= gradcam
MASK    ?= saliency
MODEL   ?= tiny
EPOCHS  ?= 10
EVAL_DATA ?= runs/demo/data/imagefolder
PROTOCOL ?= knn
NPROC   ?= 1

.PHONY: help setup test test-all demo saliency pretrain eval bench clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup:  ## Create .venv and install salmae with its dev extras
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(BIN)/pip install -q $(TORCH_PIN))
	$(BIN)/pip install -q -e '.[dev]'

test:  ## Run the test suite (excludes tests marked slow)
	$(BIN)/pytest -m "not slow" -q

test-all:  ## Run every test, slow ones included
	$(BIN)/pytest -q

demo:  ## Whole pipeline on generated data with tiny models; prints the report path
	$(BIN)/salmae demo --out runs/demo --seeds $(SEEDS)

saliency:  ## Stage 1 on DATA into STORE (CLIP_MODEL, CLIP_PRETRAINED, CAM=gradcam|hirescam|..., NPROC)
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m pipeline.cli saliency --data '$(DATA)' --out $(STORE) \
	  --clip-model $(CLIP_MODEL) --clip-pretrained $(CLIP_PRETRAINED) --cam $(CAM)

pretrain:  ## Stage 2 on DATA with MASK from STORE into RUN (MODEL, EPOCHS, NPROC)
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m pipeline.cli pretrain --data '$(DATA)' --out $(RUN) \
	  --saliency $(STORE) --mask $(MASK) --model $(MODEL) --epochs $(EPOCHS) --resume latest

eval:  ## Stage 3 PROTOCOL (knn|linear|finetune) of RUN's checkpoint on EVAL_DATA
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m pipeline.cli eval $(PROTOCOL) \
	  --checkpoint $(RUN)/checkpoint-latest.pth --data $(EVAL_DATA) --out $(RUN)/eval-$(PROTOCOL)

bench:  ## Run the benchmarks and rewrite BENCHMARKS.md
	$(BIN)/salmae bench all --out BENCHMARKS.md

clean:  ## Remove generated data and runs (keeps .venv)
	rm -rf data runs

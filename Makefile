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
# `make study`: a preset (smoke | cpu | cpu-full), or a GPU recipe in STUDY_CONFIG (e.g. configs/cc3m-vitb.yaml)
PRESET  ?= cpu
STUDY_CONFIG ?=
STUDY_OUT ?= $(if $(STUDY_CONFIG),,runs/study/$(PRESET))
# gpu-check runs on a GPU box that has torch, timm, numpy and pyarrow but maybe no .venv: it imports
# salmae through IMPORT_DIR/salmae, a link to this folder (the import name without an install).
IMPORT_DIR ?= build/import
PYTHON  ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_CHECK_OUT ?= runs/gpu-check
GPU_CHECK_ARGS ?=
# Wheels for what such a box lacks, pinned to .venv's versions (pure-python wheels fit any Python).
WHEELS  ?= .whl
PYVER   ?= 3.12
WHEEL_PKGS ?= open_clip_torch ftfy wcwidth regex grad-cam ttach zarr numcodecs donfig google-crc32c \
              webdataset braceexpand click pyyaml tqdm
# grad-cam's own imports (only `--cam gradcam++` etc. load it; the fast path never does); add these where missing.
WHEEL_EXTRAS ?=

.PHONY: help setup test test-all demo study saliency pretrain eval bench gpu-check wheelhouse clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# Every target that runs salmae needs the installed environment: a fresh clone runs `make demo` or
# `make test` directly, and the first one creates .venv (again whenever pyproject.toml changes).
INSTALLED := $(VENV)/.installed

setup: $(INSTALLED)  ## Create .venv and install salmae with its dev extras (other targets do it on first use)

$(INSTALLED): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(BIN)/pip install -q $(TORCH_PIN))
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

test: $(INSTALLED)  ## Run the test suite (excludes tests marked slow)
	$(BIN)/pytest -m "not slow" -q

test-all: $(INSTALLED)  ## Run every test, slow ones included
	$(BIN)/pytest -q

demo: $(INSTALLED)  ## Whole pipeline on generated data with tiny models; prints the report path
	$(BIN)/salmae demo --out runs/demo --seeds $(SEEDS)

study: $(INSTALLED)  ## Settings x seeds, paired: PRESET=smoke|cpu|cpu-full or STUDY_CONFIG=configs/….yaml (NPROC) -> study.md
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m salmae study \
	  $(if $(STUDY_CONFIG),--config $(STUDY_CONFIG),--preset $(PRESET)) $(if $(STUDY_OUT),--out $(STUDY_OUT))

saliency: $(INSTALLED)  ## Stage 1 on DATA into STORE (CLIP_MODEL, CLIP_PRETRAINED, CAM=gradcam|hirescam|..., NPROC)
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m salmae saliency --data '$(DATA)' --out $(STORE) \
	  --clip-model $(CLIP_MODEL) --clip-pretrained $(CLIP_PRETRAINED) --cam $(CAM)

pretrain: $(INSTALLED)  ## Stage 2 on DATA with MASK from STORE into RUN (MODEL, EPOCHS, NPROC)
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m salmae pretrain --data '$(DATA)' --out $(RUN) \
	  --saliency $(STORE) --mask $(MASK) --model $(MODEL) --epochs $(EPOCHS) --resume latest

eval: $(INSTALLED)  ## Stage 3 PROTOCOL (knn|linear|finetune) of RUN's checkpoint on EVAL_DATA
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m salmae eval $(PROTOCOL) \
	  --checkpoint $(RUN)/checkpoint-latest.pth --data $(EVAL_DATA) --out $(RUN)/eval-$(PROTOCOL)

bench: $(INSTALLED)  ## Run the benchmarks and rewrite BENCHMARKS.md (and BENCHMARKS.json)
	$(BIN)/salmae bench all --out BENCHMARKS.md --json BENCHMARKS.json

gpu-check:  ## Preflight (versions, compiler, wheels' Python), then images/s of stages 1-3 into GPU_CHECK_OUT/gpu-check.json
	@mkdir -p $(IMPORT_DIR) && ln -sfn $(CURDIR) $(IMPORT_DIR)/salmae
	PYTHONPATH=$(abspath $(IMPORT_DIR))$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m salmae.pipeline.preflight --wheels $(WHEELS)
	@if [ -f $(WHEELS)/requirements.txt ]; then \
	  echo "installing $(WHEELS)/ into $(WHEELS)/site (offline, no dependencies)"; \
	  $(PYTHON) -m pip install -q --no-index --find-links $(WHEELS) --no-deps --upgrade --target $(WHEELS)/site \
	    -r $(WHEELS)/requirements.txt; fi
	PYTHONPATH=$(abspath $(IMPORT_DIR))$(if $(wildcard $(WHEELS)/requirements.txt),:$(abspath $(WHEELS)/site))$${PYTHONPATH:+:$$PYTHONPATH} \
	  $(PYTHON) -m salmae gpu-check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

wheelhouse: $(INSTALLED)  ## Wheels of WHEEL_PKGS (+ WHEEL_EXTRAS) at .venv's versions for Python PYVER into WHEELS/ (a GPU box)
	mkdir -p $(WHEELS)
	$(BIN)/python -m pip freeze --all | awk -F'==' -v want="$(WHEEL_PKGS) $(WHEEL_EXTRAS)" ' \
	  BEGIN { n = split(tolower(want), w, " "); for (i = 1; i <= n; i++) { gsub(/[-_.]+/, "-", w[i]); ok[w[i]] = 1 } } \
	  { k = tolower($$1); gsub(/[-_.]+/, "-", k); if (k in ok) { print $$0; found++ } } \
	  END { if (found != n) { print "wheelhouse: " n - found " of WHEEL_PKGS not installed in $(VENV)" > "/dev/stderr"; exit 1 } }' \
	  > $(WHEELS)/requirements.txt
	grep -iv '^grad[-_]cam==' $(WHEELS)/requirements.txt > $(WHEELS)/binary.txt
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version $(PYVER) --implementation cp \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	  -d $(WHEELS) -r $(WHEELS)/binary.txt
	# grad-cam publishes only an sdist for 1.5.x: build its (pure-python) wheel here
	$(BIN)/python -m pip wheel -q --no-deps -w $(WHEELS) $$(grep -i '^grad[-_]cam==' $(WHEELS)/requirements.txt)
	rm $(WHEELS)/binary.txt
	@ls $(WHEELS)/*.whl | wc -l | xargs echo "wheels:"; du -sh $(WHEELS)

clean:  ## Remove generated data and runs (keeps .venv)
	rm -rf data runs

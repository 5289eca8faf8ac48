"""The fast CAM path (Grad-CAM, HiResCAM) equals pytorch-grad-cam and a full-graph autograd reference."""

import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from salmae.pipeline.saliency.gradcam import (compile_around_layer, compute_cam, encode_captions, fast_gradcam, library_cam,
                              minmax_per_image, resolve_layer, tokens_to_grid, trim_caption_padding)
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.models.clip import load_clip

CAPTIONS = ["a red circle", "a blue square on the left", "a small green triangle", "a yellow star",
            "a large purple cross", "an orange hexagon"]
GRID14 = "salmae-test-grid14"   # 112 px, patch 8: the 14x14 grid of ViT-B-16 at 224 px, at micro width


def _setup(name: str, n: int = len(CAPTIONS)):
    torch.manual_seed(0)
    model, info, tokenizer, _ = load_clip(name, "none")
    images = torch.randn(n, 3, *info.input_size, generator=torch.Generator().manual_seed(1))
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    return model, info, images, encode_captions(model, tokenizer(captions))


@pytest.fixture(scope="module")
def micro():
    return _setup("salmae-micro")


@pytest.fixture(scope="module")
def grid14(tmp_path_factory):
    config = copy.deepcopy(open_clip.get_model_config("salmae-micro"))
    config["vision_cfg"]["image_size"] = 112
    path = tmp_path_factory.mktemp("clipcfg") / f"{GRID14}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return _setup(GRID14)


def _argmax(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(1).argmax(1)


def full_graph_cam(method: str, model, images, text_emb, layer, grid) -> torch.Tensor:
    """Reference: the graph starts at the input (nothing detached), the gradient is read at `layer`'s
    output, and the CAM formula is written out over tokens: [N, gh, gw]."""
    seen = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.setdefault("act", out))
    try:
        with torch.enable_grad():
            image_emb = model.encode_image(images.clone().requires_grad_(True))
            similarity = F.cosine_similarity(image_emb, text_emb.to(image_emb.dtype), dim=-1)   # [N]
            (grad,) = torch.autograd.grad(similarity.sum(), seen["act"])
    finally:
        handle.remove()
    act, grad = seen["act"][:, 1:].float(), grad[:, 1:].float()                              # [N, L, C], no class token
    if method == "gradcam":
        cam = torch.einsum("nc,nlc->nl", grad.mean(1), act)
    else:
        cam = torch.einsum("nlc,nlc->nl", grad, act)
    return F.relu(cam).reshape(len(images), *grid)


@pytest.mark.parametrize("case", ["micro-last", "micro-first", "grid14-last"])
@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_fast_path_equals_library_and_full_graph(request, case, method):
    model, info, images, text_emb = request.getfixturevalue(case.split("-")[0])
    module, _ = resolve_layer(model, "transformer.resblocks.0.ln_1" if case.endswith("first")
                              else "transformer.resblocks.-1.ln_1")
    fast = compute_cam(method)(model, images, text_emb, module, info.grid)           # raw [N, gh, gw]
    lib = library_cam(f"{method}-lib", model, images, text_emb, module, info.grid)  # min-max normalised, grid size
    assert fast.shape == lib.shape == (len(CAPTIONS), *info.grid)
    # Raw values (which the library's min-max hides): the same as a graph from the input.
    reference = full_graph_cam(method, model, images, text_emb, module, info.grid)
    assert torch.allclose(fast, reference, rtol=1e-4, atol=1e-6 * float(reference.detach().max()))
    assert (fast.flatten(1).amax(1) > 0).sum() == len(CAPTIONS)                    # no map is all zero
    assert fast.flatten(1).std(1).min() > 0.05 * fast.flatten(1).amax(1).min()     # nor flat
    assert torch.allclose(minmax_per_image(fast, eps=0.0), lib, atol=1e-5, rtol=0)   # measured 8e-7
    assert torch.equal(_argmax(fast), _argmax(lib))
    assert not any(p.requires_grad for p in model.parameters())   # the fast path left the model frozen


@pytest.mark.parametrize("case", ["micro", "grid14"])
@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_fast_path_equals_library_in_bf16(request, case, method):
    """Under bf16 autocast both paths run the same low-precision ops: maps match to 1e-5 after min-max
    (measured 3e-7 on both grids), with the same argmax."""
    model, info, images, text_emb = request.getfixturevalue(case)
    module, _ = resolve_layer(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = compute_cam(method)(model, images, text_emb, module, info.grid)
        lib = library_cam(f"{method}-lib", model, images, text_emb, module, info.grid)
    assert fast.dtype == torch.float32 and fast.shape == lib.shape == (len(CAPTIONS), *info.grid)
    assert torch.allclose(minmax_per_image(fast, eps=0.0), lib, atol=1e-5, rtol=0)
    assert torch.equal(_argmax(fast), _argmax(lib))


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_bf16_fast_path_is_close_to_fp32(method):
    """bf16 keeps 8 bits of mantissa: on 32 images the maps stay within 10% of each map's maximum
    (measured 2.5% Grad-CAM, 5.5% HiResCAM) and the top patch agrees on >= 90% of maps (measured
    100%); a map whose two best patches are within bf16's rounding may swap them."""
    model, info, images, text_emb = _setup("salmae-micro", n=32)
    module, _ = resolve_layer(model)
    fp32 = compute_cam(method)(model, images, text_emb, module, info.grid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = compute_cam(method)(model, images, text_emb, module, info.grid)
    scale = fp32.flatten(1).amax(1)                                                 # [N]
    assert ((bf16 - fp32).abs().flatten(1).amax(1) / scale).max() < 0.10
    assert (_argmax(bf16) == _argmax(fp32)).float().mean() >= 0.9
    assert not torch.equal(bf16, fp32)                                              # autocast did run in bf16


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_around_the_layer_equals_eager(micro, backend):
    """Compiling around the hooked layer keeps the hook (a compiled `model.visual` would drop it) and
    the maps: within 1e-5 of each map's maximum (measured 3e-7 relative with inductor)."""
    model, info, images, text_emb = micro
    compiled_model = copy.deepcopy(model)
    layer, _ = resolve_layer(compiled_model)
    names = compile_around_layer(compiled_model, layer, backend=backend)
    assert names == ["conv1", "ln_pre", "ln_post", "transformer.resblocks.0", "transformer.resblocks.1.attn",
                     "transformer.resblocks.1.ln_2", "transformer.resblocks.1.mlp"]
    assert compiled_model.state_dict().keys() == model.state_dict().keys()
    eager = fast_gradcam(model, images, text_emb, resolve_layer(model)[0], info.grid)
    for n in (len(images), 4):                                                      # a second batch size recompiles
        out = fast_gradcam(compiled_model, images[:n], text_emb[:n], layer, info.grid)
        scale = eager[:n].flatten(1).amax(1)[:, None, None]
        assert ((out - eager[:n]).abs() / scale).max() < 1e-5


def test_target_is_own_caption(micro):
    """Pairing image i with caption j != i changes the map: the target is per-sample."""
    model, info, images, text_emb = micro
    module, _ = resolve_layer(model)
    own = fast_gradcam(model, images, text_emb, module, info.grid)
    swapped = fast_gradcam(model, images, text_emb.roll(1, 0), module, info.grid)
    assert not torch.allclose(own, swapped)
    single = fast_gradcam(model, images[:1], text_emb[:1], module, info.grid)
    assert torch.allclose(single, own[:1], atol=1e-6)


@pytest.mark.parametrize("method", ["gradcam++", "layercam", "eigencam", "xgradcam"])
def test_library_methods_return_grid_maps(micro, method):
    model, info, images, text_emb = micro
    module, _ = resolve_layer(model)
    cam = library_cam(method, model, images[:2], text_emb[:2], module, info.grid)
    assert cam.shape == (2, *info.grid) and torch.isfinite(cam).all()


def test_tokens_to_grid_drops_class_token_row_major():
    tokens = torch.arange(1 + 6).float().view(1, 7, 1)        # class token 0, patches 1..6
    grid = tokens_to_grid(tokens, (2, 3))
    assert grid.shape == (1, 1, 2, 3) and grid[0, 0].tolist() == [[1, 2, 3], [4, 5, 6]]


def test_bad_layer_is_a_one_line_error(micro):
    with pytest.raises(SalmaeError, match="not found under model.visual"):
        resolve_layer(micro[0], "transformer.resblocks.9.ln_1")


def test_trimmed_caption_encoding_equals_full_context(micro):
    model = micro[0]
    tokenizer = open_clip.get_tokenizer("salmae-micro")
    tokens = tokenizer(["a red circle", "a photo of a small blue triangle on the left", ""])
    full = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    trimmed = trim_caption_padding(tokens)
    longest = int((tokens[1] != 0).sum())                                          # start, words, end of text
    assert trimmed.shape == (3, longest) and longest < tokens.shape[1]             # cut after the longest caption
    assert torch.equal(trimmed, tokens[:, :trimmed.shape[1]])
    assert torch.allclose(encode_captions(model, tokens), full, atol=1e-6)
    assert torch.allclose(encode_captions(model, trimmed), full, atol=1e-6)       # as stage 1's loader ships them

"""The fast CAM path (Grad-CAM, HiResCAM) equals pytorch-grad-cam on the same model and inputs."""

import open_clip
import pytest
import torch

from pipeline.gradcam import (compute_cam, encode_captions, fast_gradcam, library_cam, minmax_per_image, resolve_layer,
                              tokens_to_grid)
from pipeline.errors import SalmaeError
from pipeline.models.clip import load_clip

CAPTIONS = ["a red circle", "a blue square on the left", "a small green triangle", "a yellow star",
            "a large purple cross", "an orange hexagon"]


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model, info, tokenizer, _ = load_clip("salmae-micro", "none")
    images = torch.randn(len(CAPTIONS), 3, *info.input_size, generator=torch.Generator().manual_seed(1))
    return model, info, images, encode_captions(model, tokenizer(CAPTIONS))


@pytest.mark.parametrize("layer", ["transformer.resblocks.-1.ln_1", "transformer.resblocks.0.ln_1"])
@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_fast_path_equals_library(micro, layer, method):
    model, info, images, text_emb = micro
    module, _ = resolve_layer(model, layer)
    fast = compute_cam(method)(model, images, text_emb, module, info.grid)           # raw [N, gh, gw]
    lib = library_cam(f"{method}-lib", model, images, text_emb, module, info.grid)  # min-max normalised, grid size
    assert fast.shape == lib.shape == (len(CAPTIONS), *info.grid)
    assert (fast >= 0).all() and fast.amax() > 0
    assert torch.allclose(minmax_per_image(fast), lib, atol=1e-4, rtol=0)
    assert not any(p.requires_grad for p in model.parameters())   # the fast path left the model frozen


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
    assert (tokens != 0).sum(1).max() < tokens.shape[1]          # there is padding to cut
    assert torch.allclose(encode_captions(model, tokens), full, atol=1e-6)

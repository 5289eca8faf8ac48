"""Grad-CAM of CLIP's image–caption similarity over the ViT patch grid.

The target for sample i is the cosine similarity of image i's embedding to the embedding of
*its own* caption (text encoded without gradients). Two ways to compute the map:

- the fast path (`--cam gradcam`, the default, and `--cam hirescam`): the visual trunk runs with
  every parameter frozen, so no graph is recorded until the chosen layer; a forward hook there
  swaps the activation for a detached leaf that requires grad. Autograd therefore spans only the
  tail of the network, and `torch.autograd.grad` returns the gradient w.r.t. that one activation.
  Grad-CAM weights each channel by its token-averaged gradient; HiResCAM (Draelos & Carin, 2020)
  multiplies gradient and activation token by token, so a token only scores where the gradient
  reaches it (for a ViT: where the attention that follows the layer looks).
- `library_cam` (`--cam gradcam++|layercam|eigencam|xgradcam|...`): pytorch-grad-cam as the
  method zoo and as the reference for the fast path (see tests/test_gradcam.py).

The default layer is the input norm `ln_1` of the last visual block: the block *output* gets
zero gradient for the class-token pooled embedding (only the class token reaches the head
after the last block), while `ln_1` feeds the last attention, which mixes patch tokens into it.
`check_layer` refuses, before any map is computed, a layer whose output is not the token
sequence `[N, 1 + gh*gw, C]` (`ln_post`, `attn`) or whose patch tokens get no gradient.

ScoreCAM and AblationCAM are perturbation methods: they run the model again on a batch of
masked (or ablated) copies of *one* image. The target compares each output with one caption
per image, so they run one image at a time (`PERTURBATION_METHODS`), and AblationCAM ablates
a ViT's token channels with the library's `AblationLayerVit`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from salmae.pipeline.errors import SalmaeError

DEFAULT_LAYER = "transformer.resblocks.-1.ln_1"   # relative to model.visual

# --cam METHOD -> pytorch_grad_cam class name ("gradcam" and "hirescam" are the fast path;
# "gradcam-lib" and "hirescam-lib" are the library's own, kept as references and for benchmarks).
LIBRARY_METHODS = {
    "gradcam-lib": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "hirescam-lib": "HiResCAM",
    "gradcamelementwise": "GradCAMElementWise",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
}
CAM_METHODS = ("gradcam", "hirescam", *LIBRARY_METHODS)
PERTURBATION_METHODS = ("scorecam", "ablationcam")      # run one image at a time (see the module docstring)
GRADIENT_FREE_METHODS = ("eigencam", *PERTURBATION_METHODS)   # use activations only: no gradient check


@torch.no_grad()
def _probe_inputs(model: nn.Module, size: tuple[int, int], n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """n seeded random images [n, 3, H, W] and caption embeddings [n, D] (the global RNG is untouched)."""
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, *size, generator=gen).to(param.device)
    dim = model.encode_image(images[:1]).shape[-1]
    text = F.normalize(torch.randn(n, dim, generator=gen), dim=-1).to(param.device)
    return images, text


def check_layer(model: nn.Module, layer: nn.Module, layer_path: str, grid: tuple[int, int],
                input_size: tuple[int, int], method: str = "gradcam") -> None:
    """Refuse a CAM layer that cannot give a map: its output must be ViT tokens [N, 1 + gh*gw, C] and, for
    gradient methods, the own-caption similarity must reach its patch tokens (a non-zero gradient).

    Runs once on two seeded random images before stage 1 starts; raises SalmaeError naming the layer.
    """
    images, text = _probe_inputs(model, input_size)
    seen: dict[str, object] = {}

    def capture(_module, _inputs, output):
        seen["out"] = output
        if isinstance(output, torch.Tensor):
            leaf = output.detach().requires_grad_(True)
            seen["leaf"] = leaf
            return leaf
        return None

    use = f"use a block's input norm such as {DEFAULT_LAYER}"
    handle = layer.register_forward_hook(capture)
    try:
        with torch.enable_grad():
            image_emb = model.encode_image(images)
            target = F.cosine_similarity(image_emb, text.to(image_emb.dtype), dim=-1).sum()
            out = seen.get("out")
            expected = (len(images), 1 + grid[0] * grid[1])
            if not isinstance(out, torch.Tensor) or out.ndim != 3 or tuple(out.shape[:2]) != expected:
                got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise SalmaeError(f"CAM layer {layer_path!r} outputs {got}, not the ViT tokens "
                                  f"[N, 1 + {grid[0]}*{grid[1]}, C] a map is made of; {use}")
            if method in GRADIENT_FREE_METHODS:
                return
            (grad,) = torch.autograd.grad(target, seen["leaf"], allow_unused=True)
    finally:
        handle.remove()
    if grad is None or not bool(grad[:, 1:].abs().sum() > 0):
        raise SalmaeError(f"CAM layer {layer_path!r} gets zero gradient at every patch token (after the last "
                          f"block only the class token reaches the embedding), so every map would be 0; {use}")


def resolve_layer(model: nn.Module, layer: str = DEFAULT_LAYER) -> tuple[nn.Module, str]:
    """Find `layer` (dotted path under `model.visual`, negative indices allowed) -> (module, canonical path)."""
    module: nn.Module = model.visual
    parts = []
    for part in layer.split("."):
        try:
            if part.lstrip("-").isdigit():
                seq, index = module, int(part)
                module = seq[index]                       # IndexError for out-of-range indices
                index %= len(seq)
                parts.append(str(index))
            else:
                module = getattr(module, part)
                parts.append(part)
        except (AttributeError, IndexError, TypeError):
            raise SalmaeError(f"CAM layer {layer!r} not found under model.visual (failed at {part!r}); "
                              f"use a dotted path such as {DEFAULT_LAYER}") from None
    if not isinstance(module, nn.Module):
        raise SalmaeError(f"CAM layer {layer!r} is not a module; use a dotted path such as {DEFAULT_LAYER}")
    return module, ".".join(parts)


def trim_caption_padding(tokens: torch.Tensor) -> torch.Tensor:
    """tokens: [N, T] int -> [N, T'] with T' the longest caption's length (end-of-text included).

    Cheap on the host (the stage's loader workers call it), so the tokens that cross to the GPU
    are already short and the length never has to be read back from the device.
    """
    length = int((tokens != 0).sum(1).max()) if tokens.numel() else 0
    return tokens[:, :max(length, 1)]


@torch.no_grad()
def encode_captions(model: nn.Module, tokens: torch.Tensor, trimmed: bool = False) -> torch.Tensor:
    """tokens: [N, T'] int, T' <= context length -> text embeddings [N, D], L2-normalised, no graph.

    Captions are short (cc3m: ~10 tokens) but open_clip pads them to the context length (77).
    With a causal text mask and end-of-text pooling, the padding after the longest caption cannot
    change any embedding, so it is cut off first (`trim_caption_padding`): the text tower then
    costs a fraction as much. Towers where cutting is not exact get the padding back. Pass host
    tokens (pinned, already trimmed, as stage 1's loader ships them: `trimmed=True` skips the
    host-side length check): for device tokens, finding the longest caption waits for the GPU.
    """
    tokens = (tokens if trimmed else trim_caption_padding(tokens)).to(next(model.parameters()).device, non_blocking=True)
    return F.normalize(_encode_text_trimmed(model, tokens), dim=-1)


def _encode_text_trimmed(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `encode_text` over tokens [N, T'] without the padding beyond T'."""
    trimmable = (getattr(model, "text_pool_type", None) == "argmax" and getattr(model, "attn_mask", None) is not None
                 and getattr(model, "text_projection", None) is not None and hasattr(model, "positional_embedding"))
    length = tokens.shape[1]
    if not trimmable:
        return model.encode_text(F.pad(tokens, (0, model.context_length - length)))   # pad id is 0
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))  # [N, T', width]
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]               # end-of-text token
    proj = model.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """ViT tokens [N, 1 + gh*gw, C] (class token first) -> [N, C, gh, gw] over the patch tokens."""
    gh, gw = grid
    patches = tokens[:, 1:, :]                                   # drop the class token
    return patches.reshape(patches.shape[0], gh, gw, patches.shape[-1]).permute(0, 3, 1, 2)


def gradcam_from_tokens(act: torch.Tensor, grad: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM from a layer's tokens and their gradients.

    act, grad: [N, 1 + gh*gw, C] -> cam: [N, gh, gw] = ReLU(sum_c mean_tokens(grad_c) * act_c).
    """
    act_g, grad_g = tokens_to_grid(act, grid), tokens_to_grid(grad, grid)   # [N, C, gh, gw]
    weights = grad_g.mean(dim=(2, 3), keepdim=True)                         # [N, C, 1, 1]
    return F.relu((weights * act_g).sum(dim=1))


def hirescam_from_tokens(act: torch.Tensor, grad: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """HiResCAM from a layer's tokens and their gradients.

    act, grad: [N, 1 + gh*gw, C] -> cam: [N, gh, gw] = ReLU(sum_c grad_c * act_c), token by token.
    """
    return F.relu((tokens_to_grid(act, grid) * tokens_to_grid(grad, grid)).sum(dim=1))


def layer_activation_and_grad(model: nn.Module, images: torch.Tensor, text_emb: torch.Tensor,
                              layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer`'s output tokens and the gradient of the own-caption similarity w.r.t. them.

    images: [N, 3, H, W] normalised; text_emb: [N, D] (row i = image i's caption)
    -> (act, grad), both [N, 1 + gh*gw, C] float32. Autograd runs only from `layer` to the output;
    the model's parameters must not require grad (as `load_clip` leaves them).
    """
    captured: dict[str, torch.Tensor] = {}

    def start_graph_here(_module, _inputs, output):
        leaf = output.detach().requires_grad_(True)   # everything before this ran without a graph
        captured["act"] = leaf
        return leaf

    handle = layer.register_forward_hook(start_graph_here)
    try:
        with torch.enable_grad():
            image_emb = model.encode_image(images)                               # [N, D]
            target = F.cosine_similarity(image_emb, text_emb.to(image_emb.dtype), dim=-1)  # [N]
            (grad,) = torch.autograd.grad(target.sum(), captured["act"])
    finally:
        handle.remove()
    return captured["act"].detach().float(), grad.float()


def fast_gradcam(model: nn.Module, images: torch.Tensor, text_emb: torch.Tensor,
                 layer: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """Own-caption Grad-CAM with autograd only from `layer` to the output -> [N, gh, gw] raw CAM."""
    return gradcam_from_tokens(*layer_activation_and_grad(model, images, text_emb, layer), grid)


def fast_hirescam(model: nn.Module, images: torch.Tensor, text_emb: torch.Tensor,
                  layer: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """Own-caption HiResCAM with autograd only from `layer` to the output -> [N, gh, gw] raw CAM."""
    return hirescam_from_tokens(*layer_activation_and_grad(model, images, text_emb, layer), grid)


def compile_around_layer(model: nn.Module, layer: nn.Module, backend: str = "inductor") -> list[str]:
    """`torch.compile` every part of `model.visual` except `layer` and the modules that hold it.

    The fast path starts autograd in a forward hook on `layer`, registered per batch. Dynamo does
    not guard on hooks added after compilation, so a compiled `model.visual` runs without the hook
    (no activation is captured). Compiling the siblings along the path down to `layer` instead
    leaves the hook in eager code while the heavy parts compile: the blocks before the layer
    (forward only, no graph) and the modules after it in its block and beyond (forward and
    backward). The text tower stays eager: its trimmed length changes from batch to batch.
    Modules are compiled in place (`nn.Module.compile`), so state-dict keys do not change.
    Returns the dotted names (under `model.visual`) of the compiled modules.
    """
    path = _module_path(model.visual, layer)
    if path is None:
        raise SalmaeError("CAM layer is not part of model.visual; use a dotted path such as " + DEFAULT_LAYER)
    compiled: list[str] = []

    def compile_tree(module: nn.Module, name: str) -> None:
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):     # containers have no forward of their own
            for child_name, child in module.named_children():
                compile_tree(child, f"{name}.{child_name}")
        elif any(True for _ in module.parameters()):               # parameter-free modules gain nothing
            module.compile(backend=backend)
            compiled.append(name)

    prefix = ""
    for parent, on_path in zip(path, path[1:]):
        for child_name, child in parent.named_children():
            if child is not on_path:
                compile_tree(child, prefix + child_name)
        prefix += next(n for n, c in parent.named_children() if c is on_path) + "."
    return compiled


def _module_path(root: nn.Module, target: nn.Module) -> list[nn.Module] | None:
    """[root, ..., target] following children, or None if `target` is not under `root`."""
    if root is target:
        return [root]
    for child in root.children():
        found = _module_path(child, target)
        if found:
            return [root, *found]
    return None


def minmax_per_image(cam: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """[N, gh, gw] -> each map shifted to min 0 and divided by (max + eps).

    pytorch-grad-cam does this twice (per layer, then after averaging its layers), which leaves
    no trace of its eps = 1e-7; compare with its maps at `eps=0` (raw maxima of ~1e-4 make the
    eps a 1e-3 relative error).
    """
    flat = cam.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / (flat.max(dim=1, keepdim=True).values + eps)
    return flat.view_as(cam)


class OwnCaptionSimilarity(nn.Module):
    """images [N, 3, H, W] -> cosine similarity [N, 1] of image i to caption i (fixed text embeddings)."""

    def __init__(self, model: nn.Module, text_emb: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("text_emb", text_emb.detach())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image_emb = self.model.encode_image(images)
        return F.cosine_similarity(image_emb, self.text_emb.to(image_emb.dtype), dim=-1)[:, None]


class SimilarityTarget:
    """pytorch-grad-cam target: the (single) similarity output of one sample."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output.reshape(-1)[0]


def library_cam(method: str, model: nn.Module, images: torch.Tensor, text_emb: torch.Tensor,
                layer: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """pytorch-grad-cam `method` on the own-caption similarity -> [N, gh, gw] at grid resolution.

    The library min-max normalises every map (its output is in [0, 1]); asking it for the grid
    size as "target size" makes its resize an identity, so maps compare 1:1 with `fast_gradcam`.
    """
    import pytorch_grad_cam

    if method not in LIBRARY_METHODS:
        raise SalmaeError(f"unknown --cam {method!r}; choose one of {', '.join(CAM_METHODS)}")
    if method in PERTURBATION_METHODS and len(images) > 1:    # one caption per image: one image at a time
        return torch.cat([library_cam(method, model, images[i:i + 1], text_emb[i:i + 1], layer, grid)
                          for i in range(len(images))])
    base = getattr(pytorch_grad_cam, LIBRARY_METHODS[method])
    cam_cls = type(f"Grid{base.__name__}", (base,), {"get_target_width_height": lambda self, x: (grid[1], grid[0])})
    wrapper = OwnCaptionSimilarity(model, text_emb)
    images = images.detach().clone().requires_grad_(True)   # parameters are frozen: let the graph start at the input
    # float32 grids: the library hands activations and gradients to numpy, which has no bfloat16 (autocast)
    kwargs = {"ablation_layer": pytorch_grad_cam.ablation_layer.AblationLayerVit()} if method == "ablationcam" else {}
    cam = cam_cls(model=wrapper, target_layers=[layer], reshape_transform=lambda t: tokens_to_grid(t, grid).float(),
                  **kwargs)
    try:
        out = cam(input_tensor=images, targets=[SimilarityTarget() for _ in range(len(images))])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(images.device)


def compute_cam(method: str) -> Callable[..., torch.Tensor]:
    """The CAM function for `--cam method`, with `fast_gradcam`'s signature."""
    if method == "gradcam":
        return fast_gradcam
    if method == "hirescam":
        return fast_hirescam
    if method not in LIBRARY_METHODS:
        raise SalmaeError(f"unknown --cam {method!r}; choose one of {', '.join(CAM_METHODS)}")
    return lambda model, images, text_emb, layer, grid: library_cam(method, model, images, text_emb, layer, grid)


def cam_normalisation(method: str) -> str:
    """How the stored maps are scaled (recorded in the store's attrs)."""
    if method in ("gradcam", "hirescam"):
        return f"none: raw ReLU {method} of the cosine image-caption similarity (scale varies per image)"
    return "minmax per image to [0, 1] (pytorch-grad-cam)"

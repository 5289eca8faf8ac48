"""Stage 1's preprocessing: squash or letterbox exactly as open_clip's inference transform, the CLIP
weights' interpolation, and letterbox frames that keep stage 2's crop math exact."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.saliency.preprocess import clip_input, letterbox_frames, letterbox_geometry
from salmae.pipeline.saliency.store import SaliencyStore

SIZES = [(50, 30), (30, 50), (33, 33), (101, 7), (17, 100), (224, 225)]   # (W, H), odd pads included


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size_hw", [(32, 32), (24, 40)])
@pytest.mark.parametrize("resize, open_clip_mode", [("squash", "squash"), ("letterbox", "longest")])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_clip_input_equals_open_clips_inference_transform(size_hw, resize, open_clip_mode, interpolation):
    """Pixel for pixel what open_clip.image_transform(is_train=False, resize_mode=...) feeds the model."""
    ref_transform = open_clip.image_transform(size_hw if size_hw[0] != size_hw[1] else size_hw[0], is_train=False,
                                              mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize_mode=open_clip_mode,
                                              interpolation=interpolation)
    for i, (w, h) in enumerate(SIZES):
        image = _image(w, h, seed=i)
        ours = clip_input(image, size_hw, resize, interpolation)
        assert ours.dtype == torch.uint8 and ours.shape == (3, *size_hw)
        assert torch.equal(ours.float() / 255, ref_transform(image)), (w, h)


def test_letterbox_frames_put_the_image_exactly_where_the_input_holds_it():
    """A map at input-pixel resolution, 1 where the input holds image pixels and 0 on the padding,
    pooled by stage 2's area math through the row's frame: 1 over any part of the image, 0 over the
    padding beside it (a frame off by a fraction of a pixel would mix the two at the edges)."""
    from salmae.pipeline.data.transforms import crop_flip_saliency

    size_hw = (32, 32)
    for w, h in SIZES:
        x0, y0, x1, y1 = letterbox_frames(np.array([[w, h]]), size_hw)[0]
        new_w, new_h, pad_l, pad_t = letterbox_geometry(w, h, size_hw)
        cells = torch.zeros(size_hw, dtype=torch.float64)        # [32, 32]: one cell per input pixel
        cells[pad_t:pad_t + new_h, pad_l:pad_l + new_w] = 1
        frame = (float(x0), float(y0), float(x1), float(y1))
        inside = crop_flip_saliency(cells, frame, (0, 0, w, h), False, (4, 4))
        assert torch.allclose(inside, torch.ones(4, 4), atol=1e-5), (w, h, inside)
        corner = crop_flip_saliency(cells, frame, (0, 0, w / 3, h / 3), True, (2, 2))   # a crop at the edge
        assert torch.allclose(corner, torch.ones(2, 2), atol=1e-5), (w, h, corner)
        if y0 < -1:                                               # padding above the image
            above = crop_flip_saliency(cells, frame, (0, y0, w, 0), False, (2, 2))
            assert torch.allclose(above, torch.zeros(2, 2), atol=1e-5), (w, h)
        assert (x0 <= 0 <= w <= x1 + 1e-3) and (y0 <= 0 <= h <= y1 + 1e-3)
    assert letterbox_frames(np.array([[48, 32]]), (32, 32)).tolist() == [[0.0, np.float32(-5 * 32 / 21), 48.0,
                                                                          np.float32(27 * 32 / 21)]]


def _micro_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = open_clip.create_model("salmae-micro")
    torch.save(model.state_dict(), path)
    return path


def test_interpolation_follows_the_tags_preprocess_cfg(tmp_path, monkeypatch):
    """An open_clip tag whose pretrained cfg says bilinear (as CLIPA's do) makes stage 1 resize
    bilinearly; the tag path runs through open_clip's factory, with the download replaced by a file."""
    from salmae.pipeline.models.clip import load_clip
    from salmae.pipeline.saliency.engine import _RowImages

    weights = _micro_checkpoint(tmp_path / "micro.pt")
    tag = {"url": "", "hf_hub": "", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
           "resize_mode": "squash"}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "salmae-micro", {"offline_test": tag})
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kw: str(weights))
    _, info, tokenizer, record = load_clip("salmae-micro", "offline_test")
    assert info.interpolation == "bilinear" and record["interpolation"] == "bilinear" and info.mean == (0.5,) * 3
    _, default_info, _, _ = load_clip("salmae-micro", "none")
    assert default_info.interpolation == "bicubic"

    image = _image(50, 30)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    (tmp_path / "k.png").write_bytes(buf.getvalue())
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        tf.add(tmp_path / "k.png", arcname="k.png")
    rows = {0: ("k", str(tmp_path / "s.tar"), -1, 0, "a caption", 50, 30)}
    ds = _RowImages(rows, info, tokenizer, max_pixels=10**6)
    ds._image_bytes = lambda *a: buf.getvalue()
    _, pixels, _, err = ds[0]
    assert err is None
    assert torch.equal(pixels, torch.from_numpy(np.array(image.resize((32, 32), Image.BILINEAR))).permute(2, 0, 1))
    assert not torch.equal(pixels, torch.from_numpy(np.array(image.resize((32, 32), Image.BICUBIC))).permute(2, 0, 1))


def test_interpolation_from_a_checkpoint_files_preprocess_cfg(tmp_path):
    from salmae.pipeline.models.clip import load_clip

    torch.manual_seed(0)
    state = {"state_dict": open_clip.create_model("salmae-micro").state_dict(), "model_name": "salmae-micro",
             "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}}
    torch.save(state, tmp_path / "clip.pt")
    model, info, _, _ = load_clip("salmae-micro", str(tmp_path / "clip.pt"))
    assert info.interpolation == "bilinear" and model.visual.preprocess_cfg["interpolation"] == "bilinear"


# --------------------------------------------------------------------------- stage 1 end to end, then stage 2
@pytest.fixture(scope="module")
def wide_pattern(tmp_path_factory) -> str:
    """24 captioned 48x32 JPEGs in one img2dataset shard."""
    from salmae.pipeline.data.cc3m_like import write_cc3m_like

    out = tmp_path_factory.mktemp("wide")
    write_cc3m_like(out, rows=24, shard_size=24, workers=1, image_size=(48, 32))
    return str(out / "00000.tar")


def _cfg(data, out, **kw):
    from salmae.stages.saliency import SaliencyConfig

    base = dict(data=str(data), out=Path(out), clip_model="salmae-micro", clip_pretrained="none",
                rows_per_shard=16, batch_size=8, workers=0, device="cpu")
    return SaliencyConfig(**{**base, **kw})


def test_letterbox_store_end_to_end_and_stage_2_reads_it(wide_pattern, tmp_path):
    from salmae.pipeline.data.manifest import load_manifest
    from salmae.pipeline.models.clip import load_clip
    from salmae.pipeline.pretrain.data import check_store_covers
    from salmae.pipeline.saliency.gradcam import fast_gradcam, resolve_layer
    from salmae.stages.saliency import run

    out = tmp_path / "letterbox.zarr"
    run(_cfg(wide_pattern, out, resize="letterbox"))
    store = SaliencyStore.open(out)
    assert store.attrs["resize"] == "letterbox" and store.attrs["interpolation"] == "bicubic"
    assert store.attrs["fingerprint"]["resize"] == "letterbox" and "padded" in store.attrs["frame"]
    manifest = load_manifest(out / "manifest.parquet")
    frames = store.frames(range(len(store.keys)))
    assert np.array_equal(frames, letterbox_frames(np.full((24, 2), [48, 32]), (32, 32)))
    assert frames[0, 1] < -7                                   # 5 rows of padding above: past the image

    # the maps are CLIP + Grad-CAM on open_clip's own letterboxed input
    with tarfile.open(wide_pattern) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    torch.manual_seed(0)
    model, info, tokenizer, _ = load_clip("salmae-micro", "none")
    transform = open_clip.image_transform(32, is_train=False, mean=info.mean, std=info.std, resize_mode="longest")
    keys = [str(k) for k in store.keys]
    images = torch.stack([transform(Image.open(io.BytesIO(members[f"{k}.jpg"])).convert("RGB")) for k in keys])
    text = F.normalize(model.encode_text(tokenizer([members[f"{k}.txt"].decode() for k in keys])), dim=-1)
    layer, _ = resolve_layer(model)
    want = fast_gradcam(model, images, text, layer, info.grid).numpy()
    got = store.read(range(len(keys)))
    peak = np.abs(want.reshape(len(want), -1)).max(1)[:, None, None]
    assert np.all(np.abs(got - want) <= 2.0 ** -9 * np.abs(want) + 1e-6 * peak)

    check_store_covers(manifest, store)                        # stage 2 takes the letterbox frames
    misfit = tmp_path / "misfit.zarr"
    run(_cfg(wide_pattern, misfit, resize="letterbox"))
    bad = SaliencyStore.open(misfit, mode="r+")
    bad._group["frame"][3] = np.array([0, 0, 96, 32], np.float32)   # not this image's letterbox
    with pytest.raises(SalmaeError, match=r"1 maps do not fit their image"):
        check_store_covers(manifest, SaliencyStore.open(misfit))


def test_squash_stays_the_default_and_old_stores_resume(wide_pattern, tmp_path):
    from salmae.stages.saliency import run

    out = tmp_path / "squash.zarr"
    run(_cfg(wide_pattern, out))
    store = SaliencyStore.open(out, mode="r+")
    assert store.attrs["resize"] == "squash"
    assert store.frames(range(24)).tolist() == [[0.0, 0.0, 48.0, 32.0]] * 24
    old = {k: v for k, v in store.attrs["fingerprint"].items() if k not in ("resize", "interpolation")}
    store.update_attrs({"fingerprint": old})                   # a store made before the option existed
    run(_cfg(wide_pattern, out))                               # same config: accepted, nothing to redo
    with pytest.raises(SalmaeError, match=r"made with another config or data \(resize: 'squash' -> 'letterbox'\)"):
        run(_cfg(wide_pattern, out, resize="letterbox"))


def test_overlay_masks_follow_a_frame_that_reaches_past_the_image(tmp_path):
    """inspect --png on a letterbox store: a hidden map cell greys the image pixels under it, cells over
    the padding grey nothing."""
    from salmae.pipeline.figures.overlays import frame_cells_at_pixels, save_saliency_overlay

    frame = tuple(letterbox_frames(np.array([[48, 32]]), (32, 32))[0])        # (0, -7.62, 48, 41.14)
    cells = np.zeros((4, 4), bool)
    cells[0, 0] = True                                     # its rows: y in [-7.62, 4.57) -> pixels 0..4
    hidden = frame_cells_at_pixels(cells, frame, (32, 48))
    want = np.zeros((32, 48), bool)
    want[:5, :12] = True
    assert np.array_equal(hidden, want)
    whole = frame_cells_at_pixels(np.eye(4, dtype=bool), (0, 0, 48, 32), (32, 48))
    assert whole[0, 0] and whole[31, 47] and not whole[0, 12] and whole.sum() == 4 * 8 * 12
    save_saliency_overlay(tmp_path / "o.png", np.zeros((32, 48, 3), np.uint8), np.random.rand(4, 4), frame=frame,
                          mask=cells.astype(np.float32))
    assert (tmp_path / "o.png").stat().st_size > 0

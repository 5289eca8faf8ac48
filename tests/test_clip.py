"""open_clip loading: our configs are registered, 'none' is random and recorded, files load offline."""

import pytest
import torch

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.models.clip import checkpoint_extras, load_clip


def test_tiny_configs_registered_and_random_weights_recorded():
    import open_clip

    assert {"salmae-tiny", "salmae-micro"} <= set(open_clip.list_models())
    model, info, tokenizer, record = load_clip("salmae-micro", "none")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert info.grid == tuple(model.visual.grid_size) == (4, 4)
    assert info.input_size == (32, 32)
    assert record["clip_pretrained"] == "none" and record["pretrained_sha256"] is None
    assert tokenizer(["a red circle"]).shape == (1, info.context_length)


def test_local_file_loads_weights_and_records_sha256_and_mean_std(tmp_path):
    model, info, _, _ = load_clip("salmae-micro", "none")
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": state, **checkpoint_extras("salmae-micro", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))}, path)
    loaded, info2, _, record = load_clip("salmae-micro", str(path))
    assert torch.equal(loaded.state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])
    assert info2.mean == (0.5, 0.5, 0.5) and info2.std == (0.25, 0.25, 0.25)
    assert len(record["pretrained_sha256"]) == 64 and record["clip_pretrained"] == str(path)
    with pytest.raises(SalmaeError, match="trained as 'salmae-micro'"):
        load_clip("salmae-tiny", str(path))


def test_missing_checkpoint_and_unknown_names_are_one_line_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(SalmaeError, match="nope.pt not found") as e:
        load_clip("salmae-micro", str(missing))
    assert "\n" not in str(e.value) and "clip-train" in str(e.value)
    with pytest.raises(SalmaeError, match="unknown --clip-model"):
        load_clip("no-such-model", "none")
    with pytest.raises(SalmaeError, match="neither a file nor an open_clip tag"):
        load_clip("salmae-micro", "laion2b_s34b_b88k")

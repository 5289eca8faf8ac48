"""Stage 3 refuses what it cannot do right (issue 12): option ranges before anything is created,
and a fine-tune resume that would change the run."""

from __future__ import annotations

import pytest

from salmae.pipeline.errors import SalmaeError
from salmae.stages.evaluate import run
from test_evaluate import _cfg, colour_folder, mae_checkpoint  # noqa: F401 (fixtures)


@pytest.mark.parametrize("protocol,sets,match", [
    ("knn", {"batch_size": 0}, r"'batch_size' = 0 must be at least 1"),
    ("finetune", {"epochs": 0}, r"'epochs' = 0 must be at least 1"),
    ("linear", {"epochs": -1}, r"'epochs' = -1 must be at least 1"),
    ("knn", {"knn.k": 0}, r"'knn.k' = 0 must be at least 1"),
    ("finetune", {"finetune.layer_decay": 1.5}, r"'finetune.layer_decay' = 1.5 must be in \(0, 1\]"),
    ("linear", {"crop_pct": 0}, r"'crop_pct' = 0.0 must be in \(0, 1\]"),
])
def test_options_out_of_range_are_refused_before_anything_is_created(colour_folder, mae_checkpoint, tmp_path,
                                                                     protocol, sets, match):
    out = tmp_path / "eval"
    with pytest.raises(SalmaeError, match=match):
        run(_cfg(protocol, mae_checkpoint, colour_folder, out, **sets))
    assert not out.exists()


def test_a_finetune_resume_that_changes_the_run_is_refused(colour_folder, mae_checkpoint, tmp_path):
    sets = {"batch_size": 16, "global_batch": 16, "finetune.warmup_epochs": 1, "finetune.drop_path": 0.0,
            "finetune.re_prob": 0.0}
    out = tmp_path / "ft"
    run(_cfg("finetune", mae_checkpoint, colour_folder, out, epochs=1, **sets))
    before = (out / "config.yaml").read_text()
    with pytest.raises(SalmaeError, match=r"--set resume would change the fine-tune .*finetune.blr: None -> 0.01"):
        run(_cfg("finetune", mae_checkpoint, colour_folder, out, epochs=2, resume="latest",
                 **{**sets, "finetune.blr": 0.01}))
    assert (out / "config.yaml").read_text() == before
    extended = run(_cfg("finetune", mae_checkpoint, colour_folder, out, epochs=2, resume="latest", **sets))
    assert extended["resumed_from_epoch"] == 1

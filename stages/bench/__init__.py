"""`salmae bench`: the stage speed ratios we track, measured in one process, into BENCHMARKS.md.

Each figure is the median of `repeats` timed runs (after a warm-up) with its min–max. Figures
that compare two code paths (fast vs plain, saliency vs random, ...) time the two paths
alternately (A B A B ...), so load from other processes on a shared machine hits both alike;
the ratio is the ratio of the medians, its range the min–max of the per-repeat ratios.
Absolute times belong to this machine; the ratios are what we track.

Sections (`salmae bench {all,saliency,pretrain,eval}`), one module each:
- `saliency`: stage-1 fast Grad-CAM vs plain CLIP image forward on the same batches, the naive
  pytorch-grad-cam path for reference, and the store's bytes/image and random-read time;
- `pretrain`: training step saliency vs random masks, visible-only vs all-token encoder, data
  loader with vs without saliency lookup;
- `evaluate`: cached vs uncached linear probe;
- `demo`: the demo's wall time, read from `runs/demo/demo_time.json` (the bench never runs it);
- `scale` (`salmae bench scale --rows N`, not part of `all`): a cc3m-sized rehearsal of the data
  path on generated img2dataset shards, each step's time and peak RSS.

The other modules: `timing` (repeats, interleaving, ratios), `report` (rows, targets, the
markdown blocks and the JSON figures), `workspace` (sizes and the shared generated data),
`suite` (`run_bench`), and `gpu_check` (`salmae gpu-check`, absolute images/s of the real stages).

Generated data lives in a temporary directory; only BENCHMARKS.md (and the `--json` file) is
written, atomically, and only the blocks of the sections that ran are replaced, so
`salmae bench eval` keeps the rest. `SALMAE_BENCH_QUICK=1` shrinks every size (smoke runs; the
table says so).
"""

from salmae.stages.bench.demo import demo_row
from salmae.stages.bench.report import Row, block, judge, markdown_table, merge_blocks, ratio_row
from salmae.stages.bench.suite import SECTIONS, run_bench
from salmae.stages.bench.timing import Timing, fmt_rate, fmt_time, paired_ratio, time_interleaved, time_median

__all__ = ["SECTIONS", "Row", "Timing", "block", "demo_row", "fmt_rate", "fmt_time", "judge", "markdown_table",
           "merge_blocks", "paired_ratio", "ratio_row", "run_bench", "time_interleaved", "time_median"]

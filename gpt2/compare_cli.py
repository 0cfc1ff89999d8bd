"""Compare ablation runs: a markdown table and a val-loss plot.

    python scripts/compare_runs.py RUN_DIR... [--out DIR]

Reads each run's summary.json and metrics.jsonl (never wandb) and writes
DIR/summary.md, DIR/summary.json (the same table, and whether the comparison
is valid) and DIR/val_loss.png. A run whose summary.json says it is
incomplete (a feature it asked for never engaged) is left out, with a note
on stderr. Runs of the same step (several seeds)
are pooled: the table gives mean +- sd of the final val loss over seeds and
the plot the mean curve. Columns: iterations and tokens trained, final val
loss, perplexity, difference to V0 and to V19 (mean +- sd of the per-seed
paired differences when the steps ran the same seeds), recall accuracy
overall and far (and far vs V0) on recall tasks, V-cache elements and bytes
per head at block_size (read off a real cache at the end of training),
training tokens/s. Above the table, the context-use line of the V0
checkpoint: full cache vs a short window, with its paired standard error;
without a clear gap the steps cannot be ranked.

Runs that trained different token counts do not compare: a step that trained
less looks worse for it. Such a comparison is marked INVALID at the top of
summary.md, its difference columns read "invalid", and summary.json says
"valid": false with the reason.
"""

import argparse
import json
from pathlib import Path

from gpt2.compare import INVALID, write_comparison
from gpt2.entry import ArgumentParser


def run_dir_problems(run_dirs):
    """What keeps each run directory from being read: missing, or a summary.json that is not JSON."""
    problems = []
    for d in map(Path, run_dirs):
        summary = d / "summary.json"
        if not d.is_dir():
            problems.append(f"{d}: no such run directory")
        elif summary.is_file():
            try:
                json.loads(summary.read_text())
            except ValueError as e:
                problems.append(f"{summary}: not JSON ({e})")
    return problems


def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--out", default=None, help="where to write (default: parent of the first run)")
    a = ap.parse_args(argv)
    if problems := run_dir_problems(a.run_dirs):
        ap.error("; ".join(problems))
    text = write_comparison(a.run_dirs, a.out or Path(a.run_dirs[0]).parent)
    return 1 if INVALID in text else 0

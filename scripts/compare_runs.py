#!/usr/bin/env python3
"""Compare ablation runs: a markdown table and a val-loss plot.

    python scripts/compare_runs.py RUN_DIR... [--out DIR]

Reads each run's summary.json and metrics.jsonl (never wandb) and writes
DIR/summary.md and DIR/val_loss.png. A run whose summary.json says it is
incomplete (a feature it asked for never engaged) is left out, with a note
on stderr. Runs of the same step (several seeds)
are pooled: the table gives mean +- sd of the final val loss over seeds and
the plot the mean curve. Columns: final val loss, perplexity, delta vs V0 and
vs V19, V-cache elements and bytes per head at block_size (read off a real
cache at the end of training), training tokens/s.
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.atomic import atomic_write, atomic_write_text  # noqa: E402
from lib.tracking import read_metrics, summary_complete  # noqa: E402


def load_run(run_dir):
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the run did not finish")
    summary = json.loads(path.read_text())
    evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
    return {"name": summary.get("step") or run_dir.name, "dir": run_dir, "summary": summary, "evals": evals}


def load_complete_runs(run_dirs):
    """The runs to compare: incomplete ones are named on stderr and left out."""
    runs = []
    for d in run_dirs:
        run = load_run(d)
        if summary_complete(run["summary"]):
            runs.append(run)
        else:
            print(f"compare_runs: left out {run['dir']}: incomplete ({run['summary'].get('incomplete_reason')})",
                  file=sys.stderr)
    if not runs:
        raise ValueError(f"no complete run among {', '.join(str(d) for d in run_dirs)}")
    return runs


def group_runs(runs):
    """{step: [runs]} in first-seen order."""
    groups = {}
    for r in runs:
        groups.setdefault(r["name"], []).append(r)
    return groups


def _mean_sd(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _delta(value, ref):
    if ref is None:
        return "n/a"
    return f"{value - ref:+.4f} ({(value - ref) / ref * 100:+.2f}%)"


def summary_table(runs):
    groups = group_runs(runs)
    means = {name: _mean_sd([r["summary"]["final_val_loss"] for r in rs])[0] for name, rs in groups.items()}
    seeded = any(len(rs) > 1 for rs in groups.values())
    lines = ["| step | runs | final val loss | ppl | vs V0 | vs V19 | V elements/head | V bytes/head | train tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        mean, sd = _mean_sd([r["summary"]["final_val_loss"] for r in rs])
        loss = f"{mean:.4f} +- {sd:.4f}" if seeded else f"{mean:.4f}"
        vc = rs[0]["summary"].get("v_cache") or {}
        tps = [r["summary"]["tokens_per_s"] for r in rs if r["summary"].get("tokens_per_s")]
        lines.append(
            f"| {name} | {len(rs)} | {loss} | {math.exp(mean):.2f} | {_delta(mean, means.get('V0'))} | "
            f"{_delta(mean, means.get('V19'))} | {vc.get('elements_per_head', 'n/a'):,} | "
            f"{vc.get('bytes_per_head', 'n/a'):,} | {statistics.fmean(tps) if tps else float('nan'):,.0f} |")
    return "\n".join(lines)


def plot_val_loss(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in group_runs(runs).items():
        by_tokens = {}
        for r in rs:
            for e in r["evals"]:
                by_tokens.setdefault(e["tokens"], []).append(e["val_loss"])
        if not by_tokens:
            continue
        xs = sorted(by_tokens)
        ys = [statistics.fmean(by_tokens[x]) for x in xs]
        ax.plot(xs, ys, marker="o", label=f"{name} (mean of {len(rs)})" if len(rs) > 1 else name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val loss")
    ax.set_title("validation loss per ablation step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def write_comparison(run_dirs, out_dir):
    runs = load_complete_runs(run_dirs)
    out_dir = Path(out_dir)
    table = summary_table(runs)
    dirs = " ".join(str(r["dir"]) for r in runs)
    text = f"# Ablation summary\n\n{table}\n\nRegenerate: `python scripts/compare_runs.py {dirs} --out {out_dir}`\n"
    atomic_write_text(out_dir / "summary.md", text)
    plot_val_loss(runs, out_dir / "val_loss.png")
    print("\n" + table)
    print(f"\nwrote {out_dir / 'summary.md'} and {out_dir / 'val_loss.png'}")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--out", default=None, help="where to write (default: parent of the first run)")
    a = ap.parse_args(argv)
    write_comparison(a.run_dirs, a.out or Path(a.run_dirs[0]).parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())

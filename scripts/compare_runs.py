#!/usr/bin/env python3
"""Compare ablation runs: a markdown table and a val-loss plot.

    python scripts/compare_runs.py RUN_DIR... [--out DIR]

Reads each run's summary.json and metrics.jsonl (never wandb), writes
DIR/summary.md (final val loss, perplexity, delta vs V0 and vs V19, V-cache
elements and bytes per head at block_size, training tokens/s) and
DIR/val_loss.png (val loss vs training tokens, one line per run).
"""

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.tracking import read_metrics  # noqa: E402


def load_run(run_dir):
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the run did not finish")
    summary = json.loads(path.read_text())
    evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
    name = summary.get("step") or run_dir.name
    return {"name": name, "dir": run_dir, "summary": summary, "evals": evals}


def _delta(value, ref):
    if ref is None:
        return "n/a"
    return f"{value - ref:+.4f} ({(value - ref) / ref * 100:+.2f}%)"


def summary_table(runs):
    ref = {r["name"]: r["summary"]["final_val_loss"] for r in runs}
    lines = ["| step | final val loss | ppl | vs V0 | vs V19 | V elements/head | V bytes/head | train tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["summary"]
        vc = s.get("v_cache") or {}
        tps = f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "n/a"
        lines.append(
            f"| {r['name']} | {s['final_val_loss']:.4f} | {math.exp(s['final_val_loss']):.2f} | "
            f"{_delta(s['final_val_loss'], ref.get('V0'))} | {_delta(s['final_val_loss'], ref.get('V19'))} | "
            f"{vc.get('elements_per_head', 'n/a'):,} | {vc.get('bytes_per_head', 'n/a'):,} | {tps} |")
    return "\n".join(lines)


def plot_val_loss(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        pts = [(e["tokens"], e["val_loss"]) for e in r["evals"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=r["name"])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val loss")
    ax.set_title("validation loss per ablation step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_comparison(run_dirs, out_dir):
    runs = [load_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    table = summary_table(runs)
    text = (f"# Ablation summary\n\nRuns: {', '.join(str(r['dir']) for r in runs)}\n\n{table}\n\n"
            f"Regenerate: `python scripts/compare_runs.py {' '.join(str(r['dir']) for r in runs)}`\n")
    tmp = out_dir / "summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(out_dir / "summary.md")
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

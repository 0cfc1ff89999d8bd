"""The comparison of ablation runs that scripts/compare_runs.py prints and
scripts/run_ablation.py writes at the end of a matrix: summary.md (the
table, and the context-use line above it), summary.json and val_loss.png,
from each run's summary.json and metrics.jsonl (scripts/compare_runs.py's
help says what each column is)."""

import json
import math
import statistics
import sys
from pathlib import Path

from gpt2.atomic import atomic_write, atomic_write_text
from gpt2.stats import mean_sd
from gpt2.tracking import read_metrics, summary_complete


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


def seed_of(run):
    """The seed a run belongs to: its directory's parent is seed<N> under --seeds, else None."""
    parent = run["dir"].parent.name
    return parent[len("seed"):] if parent.startswith("seed") else None


def _fmt_mean_sd(values, digits=4):
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} +- {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


SINGLE_RUN = "single run: not resolved"


def _vs(runs, ref_runs, key="final_val_loss", relative=True):
    """Difference to the reference step: per seed (paired) when both ran the same seeds, else of the
    means (and relative to it, when `relative`). A difference that rests on one run of either step
    says so: one seed cannot tell it from seed-to-seed noise (the reference's spread is given when
    it ran several seeds)."""
    if not ref_runs:
        return "n/a"
    if runs is ref_runs:
        return "reference"
    ref_by_seed = {seed_of(r): r["summary"][key] for r in ref_runs}
    diffs = [r["summary"][key] - ref_by_seed[seed_of(r)] for r in runs if seed_of(r) in ref_by_seed]
    if len(diffs) > 1 and len(diffs) == len(runs):
        mean, sd = mean_sd(diffs)
        return f"{mean:+.4f} +- {sd:.4f} (paired, {len(diffs)} seeds)"
    mean = mean_sd([r["summary"][key] for r in runs])[0]
    ref, ref_sd = mean_sd(ref_by_seed.values())
    text = f"{mean - ref:+.4f}" + (f" ({(mean - ref) / ref * 100:+.2f}%)" if relative and ref else "")
    if len(runs) == 1 or len(ref_runs) == 1:
        spread = f", seed-to-seed sd {ref_sd:.4f}" if len(ref_runs) > 1 else ""
        text += f" ({SINGLE_RUN}{spread})"
    return text


INVALID = "INVALID COMPARISON"


def _fmt_range(values):
    """One count, or min-max when the runs differ; n/a when a run did not record it."""
    if None in values:
        return "n/a"
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def unequal_budgets(runs):
    """Why these runs do not compare (they trained different token counts), or None."""
    by_step = {name: sorted({r["summary"].get("tokens") for r in rs}, key=lambda t: (t is None, t))
               for name, rs in group_runs(runs).items()}
    counts = {t for ts in by_step.values() for t in ts}
    if len(counts) <= 1:
        return None
    listed = "; ".join(f"{name} " + ", ".join("n/a" if t is None else f"{t:,}" for t in ts)
                       for name, ts in by_step.items())
    return f"the runs trained different token counts ({listed})"


def summary_table(runs, valid=True):
    """Per step: iterations and tokens trained, final val loss (mean +- sd over seeds),
    differences to V0 and V19 (per-seed paired when seeded; "invalid" when not `valid`),
    recall accuracy when the runs have it, V cache, speed."""
    groups = group_runs(runs)
    recall = any("val_acc" in r["summary"] for r in runs)
    head = "| step | runs | iters | tokens | final val loss | ppl | vs V0 | vs V19 |"
    head += " acc | far acc | far acc vs V0 |" if recall else ""
    lines = [head + " V elements/head | V bytes/head | train tok/s |",
             "|" + "---|" * (head.count("|") - 1 + 3)]

    def vs(rs, ref, key="final_val_loss", relative=not recall):
        return _vs(rs, groups.get(ref), key, relative) if valid else "invalid"

    for name, rs in groups.items():
        losses = [r["summary"]["final_val_loss"] for r in rs]
        vc = rs[0]["summary"].get("v_cache") or {}
        tps = [r["summary"]["tokens_per_s"] for r in rs if r["summary"].get("tokens_per_s")]
        cells = [name, str(len(rs)), _fmt_range([r["summary"].get("iters") for r in rs]),
                 _fmt_range([r["summary"].get("tokens") for r in rs]), _fmt_mean_sd(losses),
                 f"{math.exp(mean_sd(losses)[0]):.2f}", vs(rs, "V0"), vs(rs, "V19")]
        if recall:
            acc = [r["summary"].get("val_acc") for r in rs]
            far = [r["summary"].get("val_acc_far") for r in rs]
            cells += [_fmt_mean_sd(acc, 3) if None not in acc else "n/a",
                      _fmt_mean_sd(far, 3) if None not in far else "n/a",
                      vs(rs, "V0", "val_acc_far", relative=False) if None not in far else "n/a"]
        cells += [f"{vc.get('elements_per_head', 'n/a'):,}", f"{vc.get('bytes_per_head', 'n/a'):,}",
                  f"{statistics.fmean(tps) if tps else float('nan'):,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def context_use_line(runs):
    """The context-use line of the first V0 run's checkpoint: can these runs rank V-cache methods?"""
    v0 = group_runs(runs).get("V0")
    ckpt = v0[0]["dir"] / "best.pt" if v0 else None
    if ckpt is None or not ckpt.exists():
        return "Context use: no V0 checkpoint among these runs, so it is unknown whether the model uses its context."
    from gpt2.bench.kv_measure import \
        checkpoint_context_use  # loads torch and the model: only when there is a checkpoint

    return checkpoint_context_use(ckpt)[1] + f" (`{ckpt}`)"


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
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def summary_record(runs, problem):
    """summary.json: per step the runs' own figures, and whether they compare."""
    steps = {}
    for name, rs in group_runs(runs).items():
        losses = [r["summary"]["final_val_loss"] for r in rs]
        mean, sd = mean_sd(losses)
        steps[name] = {"runs": [str(r["dir"]) for r in rs], "iters": [r["summary"].get("iters") for r in rs],
                       "tokens": [r["summary"].get("tokens") for r in rs], "final_val_loss": losses,
                       "final_val_loss_mean": mean, "final_val_loss_sd": sd if len(rs) > 1 else None,
                       "v_cache": rs[0]["summary"].get("v_cache"),
                       "tokens_per_s": [r["summary"].get("tokens_per_s") for r in rs]}
        for key in ("val_acc", "val_acc_far"):
            if all(r["summary"].get(key) is not None for r in rs):
                steps[name][key] = [r["summary"][key] for r in rs]
    return {"valid": problem is None, "invalid_reason": problem, "steps": steps}


def write_comparison(run_dirs, out_dir, title=None):
    runs = load_complete_runs(run_dirs)
    out_dir = Path(out_dir)
    if any(r["dir"].resolve() == out_dir.resolve() for r in runs):
        raise ValueError(f"--out {out_dir} is one of the compared run directories: its summary.json is the run's own")
    problem = unequal_budgets(runs)
    table = summary_table(runs, valid=problem is None)
    context = context_use_line(runs)
    dirs = " ".join(str(r["dir"]) for r in runs)
    warning = ""
    if problem:
        warning = (f"**{INVALID}: {problem}. A step that trained less looks worse for it, so no difference "
                   f"between the steps is given. Train every run alike and compare again: `make train FORCE=1`, "
                   f"with one budget for the whole matrix (--matrix-time).**\n\n")
    text = (f"# Ablation summary{f': {title}' if title else ''}\n\n{warning}{context}\n\n{table}\n\n"
            f"Regenerate: `python scripts/compare_runs.py {dirs} --out {out_dir}`\n")
    atomic_write_text(out_dir / "summary.md", text)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary_record(runs, problem), indent=1) + "\n")
    plot_val_loss(runs, out_dir / "val_loss.png")
    print("\n" + warning + context + "\n\n" + table)
    print(f"\nwrote {out_dir / 'summary.md'}, {out_dir / 'summary.json'} and {out_dir / 'val_loss.png'}")
    return text

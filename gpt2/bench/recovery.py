"""How much of a V-cache method's cost fine-tuning through it recovers.

For each step S of a fine-tune matrix (OUT_DIR/<step>/, started from a
pretrained model by --init-from), on the same held-out batches:

    cost(0) = L(the pretrained model with S's method, fitted post hoc) - L(the pretrained model)
    cost(N) = L(S after its N fine-tuning steps, its method trained in) - L(V0 after the same N steps)
    recovered = 1 - cost(N) / cost(0)

V0, the full cache fine-tuned the same way, is the control: fine-tuning on
the corpus lowers the loss by itself. Every loss is per batch over the same
val batches, so every difference is paired (mean +- SE over batches), and
the recovered fraction's SE comes from a bootstrap over those batches.
The post-hoc fit is the run's own calibration (same batches, samples,
epochs), on the pretrained model instead of the one warmed up by training.

Several matrices of the same setup, one per seed, are scored on the same
batches: each seed's rows, then the mean +- sd over seeds.
"""

import argparse
import json
import math
import random
import statistics
from pathlib import Path

import torch

from gpt2.calibrate import calibration_batches, fit_codecs, quiet
from gpt2.data import open_data
from gpt2.lm import load_checkpoint
from gpt2.pretrained import load_pretrained, model_from_checkpoint
from gpt2.stats import mean_sd, paired_difference, verdict
from gpt2.tracking import summary_complete
from gpt2.train import EVAL_SEED_SALT
from lib.vcache import describe

BOOTSTRAP = 2000


@torch.no_grad()
def batch_losses(model, batches):
    model.eval()
    return [float(model(x, y)[1]) for x, y in batches]


def matrix_runs(matrix_dir):
    """{step: last.pt path} of the complete runs of a matrix, V0 first, and the iterations
    they all trained (read from their summaries: a checkpoint is loaded only when it is scored)."""
    runs, iters = {}, {}
    for summary_path in sorted(Path(matrix_dir).glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        if summary_complete(summary) and (summary_path.parent / "last.pt").is_file():
            runs[summary_path.parent.name] = summary_path.parent / "last.pt"
            iters[summary_path.parent.name] = summary["iters"]
    if "V0" not in runs:
        raise ValueError(f"{matrix_dir} has no complete V0 run: fine-tuning's control")
    if len(set(iters.values())) > 1:
        raise ValueError(f"the runs of {matrix_dir} trained different iteration counts: {iters}")
    return dict(sorted(runs.items(), key=lambda kv: kv[0] != "V0")), iters["V0"]


def post_hoc(pretrained, args, data, log):
    """Fit the pretrained model's method (put in by set_v_cache) as the run's calibration
    fits it, when its codec needs a fit."""
    if pretrained.needs_fit():
        batches = calibration_batches(data, args["kvsplice_max_batches"], args["batch_size"], args["block_size"],
                                      args["seed"])
        with quiet():
            fit_codecs(pretrained, batches, args["kvsplice_samples"], args["kvsplice_shared"], args["seed"],
                       epochs=args["kvsplice_epochs"], lr=args["kvsplice_lr"])
        log(f"[recovery] fitted {describe(pretrained.config.v_cache)} on the pretrained model")


def recovered_se(cost0_diffs, costn_diffs, seed=0):
    """SE of 1 - mean(costN) / mean(cost0) by a bootstrap over the batches."""
    rng = random.Random(seed)
    n, values = len(cost0_diffs), []
    for _ in range(BOOTSTRAP):
        pick = [rng.randrange(n) for _ in range(n)]
        c0 = statistics.fmean(cost0_diffs[i] for i in pick)
        if c0 != 0:
            values.append(1 - statistics.fmean(costn_diffs[i] for i in pick) / c0)
    return statistics.stdev(values) if len(values) > 1 else math.nan


# what every matrix of one recovery must share, so that their costs are of the same thing
SAME_SETUP = ("init_from", "dataset", "tokenizer", "block_size", "batch_size")
# what a post-hoc fit depends on beyond the setup
CALIBRATION = ("seed", "kvsplice_samples", "kvsplice_max_batches", "kvsplice_epochs", "kvsplice_lr",
               "kvsplice_shared")


def matrix_dirs(paths):
    """The matrices named: a directory that ran --seeds (DIR/seed<N>/<step>/) stands for each of its seeds."""
    dirs = []
    for path in map(Path, paths):
        seeds = sorted((d for d in path.glob("seed*") if d.is_dir() and d.name[4:].isdigit()),
                       key=lambda d: int(d.name[4:]))
        dirs += seeds or [path]
    return dirs


def _same_setup(matrices):
    """ValueError naming every way the matrices (path, runs, iters, V0's args) differ in what
    their costs depend on."""
    (first, runs0, iters0, args0), problems = matrices[0], []
    if args0.get("init_from", "scratch") == "scratch":
        problems.append(f"{first}'s runs trained from scratch: recovery needs a pretrained start (--init-from)")
    for path, runs, iters, args in matrices[1:]:
        differ = [k for k in SAME_SETUP if args.get(k) != args0.get(k)]
        if differ:
            problems.append(f"{path} differs from {first} in {', '.join(differ)}")
        if iters != iters0:
            problems.append(f"{path} trained {iters} iterations, {first} {iters0}")
        if set(runs) != set(runs0):
            problems.append(f"{path} has steps {', '.join(runs)}, {first} {', '.join(runs0)}")
    if problems:
        raise ValueError("; ".join(problems))


def measure(matrices, n_batches=16, log=print):
    """Per matrix (one seed of a fine-tune matrix each) and step: losses per batch post hoc
    (n = 0) and after fine-tuning (n = N), and the costs. Every model is scored on the same
    held-out batches (drawn with the first matrix's seed); a method's post-hoc loss is
    measured once per distinct fit (its record, and the calibration settings where it fits).
    One fine-tuned checkpoint is in memory at a time."""
    paths = [Path(matrices)] if isinstance(matrices, (str, Path)) else [Path(m) for m in matrices]
    loaded = []
    for path in paths:
        runs, iters = matrix_runs(path)
        loaded.append((path, runs, iters, load_checkpoint(runs["V0"])["args"]))
    _same_setup(loaded)
    _, _, iters, args = loaded[0]
    data = open_data(argparse.Namespace(**{"tokenizer": "gpt2", **args}))
    batches = [data.get_batch("val", args["batch_size"], args["block_size"], args["seed"] + EVAL_SEED_SALT, 0, j)
               for j in range(n_batches)]
    log(f"[recovery] {len(loaded)} matrix(es) of {len(loaded[0][1])} runs of {iters} iterations; {n_batches} val "
        f"batches x {args['batch_size']} x {args['block_size']} tokens")
    pretrained = load_pretrained(args["init_from"])
    pretrained.crop_block_size(args["block_size"])
    base0 = batch_losses(pretrained, batches)
    post_hoc_losses, results = {}, []
    for path, runs, _, v0_args in loaded:
        rows = {}
        for step, ckpt_path in runs.items():  # V0 first: the control every cost(N) is against
            ckpt = load_checkpoint(ckpt_path)
            step_args, tuned = ckpt["args"], model_from_checkpoint(ckpt)
            del ckpt
            record = tuned.config.v_cache
            atN = batch_losses(tuned, batches)
            del tuned
            if step == "V0":
                baseN = atN
            pretrained.set_v_cache(record)
            fit = [step_args[k] for k in CALIBRATION] if pretrained.needs_fit() else None
            key = json.dumps([record, fit], sort_keys=True)
            if key not in post_hoc_losses:
                post_hoc(pretrained, step_args, data, log)
                post_hoc_losses[key] = batch_losses(pretrained, batches)
            at0 = post_hoc_losses[key]
            rows[step] = {"record": record, "at0": at0, "atN": atN,
                          "cost0": [a - b for a, b in zip(at0, base0)], "costN": [a - b for a, b in zip(atN, baseN)]}
            log(f"[recovery] {path} {step}: loss {statistics.fmean(at0):.4f} post hoc, {statistics.fmean(atN):.4f} "
                f"after {iters} steps")
        results.append({"dir": str(path), "seed": v0_args["seed"], "rows": rows, "baseN": baseN})
    return {"matrices": results, "iters": iters, "n_batches": n_batches, "base0": base0}


def _pm(diffs):
    mean, se = paired_difference(diffs, [0.0] * len(diffs))
    return f"{mean:+.4f} +- {se:.4f}", mean, se


def recovered_fraction(r):
    """(text, value or None) of 1 - cost(N)/cost(0) for one step of one matrix."""
    _, m0, se0 = _pm(r["cost0"])
    side = verdict(m0, se0)
    if side == "within noise":
        return "not resolved: cost(0) within noise", None
    if side == "lower":
        return "nothing to recover: the method lowers the loss post hoc", None
    value = 1 - statistics.fmean(r["costN"]) / m0
    return f"{value:.2f} +- {recovered_se(r['cost0'], r['costN']):.2f}", value


def _over_seeds(values, digits):
    mean, sd = mean_sd(values)
    return f"{mean:+.{digits}f} +- {sd:.{digits}f}"


def report(result, command):
    """The recovery table and the paired comparisons between steps, as markdown: one
    table for one matrix; with several (seeds), each seed's rows and then mean +- sd over seeds."""
    matrices, N = result["matrices"], result["iters"]
    several = len(matrices) > 1
    base0 = statistics.fmean(result["base0"])
    tuned = "; ".join((f"seed {m['seed']} " if several else "") + f"{statistics.fmean(m['baseN']):.4f} "
                      f"(ppl {math.exp(statistics.fmean(m['baseN'])):.2f})" for m in matrices)
    title = f"{result['n_batches']} held-out batches, paired" + (f"; {len(matrices)} seeds" if several else "")
    lines = [f"# Recovery through fine-tuning ({title})", "",
             f"Pretrained model: loss {base0:.4f} (ppl {math.exp(base0):.2f}); V0 after {N} fine-tuning steps: "
             f"{tuned}.", "",
             "| step | " + ("seed | " if several else "") + "method | cost(0) post hoc | cost(N) fine-tuned | "
             "recovered 1 - cost(N)/cost(0) |",
             "|---|---|---|---|---|" + ("---|" if several else "")]
    steps = [step for step in matrices[0]["rows"] if step != "V0"]
    for step in steps:
        for m in matrices:
            r = m["rows"][step]
            seed = f"{m['seed']} | " if several else ""
            lines.append(f"| {step} | {seed}{describe(r['record'])} | {_pm(r['cost0'])[0]} | {_pm(r['costN'])[0]} | "
                         f"{recovered_fraction(r)[0]} |")
    if several:
        lines += ["", f"Over the {len(matrices)} seeds (mean +- sd of the per-seed figures):", "",
                  "| step | cost(N) fine-tuned | recovered |", "|---|---|---|"]
        for step in steps:
            rows = [m["rows"][step] for m in matrices]
            recovered = [recovered_fraction(r)[1] for r in rows]
            rec = ("not resolved: no cost(0) to recover in a seed" if None in recovered
                   else _over_seeds(recovered, 2).lstrip("+"))
            lines.append(f"| {step} | {_over_seeds([statistics.fmean(r['costN']) for r in rows], 4)} | {rec} |")
    lines += ["", "Paired differences between steps (losses, same batches; within noise = within 2 SE):", ""]
    for a, b in (("V20", "V19"), ("V20", "V22"), ("V22", "V19"), ("V24", "V23")):
        if a not in matrices[0]["rows"] or b not in matrices[0]["rows"]:
            continue
        for label, key in (("post hoc", "at0"), (f"after {N} steps", "atN")):
            means = []
            for m in matrices:
                mean, se = paired_difference(m["rows"][a][key], m["rows"][b][key])
                means.append(mean)
                seed = f" (seed {m['seed']})" if several else ""
                lines.append(f"- {a} - {b}, {label}{seed}: {mean:+.4f} +- {se:.4f} ({verdict(mean, se)})")
            if several:
                lines.append(f"- {a} - {b}, {label}, over the {len(matrices)} seeds: {_over_seeds(means, 4)} "
                             f"(mean +- sd)")
    if several:
        seeds = ", ".join(str(m["seed"]) for m in matrices)
        lines += ["", f"{len(matrices)} fine-tuning runs per step (seeds {seeds}), every one scored on the same "
                  "batches: +- is the SE over batches within a seed, the sd over seeds across them."]
    else:
        lines += ["", "A single fine-tuning run per step (one seed): the differences after fine-tuning carry the "
                  "batches' noise, not the seed's."]
    lines += ["", f"Regenerate: `{command}`"]
    return "\n".join(lines) + "\n"

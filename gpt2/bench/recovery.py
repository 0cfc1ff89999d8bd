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
"""

import argparse
import contextlib
import io
import json
import math
import random
import statistics
from pathlib import Path

import torch

from gpt2.calibrate import CALIB_SEED_SALT, KVSpliceCalibrator
from gpt2.data import open_data
from gpt2.lm import load_checkpoint
from gpt2.pretrained import load_pretrained, model_from_checkpoint
from gpt2.stats import paired_difference, verdict
from gpt2.tracking import summary_complete
from gpt2.train import EVAL_SEED_SALT
from lib.vcache import describe

BOOTSTRAP = 2000


@torch.no_grad()
def batch_losses(model, batches):
    model.eval()
    return [float(model(x, y)[1]) for x, y in batches]


def matrix_runs(matrix_dir):
    """{step: (run dir, checkpoint)} of the complete runs of a matrix, V0 first."""
    runs = {}
    for summary_path in sorted(Path(matrix_dir).glob("*/summary.json")):
        if summary_complete(json.loads(summary_path.read_text())) and (summary_path.parent / "last.pt").is_file():
            runs[summary_path.parent.name] = load_checkpoint(summary_path.parent / "last.pt")
    if "V0" not in runs:
        raise ValueError(f"{matrix_dir} has no complete V0 run: fine-tuning's control")
    iters = {step: ckpt["iter"] for step, ckpt in runs.items()}
    if len(set(iters.values())) > 1:
        raise ValueError(f"the runs of {matrix_dir} trained different iteration counts: {iters}")
    return dict(sorted(runs.items(), key=lambda kv: kv[0] != "V0"))


def post_hoc(pretrained, record, args, data, log):
    """The pretrained model with `record`'s method, fitted as the run's calibration fits it."""
    pretrained.set_v_cache(record)
    if pretrained.needs_fit():
        cal = KVSpliceCalibrator(pretrained, args["kvsplice_samples"], seed=args["seed"])
        with contextlib.redirect_stdout(io.StringIO()):
            cal.collect(data.get_batch("train", args["batch_size"], args["block_size"],
                                       args["seed"] + CALIB_SEED_SALT, 0, j)[0]
                        for j in range(args["kvsplice_max_batches"]))
            cal.fit(args["kvsplice_epochs"], args["kvsplice_lr"], args["kvsplice_shared"], seed=args["seed"])
        log(f"[recovery] fitted {describe(record)} on the pretrained model")
    return pretrained


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


def measure(matrix_dir, n_batches=16, log=print):
    """Per step: losses per batch post hoc (n = 0) and after fine-tuning (n = N), and the costs."""
    runs = matrix_runs(matrix_dir)
    args = runs["V0"]["args"]
    if args.get("init_from", "scratch") == "scratch":
        raise ValueError(f"{matrix_dir}'s runs trained from scratch: recovery needs a pretrained start (--init-from)")
    data = open_data(argparse.Namespace(**{"tokenizer": "gpt2", **args}))
    batches = [data.get_batch("val", args["batch_size"], args["block_size"], args["seed"] + EVAL_SEED_SALT, 0, j)
               for j in range(n_batches)]
    log(f"[recovery] {len(runs)} runs of {runs['V0']['iter']} iterations; {n_batches} val batches x "
        f"{args['batch_size']} x {args['block_size']} tokens")
    pretrained = load_pretrained(args["init_from"])
    pretrained.crop_block_size(args["block_size"])
    rows = {}
    base0 = batch_losses(pretrained, batches)
    baseN = batch_losses(model_from_checkpoint(runs["V0"]), batches)
    for step, ckpt in runs.items():
        tuned = model_from_checkpoint(ckpt)
        record = tuned.config.v_cache
        at0 = batch_losses(post_hoc(pretrained, record, ckpt["args"], data, log), batches)
        atN = baseN if step == "V0" else batch_losses(tuned, batches)
        rows[step] = {"record": record, "at0": at0, "atN": atN,
                      "cost0": [a - b for a, b in zip(at0, base0)], "costN": [a - b for a, b in zip(atN, baseN)]}
        log(f"[recovery] {step}: loss {statistics.fmean(at0):.4f} post hoc, {statistics.fmean(atN):.4f} after "
            f"{ckpt['iter']} steps")
    return {"rows": rows, "iters": runs["V0"]["iter"], "n_batches": n_batches, "base0": base0, "baseN": baseN,
            "args": args}


def _pm(diffs):
    mean, se = paired_difference(diffs, [0.0] * len(diffs))
    return f"{mean:+.4f} +- {se:.4f}", mean, se


def report(result, command):
    """The recovery table and the paired comparisons between steps, as markdown."""
    rows, N = result["rows"], result["iters"]
    base0, baseN = statistics.fmean(result["base0"]), statistics.fmean(result["baseN"])
    lines = [f"# Recovery through fine-tuning ({result['n_batches']} held-out batches, paired)", "",
             f"Pretrained model: loss {base0:.4f} (ppl {math.exp(base0):.2f}); V0 after {N} fine-tuning steps: "
             f"{baseN:.4f} (ppl {math.exp(baseN):.2f}).", "",
             "| step | method | cost(0) post hoc | cost(N) fine-tuned | recovered 1 - cost(N)/cost(0) |",
             "|---|---|---|---|---|"]
    for step, r in rows.items():
        if step == "V0":
            continue
        c0, m0, se0 = _pm(r["cost0"])
        cn, _, _ = _pm(r["costN"])
        significant = verdict(m0, se0) != "within noise"
        if significant:
            mN = statistics.fmean(r["costN"])
            rec = f"{1 - mN / m0:.2f} +- {recovered_se(r['cost0'], r['costN']):.2f}"
        else:
            rec = "not resolved: cost(0) within noise"
        lines.append(f"| {step} | {describe(r['record'])} | {c0} | {cn} | {rec} |")
    lines += ["", "Paired differences between steps (losses, same batches; within noise = within 2 SE):", ""]
    for a, b in (("V20", "V19"), ("V20", "V22"), ("V22", "V19")):
        if a in rows and b in rows:
            for label, key in (("post hoc", "at0"), (f"after {N} steps", "atN")):
                mean, se = paired_difference(rows[a][key], rows[b][key])
                lines.append(f"- {a} - {b}, {label}: {mean:+.4f} +- {se:.4f} ({verdict(mean, se)})")
    lines += ["", "A single fine-tuning run per step (one seed): the differences after fine-tuning carry the "
              "batches' noise, not the seed's.", "", f"Regenerate: `{command}`"]
    return "\n".join(lines) + "\n"

"""The report of scripts/bench_kv.py: the markdown table, its targets, how each
number is measured, and the Pareto plot. Pure: rows in, text (or a PNG) out."""

import datetime
import math
import os
import platform
import re
from pathlib import Path

import torch

from gpt2.atomic import atomic_write
from gpt2.bench.kv_methods import QUANT_GROUP, V20_K
from gpt2.stats import NOISE_FLOOR, NOISE_SE, paired_difference, verdict

# V20's decode tokens/s relative to the plain cache's, at context 1024, by batch
DECODE_TARGETS = {1: 0.85, 16: 1.0}  # compiled V20 / the plain cache's best, decode tok/s
EAGER_TARGETS = {1: 0.9, 16: 1.0}    # eager V20 and V22 / eager V0, tokens/s end to end (prefill included)
PREFILL_TARGET = 1.1                 # the pruned prefill's time / the full one's, at most
WALL_TARGET_S = 600


def _fmt_pct(x):
    return "n/a" if x is None else f"{x:+.2f}%"


def _fmt_change(r, recall):
    """Text: perplexity change '+1.23% +- 0.40' (paired SE). Recall: the loss on answers
    is near 0, where a relative change says nothing: the loss difference '+0.1234 +- 0.0050'."""
    if recall:
        se = r["loss_diff_se"]
        return f"{r['loss_diff']:+.4f}" + ("" if se is None else f" +- {se:.4f}")
    se = r.get("ppl_change_se_pct")
    return _fmt_pct(r["ppl_change_pct"]) + ("" if se is None else f" +- {se:.2f}")


def _fmt_trained(r, recall):
    """The trained-in run's change vs V0: perplexity %, or for recall the loss difference."""
    pct = r.get("trained_in_pct")
    if pct is None or not recall:
        return _fmt_pct(pct)
    return f"{math.log1p(pct / 100):+.4f}"


def _fmt_acc(r, name):
    value, diff, se = r.get(name), r.get(f"{name}_diff"), r.get(f"{name}_diff_se")
    if value is None:
        return "n/a"
    return f"{value:.3f}" + ("" if diff is None or r["verdict"] == "reference" else f" ({diff:+.3f} +- {se:.3f})")


def context_use(rows):
    """(can_rank, text): is the full cache clearly better than a short window of the
    last `prune_recency` tokens' V? Only then can the checkpoint rank V-cache methods."""
    info = rows[0]["info"]
    W = info["prune_recency"]
    row = next((r for r in rows if r["record"]["select"] == {"kind": "window", "window": W}), None)
    if row is None:
        return False, "Context use: no short-window row, so it is unknown whether this checkpoint uses its context."
    d, se = row["loss_diff"], row["loss_diff_se"]
    can_rank = se is not None and d > NOISE_SE * se
    acc = "" if row.get("acc_far_diff") is None else (
        f", far accuracy {row['acc_far_diff']:+.3f} +- {row['acc_far_diff_se']:.3f}")
    if row.get("ind_acc_diff") is not None:
        acc += f", induction accuracy {row['ind_acc_diff']:+.3f} +- {row['ind_acc_diff_se'] or float('nan'):.3f}"
    text = (f"Context use: keeping only the last {W} tokens' V changes val loss by {d:+.4f} +- "
            f"{se if se is not None else float('nan'):.4f} (paired SE over {info['n_eval_batches']} batches){acc} "
            f"against the full cache. ")
    if can_rank:
        text += f"The full cache is better by more than {NOISE_SE:g} SE: this checkpoint needs its context and can rank V-cache methods."
    else:
        text += (f"The full cache is not better by more than {NOISE_SE:g} SE: this checkpoint cannot rank V-cache "
                 f"methods, and every quality difference below is not resolved.")
    return can_rank, text


def targets(rows, wall_s=None):
    """[(met: bool or None, text)] for the benchmark's targets that the rows (and wall time)
    allow judging; None = not resolved."""
    out = []
    can_rank, _ = context_use(rows)
    pca = {r["k"]: r for r in rows if r["family"] == "pca"}
    spl = {r["k"]: r for r in rows if r["family"] == "splinepca"}
    common = sorted(set(pca) & set(spl))
    if common:
        diffs = {k: paired_difference(spl[k]["per_batch"]["loss"], pca[k]["per_batch"]["loss"]) for k in common}
        worse = [k for k, (d, se) in diffs.items() if verdict(d, se) == "higher"]
        detail = "; ".join(f"k={k}: val loss {d:+.5f} +- {se if se is not None else float('nan'):.5f}"
                           for k, (d, se) in diffs.items())
        text = f"SplinePCA no worse than PCA beyond {NOISE_SE:g} paired SE at every k ({detail})"
        if worse:
            ratios = [spl[k].get("v_mse_ratio") for k in worse]
            mse = ", ".join(f"k={k}: {r:.3f}" for k, r in zip(worse, ratios) if r is not None)
            text += (f"; at k={', '.join(map(str, worse))} the reconstruction-MSE gain does not carry over "
                     f"to perplexity" + (f" (held-out V MSE SplinePCA/PCA {mse})" if mse else ""))
        out.append((None if not can_rank else not worse, text))
    if wall_s is not None:
        target = rows[0]["info"].get("wall_target_s") or WALL_TARGET_S
        out.append((wall_s < target, f"benchmark wall time {wall_s:.1f} s < {target} s for this checkpoint (2 cores)"))
    return out


def _fmt_induction(r, name, digits):
    value, diff, se = r.get(name), r.get(f"{name}_diff"), r.get(f"{name}_diff_se")
    if r["verdict"] == "reference" or diff is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({diff:+.{digits}f} +- {se if se is not None else float('nan'):.{digits}f})"


def format_table(rows, wall_s=None):
    """The context-use line, the markdown table, then one line per target. Pure: rows in, text out."""
    recall = rows[0]["info"]["recall"]
    head = ["method", "V bytes/token/layer", "compression", "val loss",
            "loss diff +- SE" if recall else "ppl change +- SE", "vs full cache"]
    induction = rows[0].get("ind_loss") is not None
    decode = rows[0].get("decode_tok_s") is not None
    head += ["acc (vs full +- SE)", "far acc (vs full +- SE)"] if recall else []
    head += ["induction loss (vs full +- SE)", "induction acc (vs full +- SE)"] if induction else []
    head += (["decode tok/s"] if decode else []) + ["calib s"]
    head += [] if rows[0]["info"].get("pretrained") else ["trained-in loss diff" if recall else "trained-in ppl change"]
    lines = [context_use(rows)[1], "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r["method"], f"{r['v_bytes_per_token']:.1f}", f"{r['compression']:.2f}x", f"{r['val_loss']:.4f}",
                 _fmt_change(r, recall), r["verdict"]]
        cells += [_fmt_acc(r, "acc"), _fmt_acc(r, "acc_far")] if recall else []
        cells += [_fmt_induction(r, "ind_loss", 3), _fmt_induction(r, "ind_acc", 3)] if induction else []
        cells += ([f"{r['decode_tok_s']:.1f}"] if decode else []) + [f"{r['calib_s']:.1f}"]
        cells += [] if r["info"].get("pretrained") else [_fmt_trained(r, recall)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for met, text in targets(rows, wall_s):
        lines.append(f"- {'NOT RESOLVED' if met is None else 'MET' if met else 'NOT MET'}: {text}")
    return "\n".join(lines)


def decode_rates_line(row):
    """A decode-speed row (gpt2/bench/kv_measure.py decode_row) as one progress line's figures."""
    return ", ".join(f"{name} {row[name][1]:,.1f} tok/s"
                     for name in ("V0", "V0 compiled", "V20", "V20 compiled", "PCA compiled", "V22"))


def end_to_end(r, name, batch):
    """Seconds of a whole generate of row r's run `name` (prefill + decode) at `batch`."""
    prefill, rate = r[name]
    return prefill + batch * r["new_tokens"] / rate


def format_decode(speeds, record, shape):
    """The decode-speed section (shape: what the models are, e.g. "the first
    checkpoint's shape (12 layers, ...)"): speeds {(batch, context): {"V0" | "V0 compiled" | "V20" |
    "V20 compiled" | "PCA compiled" | "V22": (prefill s, decode tok/s), "prompt": n, "new_tokens": n}}.
    Returns (markdown, [(met, text)])."""
    lines = ["| batch | context | prompt + new | V0 tok/s | V0 compiled | V20 tok/s | V20 compiled "
             "| V20 compiled / best V0 | PCA compiled / best V0 | V22 tok/s "
             "| eager end to end: V20 / V0, V22 / V0 | prefill s: V0 / V20 / V22 |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    checks = []
    for (batch, context), r in sorted(speeds.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        best_v0 = max(r["V0"][1], r["V0 compiled"][1])
        ratio = r["V20 compiled"][1] / best_v0
        new = r["new_tokens"]
        prompt = r["prompt"]
        eager = {name: end_to_end(r, "V0", batch) / end_to_end(r, name, batch) for name in ("V20", "V22")}
        lines.append(f"| {batch} | {context} | {prompt} + {new} | {r['V0'][1]:.1f} | {r['V0 compiled'][1]:.1f} "
                     f"| {r['V20'][1]:.1f} | {r['V20 compiled'][1]:.1f} | {ratio:.2f}x "
                     f"| {r['PCA compiled'][1] / best_v0:.2f}x | {r['V22'][1]:.1f} "
                     f"| {eager['V20']:.2f}x, {eager['V22']:.2f}x "
                     f"| {r['V0'][0]:.2f} / {r['V20'][0]:.2f} / {r['V22'][0]:.2f} |")
        if context != 1024:
            continue
        if batch in DECODE_TARGETS:
            target = DECODE_TARGETS[batch]
            checks.append((ratio >= target, f"decode at batch {batch}, context 1024: V20 (compiled) "
                           f"{r['V20 compiled'][1]:.1f} tok/s = {ratio:.3f}x the plain cache's best "
                           f"{best_v0:.1f} tok/s (target >= {target}x)"))
        for name in ("V20", "V22") if batch in EAGER_TARGETS else ():
            target = EAGER_TARGETS[batch]
            checks.append((eager[name] >= target, f"eager, batch {batch}, {prompt} + {new} tokens end to end: "
                           f"{name} at {eager[name]:.3f}x the plain cache's tokens/s (target >= {target}x)"))
        for name in ("V20", "V22"):
            slower = r[name][0] / r["V0"][0]
            checks.append((slower <= PREFILL_TARGET, f"prefill of {prompt} tokens at batch {batch}: {name} "
                           f"{r[name][0]:.3f} s = {slower:.2f}x the full prefill's {r['V0'][0]:.3f} s "
                           f"(target <= {PREFILL_TARGET}x)"))
    text = (f"Through `model.generate` (top-k 50, temperature 0.8; each token drawn over the 50 largest logits, "
            f"not the whole vocabulary): decode tokens/s = batch x new tokens / "
            f"the decode time generate reports; the prefill (the prompt) is timed apart, in the last column; "
            f"end to end = the plain cache's prefill + decode time over the method's, both eager. "
            f"Models of {shape} at block_size = context, with random weights "
            f"shared by every run (speed depends on shapes, not on what was learned); V20 = `{record}`, with "
            f"a SplinePCA whose spline is not the identity (fitted on warped samples); PCA = the same "
            f"pruning with that geometry's PCA alone (the identity spline): the same V bytes as V20, so V20 "
            f"against PCA is what the spline's inverse costs a step; V22 = the same pruning with int4 V "
            f"(groups of 32). \"compiled\" = "
            f"`generate(compile=True)`: one torch.compile graph of fixed shapes serves every one-token step, "
            f"captured as a CUDA graph on CUDA (compile time excluded: a short generate runs first). Median of "
            f"the rounds, round-robin over the six runs.\n\n"
            + "\n".join(lines) + "\n\n"
            + "\n".join(f"- {'MET' if met else 'NOT MET'}: {t}" for met, t in checks))
    return text, checks


# ---- outputs -------------------------------------------------------------------

def machine_description(threads):
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch threads {threads}, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")


def notes(rows):
    info = rows[0]["info"]
    pretrained = info.get("pretrained")
    held_out = (f"held-out tokens (the val split of {info['dataset']}, prepared with {pretrained}'s tokenizer)"
                if pretrained else "validation tokens")
    lines = [
        f"- Evaluated tokens: {info['n_eval_tokens']:,} {held_out}, the same seeded batches for every "
        f"method; block_size {info['block_size']}. Perplexity = exp(val loss).",
        f"- V bytes/token/layer: V tensors of a real cache of the method (batch 1, prefilled with "
        f"{info['block_size']} tokens) / (layers x tokens); the reference stores fp32. Keys are kept in full "
        f"by every method except H2O, which evicts K with V.",
        f"- Geometries: V from {info['calib_batches']} TRAINING batches ({info['calib_vectors']:,} vectors per layer, "
        f"collected once), one fit per layer and k; SplinePCA {info['knots']} knots, {info['fit_epochs']} epochs; "
        f"PCA is the same fit with 0 epochs (identity spline). Calib s = collection + that fit.",
        f"- Pruning: {'pruning' if pretrained else 'the checkpoint'}'s keep ratio {info['prune_keep_ratio']:.4f}, "
        f"budget {info['prune_budget']} of {info['block_size']} tokens, recency {info['prune_recency']}. V20 post hoc "
        f"= that pruner + the SplinePCA k={V20_K} geometry (fitted on V of the model with its own V-cache method removed).",
        f"- Quantization: asymmetric per token, groups of {QUANT_GROUP} channels, float16 scale and zero point "
        f"counted in the bytes.",
        f"- H2O: token budget {info['h2o_budget']} = V20 budget x {V20_K} / head_dim (the same number of V "
        f"values), recency {info['h2o_recency']}; evaluated through its cache token by token."
        if info["h2o_budget"] is not None else
        f"- H2O: left out for this model: it has no full-sequence form, so every row would run its cache token "
        f"by token through {info['n_layer']} layers, minutes per row.",
        f"- Decode tok/s: batch 1, prefill {info['decode_prefill']} tokens, then {info['decode_steps']} "
        f"single-token steps through the method's cache; median of {info['decode_repeats']} rounds, "
        f"methods timed round-robin." if info["decode_measured"] else
        "- Decode tok/s: not measured for this model (its single-token steps through every method's cache "
        "would take most of the time budget); the decode-speed section times GPT-2-shaped models only.",
        f"- Statistics: every method is evaluated on the same {info['n_eval_batches']} val batches; ppl change "
        f"+- SE is exp(d) - 1 for the mean per-batch loss difference d to the full cache, with the paired "
        f"standard error of d; 'within noise' means |d| <= {NOISE_SE:g} SE (or below {NOISE_FLOOR:g}, float32 "
        f"rounding of a mean loss). On recall checkpoints the loss on answers is near 0, so the table gives d "
        f"itself instead of a perplexity change. Accuracy differences likewise, per batch.",
        f"- Controls: `random` keeps pruning's budget and recency window but picks the older tokens by a fixed "
        f"hash of position, so with the same codec it holds the same V bytes as the `prune` row; each "
        f"`window N` keeps only the last N tokens' fp32 V, N chosen so it holds the bytes of a `prune` row "
        f"(and N = {info['prune_recency']}, the recency window, for the context-use line).",
    ]
    ind = info.get("induction")
    if ind:
        lines.append(f"- Induction (gpt2/induction.py): {ind['n_batches']} batches x {ind['batch_size']} passages of "
                     f"{ind['length']} random ids from [{ind['low']}, {ind['high']}), each followed by itself; loss "
                     f"and accuracy (argmax) on the second copy, whose every answer lies {ind['length']} tokens "
                     f"back, beyond the recency window {info['prune_recency']}. Differences are paired per batch "
                     f"against the full cache, +- their SE.")
    if info["recall"]:
        lines.append(f"- Recall ({info['dataset']}): loss and accuracy on answer tokens only; far = the answer's "
                     f"token lies at least {info['prune_recency']} tokens back.")
    ratios = {r["k"]: r["v_mse_ratio"] for r in rows if r.get("v_mse_ratio") is not None}
    if ratios:
        lines.append("- Held-out V reconstruction MSE, SplinePCA / PCA (mean over layers; 1 where the fit "
                     "kept the identity spline because the learned one did not beat PCA): "
                     + ", ".join(f"k={k}: {x:.3f}" for k, x in ratios.items()) + ".")
    if pretrained:
        return "\n".join(lines)
    runs = info.get("matrix_runs") or {}
    where = info.get("matrix_dir")
    lines.append(f"- Trained-in: perplexity change of the trained V19 (pruning row) and V20 (pruning + "
                 f"SplinePCA row) runs vs V0 from {where}/[seed*/]V*/summary.json, seeds averaged in val loss; "
                 + (", ".join(f"{s}: {n} run(s)" for s, n in runs.items()) if runs else "none found") + ".")
    return "\n".join(lines)


REGENERATE = "## Regenerate"
REGENERATE_INTRO = ("Each command writes the sections of the checkpoints it names (and, given a GPT-2 checkpoint, the "
                    "decode-speed section) and keeps the others.")


def _split_sections(text):
    """(title, [(heading, body)]): a report cut at its '## ' headings."""
    parts = re.split(r"(?m)^(?=## )", text)
    return parts[0], [(part.partition("\n")[0], part.partition("\n")[2]) for part in parts[1:]]


def _section_key(heading):
    """A checkpoint's section is known by its name alone ('## `smollm2`'), whatever follows it."""
    return heading[:heading.index("`", 4) + 1] if heading.startswith("## `") and "`" in heading[4:] else heading


def merge_report(old, title, sections, command, machine, wrote_by):
    """The report with this run's sections (heading, body) in place of the old ones of the same
    checkpoint, the old report's other sections kept, and its Regenerate list with this
    command (and its machine line) last. An old command is dropped when every section it
    wrote has been written again: wrote_by(command) gives those section keys, or None when
    unknown (the command is kept)."""
    old_sections, entries = [], []
    if old:
        _, old_sections = _split_sections(old)
    new = {_section_key(h): (h, b) for h, b in sections}
    merged = []
    for heading, body in old_sections:
        if heading == REGENERATE:
            entries = re.findall(r"(?m)^    (python scripts/bench_kv\.py.*)\n\n(Machine: .*)$", body)
        else:
            merged.append(new.pop(_section_key(heading), (heading, body)))
    merged += new.values()
    ours = {_section_key(h) for h, _ in sections}
    entries = [(c, m) for c, m in entries if c != command and not (wrote_by(c) or {None}) <= ours]
    entries.append((command, machine))
    regenerate = REGENERATE_INTRO + "\n\n" + "\n\n".join(f"    {c}\n\n{m}" for c, m in entries)
    blocks = [heading + "\n\n" + body.strip("\n") for heading, body in merged + [(REGENERATE, regenerate)]]
    return title.rstrip("\n") + "\n\n" + "\n\n".join(blocks) + "\n"


def write_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    markers = "o^sDvP*Xhp<>d"
    fig, ax = plt.subplots(figsize=(11, 7))
    recall = rows[0]["info"]["recall"]
    metric = "acc_far" if rows[0].get("acc_far") is not None else "acc"  # far: what the V cache must hold
    for i, r in enumerate(rows):
        if recall:
            y, se = r[metric], r.get(f"{metric}_diff_se")
            yerr = None if se is None else 2 * se
        else:
            y, se = r["ppl"], r.get("ppl_change_se_pct")
            yerr = None if se is None else 2 * se / 100 * rows[0]["ppl"]
        ax.errorbar(r["v_bytes_per_token"], y, yerr=yerr, fmt=markers[i % len(markers)], markersize=7, capsize=3,
                    label=r["method"])
        below = r["family"] in ("splinepca", "prune+splinepca")  # PCA and SplinePCA often coincide
        ax.annotate(r["method"], (r["v_bytes_per_token"], y), textcoords="offset points",
                    xytext=(5, -11 if below else 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("V-cache bytes per token per layer (log)")
    what = ("far accuracy" if metric == "acc_far" else "accuracy") if recall else "validation perplexity"
    ax.set_ylabel(f"{what} (bars: +- 2 paired SE vs the full cache)")
    ax.set_title(f"Post-hoc V-cache methods on {rows[0]['info']['dataset']}: {what} vs memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)

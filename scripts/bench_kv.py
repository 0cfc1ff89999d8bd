#!/usr/bin/env python3
"""Post-hoc V-cache compression on a trained checkpoint: quality, memory, speed.

    python scripts/bench_kv.py --ckpt runs/cpu-quickstart/V0/best.pt

The model was trained without compression; each method is put into its
attention afterwards and evaluated on the validation split (the same seeded
batches for every method):

    none                   the reference: fp32 V for every token
    PCA k / SplinePCA k    KVSplice geometries fitted on V collected from the
                           TRAINING split (never the evaluated tokens)
    prune                  V-only pruning, keep ratio 0.382 (391 of 1024), the
                           model's own budget rule (lib/kv_pruning.py)
    prune + SplinePCA16    the V20 configuration, applied post hoc
    int8 / int4 V          KIVI-style per-token quantization, groups of 32,
                           float16 scale and zero point stored in the cache
    H2O K+V                heavy-hitter eviction of K and V, token budget
                           chosen so its V cache holds as many values as V20's

Columns, and what each is measured from:
    V bytes/token/layer    a real cache of that method, prefilled with
                           block_size tokens (batch 1): its V tensors' bytes /
                           (n_layer * block_size); the reference is fp32
    compression            reference bytes / method bytes
    val loss, perplexity   mean next-token cross entropy on the val batches;
                           perplexity = exp(val loss). Geometry, pruning and
                           quantization act per V vector, so the full forward
                           with V through decode(encode(v)) equals decoding
                           through the cache (tests/test_calibrate.py for the
                           geometry and pruning, tests/test_bench_kv.py for the
                           quantizer); H2O has no such equivalent and runs
                           through its cache token by token
    decode tok/s           batch 1: prefill block_size/2 tokens into the
                           method's real cache, then time --decode-steps
                           single-token steps; --decode-repeats rounds over all
                           methods (round-robin), median per method
    calib s                V collection + fit (geometry methods), else 0
    trained-in             perplexity change of the trained-in ablation runs
                           (V19 vs V0, V20 vs V0) under --matrix, if they exist

Writes --out-md (docs/benchmarks.md: table, targets, command, machine) and
--out-png (docs/kv_pareto.png: perplexity vs V bytes per token).
"""

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2.calibrate import KVSpliceCalibrator, geometry_modules  # noqa: E402
from gpt2.data import TokenData  # noqa: E402
from gpt2.kv_cache import KVCache  # noqa: E402
from gpt2.model import GPT, load_checkpoint  # noqa: E402
from lib.atomic import atomic_write, atomic_write_text  # noqa: E402
from lib.kv_baselines import H2OLayerCache, VQuantizer  # noqa: E402
from lib.kv_pruning import KEEP_RATIO, VOnlyPruner  # noqa: E402

V20_K = 16  # the V20 configuration's latent dims per head
DEFAULT_KS = (8, 16, 32)
QUANT_GROUP = 32
EVAL_SEED_SALT = 7919  # val batches are drawn with the checkpoint's seed + this
CALIB_SEED_SALT = 104729  # train batches for calibration, as gpt2.calibrate does
DECODE_TARGET = 0.8  # V20 decode tokens/s relative to the uncompressed cache
WALL_TARGET_S = 600


class QuantCodec(nn.Module):
    """A VQuantizer in the shape of a KVSplice geometry (compress / decompress /
    roundtrip), so the attention's full-sequence path and model.make_cache()
    both use it. A Module because attn.kvsplice is a registered child."""

    def __init__(self, bits, group_size=QUANT_GROUP):
        super().__init__()
        self.quant = VQuantizer(bits, group_size)

    def compress(self, v):
        return self.quant.encode(v)  # uint8, scale and zero point included

    def decompress(self, packed):
        return self.quant.decode(packed)

    def roundtrip(self, v):
        return self.quant.decode(self.quant.encode(v)).to(v.dtype)


@dataclass
class Method:
    name: str
    family: str                # none, pca, splinepca, prune, prune+splinepca, int8, int4, h2o
    k: int = None              # latent dims (geometry methods)
    pruner: VOnlyPruner = None
    codecs: list = None        # one per layer: what V passes through (geometry or quantizer)
    h2o: tuple = None          # (budget, recency): evaluated through H2OLayerCache only
    calib_s: float = 0.0
    v_mse_ratio: float = None  # held-out V MSE, SplinePCA / PCA fit on the same rows (mean over layers)


def apply_method(model, method):
    """Put the method's pruner and V codec into every attention layer."""
    for i, block in enumerate(model.transformer.h):
        block.attn.pruner = method.pruner
        block.attn.kvsplice = None if method.codecs is None else method.codecs[i]


def make_cache(model, method):
    """The method's real decode cache (apply_method first)."""
    if method.h2o is not None:
        budget, recency = method.h2o
        return KVCache(model.config.n_layer, lambda i: H2OLayerCache(budget, recency))
    return model.make_cache()


@torch.no_grad()
def eval_loss(model, method, batches):
    """Mean cross entropy over the (x, y) batches, all of the same shape."""
    losses = []
    for x, y in batches:
        if method.h2o is not None:  # no full-forward equivalent: through the cache, token by token
            _, loss = model(x, y, caches=make_cache(model, method))
        else:
            _, loss = model(x, y)
        losses.append(float(loss))
    return sum(losses) / len(losses)


@torch.no_grad()
def v_bytes_per_token(model, method, tokens):
    """V bytes per token per layer of a real cache prefilled with tokens (1, T)."""
    cache = make_cache(model, method)
    model(tokens, caches=cache)
    return cache.nbytes()["v"] / (len(cache) * tokens.size(1))


@torch.no_grad()
def decode_tokens_per_s(model, method, tokens, prefill, steps):
    """Tokens/s of `steps` single-token steps after a `prefill`-token prompt (batch 1)."""
    cache = make_cache(model, method)
    model(tokens[:, :prefill], caches=cache)
    t0 = time.perf_counter()
    for t in range(prefill, prefill + steps):
        model(tokens[:, t:t + 1], caches=cache)
    return steps / (time.perf_counter() - t0)


def decode_rates(model, methods, tokens, prefill, steps, repeats):
    """Median decode tokens/s per method, timed round-robin: a drift in machine
    speed (other load, clocks) then hits every method alike, not whichever
    happened to run during it."""
    rates = {m.name: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            apply_method(model, m)
            rates[m.name].append(decode_tokens_per_s(model, m, tokens, prefill, steps))
    apply_method(model, methods[0])
    return {name: statistics.median(r) for name, r in rates.items()}


def fit_geometry(cal, k, spline, knots, epochs, lr, seed):
    """Fit one geometry per layer from the calibrator's samples; (modules, seconds, mse ratio).

    PCA is `fit(..., epochs=0)`: SplinePCA.fit places the knots and resets the
    spline to the identity, runs no Adam epoch, and with the identity's
    held-out MSE equal to PCA's it keeps the identity (it keeps a learned
    spline only if it beats PCA by MIN_RELATIVE_GAIN), then fits the PCA on
    spline(X) = X. So the result is exactly plain PCA.
    """
    cal.k = k  # every (method, k) is fitted from the same collected samples
    with contextlib.redirect_stdout(io.StringIO()):  # one progress line per fit, not per layer
        geometry = cal.fit(knots=knots, epochs=epochs if spline else 0, lr=lr, seed=seed)
    layers = geometry["fit_stats"]["layers"]
    # a learned spline that did not beat PCA was replaced by the identity: ratio 1 there
    ratio = statistics.mean(s["spline_val_mse"] / max(s["pca_val_mse"], 1e-30) if s["kept_spline"] else 1.0
                            for s in layers)
    return geometry_modules(geometry, cal.model.config), geometry["fit_stats"]["seconds"], ratio, layers


def trained_in_changes(matrix_dir):
    """Perplexity change % of the trained-in V19 and V20 runs vs V0 under matrix_dir.

    Reads DIR/<step>/summary.json and DIR/seed*/<step>/summary.json; seeds of a
    step are averaged in val loss, so the change is exp(mean L_step - mean L_V0) - 1.
    Returns ({"V19": pct or None, "V20": pct or None}, {step: number of runs}).
    """
    losses = {}
    if matrix_dir is not None and Path(matrix_dir).is_dir():
        d = Path(matrix_dir)
        for step in ("V0", "V19", "V20"):
            for path in [d / step / "summary.json", *sorted(d.glob(f"seed*/{step}/summary.json"))]:
                if path.is_file():
                    losses.setdefault(step, []).append(float(json.loads(path.read_text())["final_val_loss"]))
    out = {}
    for step in ("V19", "V20"):
        if "V0" in losses and step in losses:
            delta = statistics.mean(losses[step]) - statistics.mean(losses["V0"])
            out[step] = 100.0 * math.expm1(delta)
        else:
            out[step] = None
    return out, {s: len(v) for s, v in losses.items()}


def _log(msg):
    print(msg, flush=True)


def run_benchmark(ckpt_path, ks=DEFAULT_KS, eval_batches=20, batch_size=8, calib_batches=8,
                  decode_steps=None, decode_repeats=5, matrix_dir=None, data_dir=None,
                  fit_epochs=None, seed=None, log=_log):
    """Evaluate every method on the checkpoint; returns one dict per method (the table's rows)."""
    t_start = time.perf_counter()
    ckpt = load_checkpoint(ckpt_path)
    args = ckpt.get("args") or {}
    model = GPT.from_checkpoint_state(ckpt)  # apply_method replaces its pruner and geometry per method
    model.eval()
    cfg = model.config
    bs, hd = cfg.block_size, cfg.head_dim
    if cfg.kv_prune or ckpt.get("kvsplice") is not None:
        log(f"[bench] note: {ckpt_path} was trained with pruning/KVSplice; they are removed for the "
            f"reference and applied post hoc like every other method")
    ks = sorted(set(int(k) for k in ks))
    bad = [k for k in ks if not 1 <= k <= hd]
    if bad:
        raise ValueError(f"--ks: every k must be in [1, head_dim = {hd}], found {bad}")
    if V20_K > hd:
        raise ValueError(f"the V20 row needs k = {V20_K} <= head_dim, but head_dim is {hd}")
    prefill = bs // 2
    decode_steps = bs - prefill if decode_steps is None else decode_steps
    if not 1 <= decode_steps <= bs - prefill:
        raise ValueError(f"--decode-steps must be in [1, block_size - block_size/2 = {bs - prefill}], "
                         f"found {decode_steps}")
    for name, value in (("--eval-batches", eval_batches), ("--batch-size", batch_size),
                        ("--calib-batches", calib_batches), ("--decode-repeats", decode_repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, found {value}")
    data_dir = data_dir or args.get("data_dir")
    dataset = args.get("dataset")
    if data_dir is None or dataset is None:
        raise ValueError(f"{ckpt_path}: its args name no data_dir/dataset; pass --data-dir")
    data = TokenData(data_dir, dataset)
    data.check_block_size(bs)
    if data.vocab_size > cfg.vocab_size:
        raise ValueError(f"data at {data.dir} has vocab_size {data.vocab_size}, the model {cfg.vocab_size}")
    seed = args.get("seed", 1337) if seed is None else seed

    # the same val batches for every method; decode/bytes use the first row
    val = [data.get_batch("val", batch_size, bs, seed + EVAL_SEED_SALT, 0, j) for j in range(eval_batches)]
    row0 = val[0][0][:1]  # (1, block_size)

    # calibration: collect V once on TRAINING batches, fit every (method, k) from those samples
    log(f"[bench] {ckpt_path}: {cfg.n_layer} layers, {cfg.n_head} heads, head_dim {hd}, block {bs}; "
        f"{eval_batches} val batches x {batch_size} x {bs} tokens")
    knots = int(args.get("kvsplice_knots", 7))
    epochs = int(args.get("kvsplice_epochs", 8) if fit_epochs is None else fit_epochs)
    lr = float(args.get("kvsplice_lr", 2e-3))
    t0 = time.perf_counter()
    cal = KVSpliceCalibrator(model, max(ks + [V20_K]), int(args.get("kvsplice_samples", 120000)), seed=seed)
    with contextlib.redirect_stdout(io.StringIO()):
        cal.collect(data.get_batch("train", batch_size, bs, seed + CALIB_SEED_SALT, 0, j)[0]
                    for j in range(calib_batches))
    collect_s = time.perf_counter() - t0
    log(f"[bench] collected {cal.samples[0].shape[0]:,} V vectors per layer from {calib_batches} train "
        f"batches in {collect_s:.1f}s")

    methods = [Method("none", "none")]
    spline16 = None
    for spline in (False, True):
        for k in sorted(set(ks + ([V20_K] if spline else []))):
            family = "splinepca" if spline else "pca"
            mods, fit_s, ratio, layers = fit_geometry(cal, k, spline, knots, epochs, lr, seed)
            label = "SplinePCA" if spline else "PCA"
            kept = sum(s["kept_spline"] for s in layers)
            log(f"[bench] fit {label} k={k}: {fit_s:.1f}s, held-out V MSE SplinePCA/PCA {ratio:.3f}"
                + (f", learned spline kept in {kept}/{len(layers)} layers" if spline else ""))
            m = Method(f"{label} k={k}", family, k, codecs=mods, calib_s=collect_s + fit_s,
                       v_mse_ratio=ratio if spline else None)
            if spline and k == V20_K:
                spline16 = m
            if k in ks:
                methods.append(m)

    k_min = int(args.get("kv_prune_k_min", cfg.kv_prune_k_min))
    recency = int(args.get("kv_prune_recency", cfg.kv_prune_recency))
    pruner = VOnlyPruner(KEEP_RATIO, k_min, recency, bs)
    methods.append(Method(f"prune {KEEP_RATIO:.3f} ({pruner.budget}/{bs})", "prune", pruner=pruner))
    # V20 post hoc: the SplinePCA k=16 geometry (same samples, same fit) behind the pruner
    methods.append(Method(f"prune + SplinePCA k={V20_K}", "prune+splinepca", V20_K, pruner=pruner,
                          codecs=spline16.codecs, calib_s=spline16.calib_s))
    for bits in (8, 4):
        codec = QuantCodec(bits)
        methods.append(Method(f"int{bits} V (g{QUANT_GROUP})", f"int{bits}", codecs=[codec] * cfg.n_layer))
    # equal V budget: V20 holds budget x 16 latent values per head, H2O full head_dim V
    h2o_budget = max(1, pruner.budget * V20_K // hd)
    h2o_recency = max(1, h2o_budget // 2)
    methods.append(Method(f"H2O K+V ({h2o_budget} tok)", "h2o", h2o=(h2o_budget, h2o_recency)))

    trained, n_runs = trained_in_changes(matrix_dir)
    if n_runs:
        log(f"[bench] trained-in runs under {matrix_dir}: " + ", ".join(f"{s} x{n}" for s, n in n_runs.items()))

    rows = []
    for m in methods:
        apply_method(model, m)
        t0 = time.perf_counter()
        nbytes = v_bytes_per_token(model, m, row0)
        loss = eval_loss(model, m, val)
        row = {"method": m.name, "family": m.family, "k": m.k, "v_bytes_per_token": nbytes,
               "val_loss": loss, "ppl": math.exp(loss), "calib_s": m.calib_s,
               "trained_in_pct": {"prune": trained["V19"], "prune+splinepca": trained["V20"]}.get(m.family),
               "v_mse_ratio": m.v_mse_ratio}
        ref = rows[0] if rows else row
        row["compression"] = ref["v_bytes_per_token"] / nbytes
        row["ppl_change_pct"] = 100.0 * (row["ppl"] / ref["ppl"] - 1.0)
        rows.append(row)
        log(f"[bench] {m.name:<24} V {nbytes:8.1f} B/token/layer ({row['compression']:5.2f}x)  "
            f"loss {loss:.4f}  ppl {row['ppl']:9.3f} ({row['ppl_change_pct']:+.2f}%)  "
            f"calib {m.calib_s:5.1f}s  [{time.perf_counter() - t0:.1f}s]")
    log(f"[bench] decode speed: {decode_repeats} round(s) over all methods, {decode_steps} steps each")
    rates = decode_rates(model, methods, row0, prefill, decode_steps, decode_repeats)
    for row in rows:
        row["decode_tok_s"] = rates[row["method"]]
        log(f"[bench] {row['method']:<24} decode {row['decode_tok_s']:7.1f} tok/s")
    apply_method(model, methods[0])

    info = {"n_eval_tokens": eval_batches * batch_size * bs, "block_size": bs, "prune_budget": pruner.budget,
            "prune_recency": recency, "h2o_budget": h2o_budget, "h2o_recency": h2o_recency,
            "decode_prefill": prefill, "decode_steps": decode_steps, "decode_repeats": decode_repeats,
            "calib_vectors": cal.samples[0].shape[0], "calib_batches": calib_batches, "fit_epochs": epochs,
            "knots": knots, "matrix_dir": str(matrix_dir) if matrix_dir else None, "matrix_runs": n_runs,
            "seconds": time.perf_counter() - t_start}
    for row in rows:
        row["info"] = info
    return rows


# ---- the table ----------------------------------------------------------------

def _fmt_pct(x):
    return "n/a" if x is None else f"{x:+.2f}%"


def targets(rows, wall_s=None):
    """[(met: bool, text)] for the benchmark's targets that the rows (and wall time) allow judging."""
    out = []
    pca = {r["k"]: r for r in rows if r["family"] == "pca"}
    spl = {r["k"]: r for r in rows if r["family"] == "splinepca"}
    common = sorted(set(pca) & set(spl))
    if common:
        worse = [k for k in common if spl[k]["ppl"] > pca[k]["ppl"]]
        detail = "; ".join(f"k={k}: {spl[k]['ppl']:.3f} vs {pca[k]['ppl']:.3f} "
                           f"({100 * (spl[k]['ppl'] / pca[k]['ppl'] - 1):+.4f}%)" for k in common)
        text = f"SplinePCA perplexity <= PCA perplexity at every k ({detail})"
        if worse:
            ratios = [spl[k].get("v_mse_ratio") for k in worse]
            mse = ", ".join(f"k={k}: {r:.3f}" for k, r in zip(worse, ratios) if r is not None)
            text += (f"; at k={', '.join(map(str, worse))} the reconstruction-MSE gain does not carry over "
                     f"to perplexity" + (f" (held-out V MSE SplinePCA/PCA {mse})" if mse else ""))
        out.append((not worse, text))
    if wall_s is not None:
        out.append((wall_s < WALL_TARGET_S,
                    f"whole benchmark wall time {wall_s:.1f} s < {WALL_TARGET_S} s (2 cores, quick-start checkpoint)"))
    ref = next((r for r in rows if r["family"] == "none"), None)
    v20 = next((r for r in rows if r["family"] == "prune+splinepca"), None)
    if ref and v20:
        ratio = v20["decode_tok_s"] / ref["decode_tok_s"]
        out.append((ratio >= DECODE_TARGET,
                    f"decode at V20 settings {v20['decode_tok_s']:.1f} tok/s = {ratio:.2f}x the uncompressed "
                    f"cache's {ref['decode_tok_s']:.1f} tok/s (target >= {DECODE_TARGET}x)"))
    return out


def format_table(rows, wall_s=None):
    """The markdown table, then one MET / NOT MET line per target. Pure: rows in, text out."""
    head = ["method", "V bytes/token/layer", "compression", "val loss", "perplexity", "ppl change",
            "decode tok/s", "calib s", "trained-in ppl change"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r["method"], f"{r['v_bytes_per_token']:.1f}", f"{r['compression']:.2f}x", f"{r['val_loss']:.4f}",
                 f"{r['ppl']:.3f}", _fmt_pct(r["ppl_change_pct"]), f"{r['decode_tok_s']:.1f}",
                 f"{r['calib_s']:.1f}", _fmt_pct(r.get("trained_in_pct"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for met, text in targets(rows, wall_s):
        lines.append(f"- {'MET' if met else 'NOT MET'}: {text}")
    return "\n".join(lines)


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
    lines = [
        f"- Evaluated tokens: {info['n_eval_tokens']:,} validation tokens, the same seeded batches for every "
        f"method; block_size {info['block_size']}. Perplexity = exp(val loss).",
        f"- V bytes/token/layer: V tensors of a real cache of the method (batch 1, prefilled with "
        f"{info['block_size']} tokens) / (layers x tokens); the reference stores fp32. Keys are kept in full "
        f"by every method except H2O, which evicts K with V.",
        f"- Geometries: V from {info['calib_batches']} TRAINING batches ({info['calib_vectors']:,} vectors per layer, "
        f"collected once), one fit per layer and k; SplinePCA {info['knots']} knots, {info['fit_epochs']} epochs; "
        f"PCA is the same fit with 0 epochs (identity spline). Calib s = collection + that fit.",
        f"- Pruning: keep ratio {KEEP_RATIO:.4f}, budget {info['prune_budget']} of {info['block_size']} tokens, "
        f"recency {info['prune_recency']}. V20 post hoc = that pruner + the SplinePCA k={V20_K} geometry "
        f"(fitted on V of the unpruned model).",
        f"- Quantization: asymmetric per token, groups of {QUANT_GROUP} channels, float16 scale and zero point "
        f"counted in the bytes.",
        f"- H2O: token budget {info['h2o_budget']} = V20 budget x {V20_K} / head_dim (the same number of V "
        f"values), recency {info['h2o_recency']}; evaluated through its cache token by token.",
        f"- Decode tok/s: batch 1, prefill {info['decode_prefill']} tokens, then {info['decode_steps']} "
        f"single-token steps through the method's cache; median of {info['decode_repeats']} rounds, "
        f"methods timed round-robin.",
    ]
    ratios = [(r["k"], r["v_mse_ratio"]) for r in rows if r.get("v_mse_ratio") is not None]
    if ratios:
        lines.append("- Held-out V reconstruction MSE, SplinePCA / PCA (mean over layers; 1 where the fit "
                     "kept the identity spline because the learned one did not beat PCA): "
                     + ", ".join(f"k={k}: {x:.3f}" for k, x in ratios) + ".")
    runs = info.get("matrix_runs") or {}
    where = info.get("matrix_dir")
    lines.append(f"- Trained-in: perplexity change of the trained V19 (pruning row) and V20 (pruning + "
                 f"SplinePCA row) runs vs V0 from {where}/[seed*/]V*/summary.json, seeds averaged in val loss; "
                 + (", ".join(f"{s}: {n} run(s)" for s, n in runs.items()) if runs else "none found") + ".")
    return "\n".join(lines)


def write_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    markers = "o^sDvP*Xhp<>d"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, r in enumerate(rows):
        ax.scatter(r["v_bytes_per_token"], r["ppl"], marker=markers[i % len(markers)], s=60, label=r["method"])
        below = r["family"] in ("splinepca", "prune+splinepca")  # PCA and SplinePCA often coincide
        ax.annotate(r["method"], (r["v_bytes_per_token"], r["ppl"]), textcoords="offset points",
                    xytext=(5, -11 if below else 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("V-cache bytes per token per layer (log)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Post-hoc V-cache compression: perplexity vs memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="training checkpoint (best.pt / last.pt)")
    ap.add_argument("--out-md", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--out-png", default=str(ROOT / "docs" / "kv_pareto.png"))
    ap.add_argument("--eval-batches", type=int, default=20, help="validation batches (same for every method)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per eval / calibration batch")
    ap.add_argument("--calib-batches", type=int, default=8,
                    help="training batches whose V the geometries are fitted on")
    ap.add_argument("--decode-steps", type=int, default=None,
                    help="timed single-token decode steps (default and at most: block_size/2)")
    ap.add_argument("--decode-repeats", type=int, default=5,
                    help="rounds of decode timing over all methods; the median per method is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="latent dims for the PCA / SplinePCA rows")
    ap.add_argument("--fit-epochs", type=int, default=None, help="SplinePCA fit epochs (default: the checkpoint's)")
    ap.add_argument("--matrix", default=None,
                    help="ablation matrix dir for the trained-in column (default: the checkpoint's run dir's parent)")
    ap.add_argument("--data-dir", default=None, help="prepared data dir (default: the checkpoint's)")
    args = ap.parse_args(argv)
    try:
        args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        ap.error(f"--ks expects comma-separated integers, found {args.ks!r}")
    if not args.ks:
        ap.error("--ks is empty")
    return args


def main(argv=None):
    """Run the benchmark, print the table and targets, write the md and png; returns the rows."""
    t_start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    matrix = Path(args.matrix) if args.matrix else Path(args.ckpt).resolve().parent.parent
    rows = run_benchmark(args.ckpt, ks=args.ks, eval_batches=args.eval_batches, batch_size=args.batch_size,
                         calib_batches=args.calib_batches, decode_steps=args.decode_steps,
                         decode_repeats=args.decode_repeats, matrix_dir=matrix, data_dir=args.data_dir,
                         fit_epochs=args.fit_epochs)
    wall_s = time.perf_counter() - t_start
    table = format_table(rows, wall_s=wall_s)
    print("\n" + table + f"\n\nwall time {wall_s:.1f} s", flush=True)
    command = "python scripts/bench_kv.py " + shlex.join(argv)
    doc = (f"# KV-cache benchmark: post-hoc V compression\n\n"
           f"Checkpoint `{args.ckpt}`, trained without compression; every method applied after training.\n\n"
           f"{table}\n\n## How each number is measured\n\n{notes(rows)}\n\n"
           f"## Regenerate\n\n    {command}\n\n"
           f"Machine: {machine_description(torch.get_num_threads())}. Wall time {wall_s:.1f} s.\n")
    write_plot(rows, args.out_png)
    atomic_write_text(args.out_md, doc)
    print(f"wrote {args.out_md} and {args.out_png}")
    return rows


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        print(f"bench_kv: error: {e}", file=sys.stderr)
        sys.exit(2)

"""The V-cache frontier on SmolLM2, post hoc: at 2, 2.5, 3 and 4 bits per V
dimension (every byte counted: codes, scales, exact tokens), which codec
family costs the least perplexity, and where the KVSplice geometry lands.

    python scripts/frontier.py                    # contexts 512 and 2048, the sampled grid below
    python scripts/frontier.py --contexts 512 --eval-tokens 8192

A budget is bytes per V vector, bits per dimension x head_dim / 8 (SmolLM2:
64 dims, so 16 / 20 / 24 / 32 bytes; bf16 V holds 128). A row's bytes are
its method's v_bytes at the row's context in bf16, averaged over the tokens:
exact tokens (sinks, a window) count 2 bytes per dimension, the rest the
codec's. Each family takes the most bytes that fit the budget:

    int           KIVI-style per-token int-b, a scale and zero point per group (int2 in
                  groups of 64 is 20 bytes, of 32 24, int3 32); coarse, so some budgets
                  hold none
    rotated int   the same after a seeded Hadamard rotation (QuaRot)
    turbo         transform: random rotation, equal bits, an fp16 scale (TurboQuant's shape)
    kvtc          transform: the fitted PCA basis, bits allocated by dynamic programming
    pca basis     transform: the fitted PCA basis as the rotation, equal bits
    spline kvtc   kvtc after KVSplice's fitted spline (one spline fit shared by every
    spline turbo  spline row), and turbo after it
    PCA k         truncation to k dims of an fp16 latent (2k bytes)
and each of the first four may read exact tokens: `+ sinks` (the first 4)
or `+ sinks + window` (and each query's last context/32: 16 at 512, 64 at
2048), the codec's bits lowered to pay for them. The controls hold as many
bytes of exact V: a sliding window, and random keep with a recency window.

The grid is sampled to fit 15 minutes on 2 cores (`--grid default`, GRIDS
says which family and exact tokens run at which context and budget):
    - at every budget, the contenders: int, rotated int (every exact variant
      that fits), turbo and kvtc with sinks and window, the window control,
      and at 512 the random control;
    - at 2.5 bits and context 512 (the goal's budget), the geometry's
      questions too: turbo and kvtc without exact tokens, kvtc with sinks,
      pca basis, both spline rows and PCA k; PCA k=16 (the seed's 64 -> 16)
      at 4 bits;
    - at 2048, 2 and 2.5 bits only, no random control.
`--grid wide` runs every family at every budget at 512 (72 rows, about 25
minutes). Perplexity is paired over units of 512 tokens (at 2048, each
sequence's four quarters): each row against the full cache and against the
best row of its budget, with the standard error of the paired difference.
Induction accuracy (gpt2/induction.py, passages of context/2 tokens, at most
512) likewise, per batch.
"""

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2.atomic import atomic_write_text
from gpt2.bench.kv_bench import ensure_data
from gpt2.bench.kv_measure import eval_data, v_bytes_per_token, v_heads
from gpt2.bench.kv_methods import BenchMethod, fit_codec
from gpt2.bench.kv_report import machine_description
from gpt2.bench.kv_source import PRETRAINED, open_source
from gpt2.calibrate import MAX_SAMPLES, calibration_batches, collect, quiet
from gpt2.cli import GEOMETRY_FIT
from gpt2.cpu import configure_cpu
from gpt2.entry import ArgumentParser
from gpt2.induction import induction_batches, induction_scores
from gpt2.pretrained import SMOLLM2, load_pretrained
from gpt2.stats import paired_difference, verdict
from lib.vcache import CODECS, FULL, build_method, full_record

BITS_PER_DIM = (2, 2.5, 3, 4)
UNIT = 512  # tokens per paired unit (--unit): every context a multiple of it
SINKS = 4
EXACT_BYTES = 2  # per dimension of an exact V (bf16)
CONTROLS = ("window", "random")
INDUCTION_PASSAGE = 512  # the longest induction passage (tokens); a context's passages are context/2 up to it

# context -> budget (bits per dimension) -> family -> its exact-token variants ("": none); the
# controls are families with the one variant "". A context not listed takes 512's grid.
EXACT = ("", "sinks", "sinks+window")
CONTENDERS = {"window": ("",), "random": ("",), "int": ("",), "rotated int": EXACT,
              "turbo": ("sinks+window",), "kvtc": ("sinks+window",)}
GEOMETRY = {"turbo": ("", "sinks+window"), "kvtc": EXACT, "pca basis": ("",), "spline kvtc": ("sinks",),
            "spline turbo": ("",), "PCA k": ("",)}
LONG = {"window": ("",), "int": ("",), "turbo": ("sinks+window",), "kvtc": ("sinks+window",)}
WIDE_512 = {"window": ("",), "random": ("",), "int": ("",), "rotated int": EXACT, "turbo": EXACT, "kvtc": EXACT,
            "pca basis": ("",), "spline kvtc": ("sinks",), "spline turbo": ("",), "PCA k": ("",)}
WIDE_2048 = {"window": ("",), "random": ("",), "int": ("",), "rotated int": ("sinks",),
             "turbo": ("sinks", "sinks+window"), "kvtc": ("sinks", "sinks+window")}
GRIDS = {
    "default": {512: {2: CONTENDERS, 2.5: {**CONTENDERS, **GEOMETRY}, 3: CONTENDERS,
                      4: {**CONTENDERS, "PCA k": ("",)}},
                2048: {2: LONG, 2.5: LONG}},
    "wide": {512: {bits: WIDE_512 for bits in BITS_PER_DIM}, 2048: {bits: WIDE_2048 for bits in (2, 2.5)}},
}


def int_codec(nbytes, hd):
    """The int-b record with the most bytes <= nbytes (bits 2, 3, 4, 8; groups dividing hd), or
    None; of two at the same bytes, the one with more bits (int3 in groups of 32, not int2 in 16)."""
    best = None
    for bits in (2, 3, 4, 8):
        for group in sorted({g for g in (hd, 64, 32, 16) if hd % g == 0}, reverse=True):
            size = hd * bits // 8 + 4 * hd // group
            if size <= nbytes and (best is None or (size, bits) > best[:2]):
                best = (size, bits, {"kind": "int", "bits": bits, "group_size": group})
    return None if best is None else best[2]


def transform_codec(nbytes, hd, **settings):
    code = nbytes - 2  # the fp16 scale
    if code < 1 or code * 8 > 8 * hd:
        return None
    bits = code * 8 / hd
    return {"kind": "transform", "bits": int(bits) if bits == int(bits) else bits, **settings}


def truncation(nbytes, hd):
    k = nbytes // 2  # an fp16 latent
    return {"kind": "pca", "k": k} if 1 <= k < hd else None


def rotated_int_codec(nbytes, hd):
    inner = int_codec(nbytes, hd)
    return None if inner is None else {"kind": "rotated", "inner": inner}


FAMILIES = {
    "int": int_codec,
    "rotated int": rotated_int_codec,
    "turbo": lambda n, hd: transform_codec(n, hd, basis="hadamard", allocate="equal"),
    "kvtc": lambda n, hd: transform_codec(n, hd, basis="pca", allocate="variance"),
    "pca basis": lambda n, hd: transform_codec(n, hd, basis="pca", allocate="equal"),
    "spline kvtc": lambda n, hd: transform_codec(n, hd, basis="pca", allocate="variance", spline=True),
    "spline turbo": lambda n, hd: transform_codec(n, hd, basis="hadamard", allocate="equal", spline=True),
    "PCA k": truncation,
}


@dataclass
class Row:
    context: int
    bits: float          # the budget, bits per dimension
    family: str
    exact: str           # "", "sinks", "sinks+window", or the control's kind
    record: dict
    bytes: float = None  # per V vector at the context, bf16 accounting
    units: list = field(default_factory=list)      # mean loss per paired unit of tokens
    induction: list = field(default_factory=list)  # accuracy per induction batch

    @property
    def name(self):
        select = self.record["select"]
        if self.family in CONTROLS:
            return f"{self.family} {select.get('window', select.get('k_min'))} tok"
        if self.family == "PCA k":
            return f"PCA k={self.record['codec']['k']}"
        return self.family + "".join(f" + {p}" for p in self.exact.split("+") if p)


def exact_select(exact, context):
    if exact == "":
        return FULL["select"]
    return {"kind": "sinks", "sinks": SINKS, "window": context // 32 if exact == "sinks+window" else 0}


def exact_tokens(select, context):
    return 0 if select["kind"] == "full" else min(context, select["sinks"] + select["window"])


def plan(contexts, hd, block_size, families=None, budgets=None, grid="default"):
    """[Row] of the grid, records only: the reference, then at each budget the controls and every
    family that fits it (the model's block_size sizes random keep's budget). `families` keeps only
    those (the reference and controls always run); `budgets` (bits per dimension) replaces the
    grid's, a budget it does not list running every family and variant the context lists."""
    rows = []
    for T in contexts:
        at = GRIDS[grid].get(T, GRIDS[grid][512])
        union = {}
        for spec in at.values():
            for family, variants in spec.items():
                union[family] = tuple(dict.fromkeys(union.get(family, ()) + variants))
        rows.append(Row(T, 16, "full V", "", FULL))
        for bits in budgets or at:
            budget = bits * hd / 8
            n = int(budget * T // (hd * EXACT_BYTES))  # tokens of exact V the budget holds
            spec = at.get(bits, union)
            for control in (c for c in CONTROLS if c in spec):
                select = {"kind": "window", "window": n} if control == "window" else \
                    {"kind": "random", "keep_ratio": n / block_size, "k_min": n, "recency": max(1, n // 4), "seed": 0}
                rows.append(Row(T, bits, control, control, {"select": select, "codec": FULL["codec"]}))
            for family, variants in spec.items():
                if family in CONTROLS or (families is not None and family not in families):
                    continue
                for exact in variants:
                    select = exact_select(exact, T)
                    e = exact_tokens(select, T)
                    codec = FAMILIES[family](int((budget * T - e * hd * EXACT_BYTES) // (T - e)), hd)
                    if codec is not None:
                        rows.append(Row(T, bits, family, exact, {"select": select, "codec": codec}))
    return rows


def fit_all(model, cal, rows, epochs, lr, seed, log):
    """({json of a codec record: per-layer states}, notes for the report): every distinct
    fitted codec of the rows fitted once from the same samples; the spline rows share one spline fit."""
    fits, warps, notes = {}, None, []
    for row in rows:
        codec = row.record["codec"]
        key = json.dumps(codec, sort_keys=True)
        if key in fits or not CODECS[codec["kind"]].needs_fit:
            continue
        t0 = time.perf_counter()
        if codec.get("spline") and warps is not None:
            model.set_v_cache({"select": FULL["select"], "codec": codec})
            for i, c in enumerate(model.v_codecs()):
                c.fit(cal.samples[i], seed=seed + i, warp=warps[i])
            fits[key] = [{n: t.clone() for n, t in c.state_dict().items()} for c in model.v_codecs()]
        else:
            fits[key], _, layers = fit_codec(cal, codec, epochs, lr, seed)
            if codec.get("spline"):
                warps = [{n[len("warp."):]: t for n, t in s.items() if n.startswith("warp.")} for s in fits[key]]
                kept = sum(s["kept_spline"] for s in layers)
                notes.append(f"The spline rows share one spline per layer, fitted as SplinePCA k="
                             f"{codec.get('spline_k', 16)} for {epochs} epochs: it beat plain PCA on held-out V in "
                             f"{kept} of {len(layers)} layers; the others keep the identity spline.")
                log(f"[frontier] {notes[-1]}")
        log(f"[frontier] fit {key}: {time.perf_counter() - t0:.1f}s")
    return fits, notes


@torch.no_grad()
def unit_losses(model, batches, unit):
    """Mean next-token loss per `unit` tokens of every sequence, in order."""
    out = []
    for x, y in batches:
        logits, _ = model(x, y)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view(y.shape)
        out += loss.unflatten(1, (-1, unit)).mean(-1).flatten().tolist()
    return out


def measure(model, row, fits, val, induction, probe, unit):
    fitted = fits.get(json.dumps(row.record["codec"], sort_keys=True))
    method = BenchMethod(row.name, row.record, fitted).build(model).layers[0]
    v_bytes_per_token(model, probe)  # the real cache holds what the method declares (raises otherwise)
    row.bytes = method.v_bytes(row.context, torch.bfloat16) / row.context
    row.units = unit_losses(model, val, unit)
    row.induction = induction_scores(model, induction)["acc"]


def compare(rows):
    """Each row's paired differences: to the full cache (loss, induction), and to its budget's best row."""
    out = []
    refs = {r.context: r for r in rows if r.family == "full V"}
    best = {}
    for r in rows:
        if r.family != "full V":
            key = (r.context, r.bits)
            best[key] = min(best.get(key, r), r, key=lambda x: statistics.fmean(x.units))
    for r in rows:
        ref = refs[r.context]
        d, se = paired_difference(r.units, ref.units)
        di, sei = paired_difference(r.induction, ref.induction)
        item = {"context": r.context, "bits": r.bits, "method": r.name, "family": r.family, "exact": r.exact,
                "record": r.record, "bytes": r.bytes, "loss": statistics.fmean(r.units),
                "ppl_change_pct": 100 * math.expm1(d),
                "ppl_change_se_pct": None if se is None else 100 * math.exp(d) * se,
                "verdict": verdict(d, se, "worse", "better") if r is not ref else "reference",
                "induction_acc": statistics.fmean(r.induction), "induction_diff": di, "induction_diff_se": sei,
                "units": r.units, "induction_per_batch": r.induction}
        b = best.get((r.context, r.bits))
        if b is not None and r is not ref:
            db, seb = paired_difference(r.units, b.units)
            item.update(best=b.name, vs_best=db, vs_best_se=seb,
                        vs_best_verdict="best" if r is b else verdict(db, seb, "worse", "better"))
        out.append(item)
    return out


def fmt_se(x, se, scale=1.0, digits=2):
    return f"{x * scale:+.{digits}f}" + ("" if se is None else f" ± {se * scale:.{digits}f}")


def table(results, context, units, unit, n_induction):
    lines = [f"### Context {context}: {units} paired units of {unit} tokens, "
             f"{n_induction} induction batches",
             "",
             "| budget (bits/dim) | method | bytes/vector | ppl change % (vs full) | loss vs the budget's best "
             "(nats) | induction acc change |",
             "|---|---|---:|---:|---:|---:|"]
    for r in sorted((r for r in results if r["context"] == context),
                    key=lambda r: (r["family"] != "full V", r["bits"], r["loss"])):
        if r["family"] == "full V":
            lines.append(f"| 16 | **full V (bf16)** | {r['bytes']:.1f} | reference (loss {r['loss']:.4f}) | | "
                         f"{r['induction_acc']:.3f} |")
            continue
        vs = "**best**" if r["vs_best_verdict"] == "best" else \
            f"{fmt_se(r['vs_best'], r['vs_best_se'], digits=4)} ({r['vs_best_verdict']})"
        lines.append(f"| {r['bits']:g} | {r['method']} | {r['bytes']:.1f} | "
                     f"{fmt_se(r['ppl_change_pct'], r['ppl_change_se_pct'])} | {vs} | "
                     f"{fmt_se(r['induction_diff'], r['induction_diff_se'], digits=3)} |")
    return "\n".join(lines)


def best_lines(results, hd):
    out = []
    for (T, bits) in sorted({(r["context"], r["bits"]) for r in results if r["family"] != "full V"}):
        group = [r for r in results if (r["context"], r["bits"]) == (T, bits) and r["family"] != "full V"]
        b = next(r for r in group if r["vs_best_verdict"] == "best")
        tied = [r["method"] for r in group if r is not b and r["vs_best_verdict"] == "within noise"]
        out.append(f"- context {T}, {bits:g} bits/dim ({bits * hd / 8:g} bytes): **{b['method']}** "
                   f"({b['bytes']:.1f} bytes, {fmt_se(b['ppl_change_pct'], b['ppl_change_se_pct'])}%)"
                   + (f"; within noise of it: {', '.join(tied)}" if tied else "; every other row is worse"))
    return "\n".join(out)


def goal_line(results, goal_bytes=20, goal_pct=1.0):
    """Whether a method (no control) holds <= goal_bytes at <= +goal_pct% perplexity, or the closest one."""
    def where(r):
        return (f"{r['method']} at context {r['context']} ({r['bytes']:.1f} bytes, "
                f"{fmt_se(r['ppl_change_pct'], r['ppl_change_se_pct'])}%)")
    within = [r for r in results if r["family"] not in ("full V",) + CONTROLS and r["bytes"] <= goal_bytes]
    goal = f"Goal (<= {goal_bytes} bytes and <= +{goal_pct:g}% perplexity): "
    if not within:
        return goal + "**not met** post hoc: no method holds so few bytes"
    best = min(within, key=lambda r: r["ppl_change_pct"])
    if best["ppl_change_pct"] <= goal_pct:
        return goal + f"**met** post hoc by {where(best)}"
    return goal + f"**not met** post hoc; the closest is {where(best)}"


def plot(results, path):
    """Bytes against perplexity change, one panel per context: a colour per codec family, a line
    style per exact-token variant (solid: none, dashed: sinks, dotted: sinks and window), the
    controls in grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    contexts = sorted({r["context"] for r in results})
    colours = dict(zip(FAMILIES, (plt.cm.tab10(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9))))  # grey: controls
    styles = {"": "-", "sinks": "--", "sinks+window": ":"}
    fig, axes = plt.subplots(1, len(contexts), figsize=(7.5 * len(contexts), 5.5), squeeze=False)
    for ax, T in zip(axes[0], contexts):
        series = {}
        for r in results:
            if r["context"] == T and r["family"] != "full V":
                series.setdefault((r["family"], r["exact"]), []).append(r)
        for (family, exact), rs in sorted(series.items()):
            rs.sort(key=lambda r: r["bytes"])
            control = family in CONTROLS
            label = family + "".join(f" + {p}" for p in exact.split("+") if p and not control)
            ax.errorbar([r["bytes"] for r in rs], [r["ppl_change_pct"] for r in rs],
                        yerr=[r["ppl_change_se_pct"] or 0 for r in rs], marker="o", ms=4, capsize=2,
                        linestyle="--" if control else styles[exact],
                        color="0.6" if control else colours[family], label=label)
        ax.axhline(1.0, color="k", lw=0.6, ls=":")
        ax.axvline(20, color="k", lw=0.6, ls=":")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom=-1.0)
        ax.set_xlabel("V bytes per 64-dim vector (all side information and exact tokens)")
        ax.set_ylabel("perplexity change vs full V (%)")
        ax.set_title(f"SmolLM2-135M, post hoc, context {T}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="512,2048", help="comma-separated contexts (multiples of --unit)")
    ap.add_argument("--unit", type=int, default=UNIT, help=f"tokens per paired unit (default {UNIT})")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="default",
                    help="which families run at which context and budget (default: sampled to fit 15 minutes; "
                         "wide: every family at every budget at 512, about 25 minutes)")
    ap.add_argument("--families", help=f"comma-separated families to run instead of the grid's: "
                                        f"{', '.join(FAMILIES)} (the reference and controls always run)")
    ap.add_argument("--budgets", help="comma-separated bits per dimension instead of the grid's (e.g. 2,2.5)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per context (default 4096)")
    ap.add_argument("--induction-batches", type=int, default=2,
                    help="induction batches per context, passages of context/2 tokens (default 2)")
    ap.add_argument("--calib-batches", type=int, default=8,
                    help="train sequences (of the shortest context) the fits collect V from (default 8)")
    ap.add_argument("--fit-epochs", type=int, default=PRETRAINED[SMOLLM2].flags["kvsplice_epochs"],
                    help="spline fit epochs (default: the SmolLM2 benchmark's)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out-dir", default="runs/frontier", help="frontier.json and frontier.md go here")
    ap.add_argument("--plot", default="docs/kv_frontier_smollm2.png")
    ap.add_argument("--replot", metavar="JSON",
                    help="measure nothing: rewrite frontier.md (in --out-dir) and --plot from a frontier.json")
    args = ap.parse_args(argv)
    problems = []
    try:
        args.contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        problems.append(f"--contexts must be comma-separated ints, got {args.contexts!r}")
        args.contexts = []
    if args.unit < 2:
        problems.append(f"--unit must be >= 2, got {args.unit}")
    if args.families is not None:
        args.families = args.families.split(",")
        unknown = [f for f in args.families if f not in FAMILIES]
        if unknown:
            problems.append(f"--families: unknown {unknown}; known: {', '.join(FAMILIES)}")
    if args.budgets is not None:
        try:
            args.budgets = [float(b) for b in args.budgets.split(",")]
        except ValueError:
            problems.append(f"--budgets must be comma-separated numbers, got {args.budgets!r}")
            args.budgets = []
        if any(not 0 < b < 16 for b in args.budgets):
            problems.append(f"--budgets: each must be in (0, 16) bits per dimension, got {args.budgets}")
    bad = [c for c in args.contexts if args.unit >= 2 and (c < args.unit or c % args.unit or c > 8192)]
    if bad:
        problems.append(f"--contexts: each must be a multiple of --unit {args.unit} up to 8192, got {bad}")
    for name in ("eval_tokens", "induction_batches", "calib_batches"):
        if getattr(args, name) < 2:
            problems.append(f"--{name.replace('_', '-')} must be >= 2 (a standard error needs two units), "
                            f"got {getattr(args, name)}")
    if args.fit_epochs < 0:
        problems.append(f"--fit-epochs must be >= 0, got {args.fit_epochs}")
    if any(args.eval_tokens < c for c in args.contexts):
        problems.append(f"--eval-tokens {args.eval_tokens} is shorter than a context")
    if problems:
        ap.error("; ".join(problems))
    return args


def log(msg):
    print(msg, flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.replot:
        payload = json.loads(Path(args.replot).read_text())
        print(write_outputs(payload, args.out_dir, args.plot), flush=True)
        log(f"[frontier] rewrote {Path(args.out_dir) / 'frontier.md'} and {args.plot} from {args.replot}")
        return payload["rows"]
    t_start = time.perf_counter()
    configure_cpu()
    ckpt, pretrained = open_source(SMOLLM2, args.data_dir)
    ensure_data(SMOLLM2, ckpt, pretrained, log)
    model = load_pretrained(SMOLLM2, block_size=max(args.contexts)).eval()
    hd, cfg = model.config.head_dim, model.config
    rows = plan(args.contexts, hd, cfg.block_size, args.families, args.budgets, args.grid)
    for row in rows:  # every record builds, before anything is fitted or measured
        build_method(row.record, cfg.block_size, hd)
    log(f"[frontier] {len(rows)} rows at contexts {args.contexts}; {cfg.n_layer} layers, "
        f"{v_heads(cfg)} V heads of {hd}")
    data, _ = eval_data(SMOLLM2, ckpt["args"], args.unit, cfg.vocab_size, args.data_dir, 1, 1, args.seed)
    fitted = [r.record["codec"] for r in rows if CODECS[r.record["codec"]["kind"]].needs_fit]
    cal = None
    if fitted:  # V from train batches, as many per layer as the widest fit wants
        t0 = time.perf_counter()
        wanted = max(CODECS[c["kind"]](hd, **{n: v for n, v in c.items() if n != "kind"}).fit_rows()[1]
                     or MAX_SAMPLES for c in fitted)
        model.set_v_cache(full_record())
        with quiet():
            cal = collect(model, calibration_batches(data, args.calib_batches, 1, min(args.contexts), args.seed),
                          wanted, args.seed)
        log(f"[frontier] collected {cal.samples[0].shape[0]:,} V vectors per layer in "
            f"{time.perf_counter() - t0:.1f}s")
    fits, notes = fit_all(model, cal, rows, args.fit_epochs, GEOMETRY_FIT["lr"], args.seed, log)
    induction = {T: induction_batches(args.induction_batches, 1, min(T // 2, INDUCTION_PASSAGE), **{
        n: pretrained.induction[n] for n in ("low", "high")}, seed=args.seed) for T in args.contexts}
    val = {T: eval_data(SMOLLM2, ckpt["args"], T, cfg.vocab_size, args.data_dir, args.eval_tokens // T, 1,
                        args.seed)[1] for T in args.contexts}
    probe = val[min(args.contexts)][0][0]
    t_rows = time.perf_counter()
    for i, row in enumerate(rows, 1):
        measure(model, row, fits, val[row.context], induction[row.context], probe, args.unit)
        spent = time.perf_counter() - t_rows
        log(f"[frontier] {i}/{len(rows)} ctx {row.context} {row.bits:g} bits: {row.name:<28} "
            f"{row.bytes:6.1f} B  loss {statistics.fmean(row.units):.4f}  ind {statistics.fmean(row.induction):.3f}"
            f"  ({spent:.0f}s, ETA {spent / i * (len(rows) - i):.0f}s)")
    results = compare(rows)
    payload = {"command": " ".join(["python scripts/frontier.py", shlex.join(argv)]).strip(),
               "wall_s": time.perf_counter() - t_start, "machine": machine_description(torch.get_num_threads()),
               "unit": args.unit, "induction_batches": args.induction_batches, "head_dim": hd, "notes": notes,
               "rows": results}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "frontier.json", json.dumps(payload, indent=1))
    text = write_outputs(payload, out, args.plot)
    print("\n" + text, flush=True)
    log(f"[frontier] wrote {out / 'frontier.md'}, {out / 'frontier.json'} and {args.plot}; "
        f"wall {payload['wall_s']:.1f} s")
    return results


def write_outputs(payload, out, plot_path):
    """frontier.md under `out` and the plot, from a run's payload (what frontier.json holds)."""
    text = report(payload)
    atomic_write_text(Path(out) / "frontier.md", text + "\n")
    plot(payload["rows"], plot_path)
    return text


def report(payload):
    results, hd = payload["rows"], payload.get("head_dim", 64)
    machine = f"Machine: {payload['machine']}. " if payload.get("machine") else ""
    contexts = sorted({r["context"] for r in results})
    units = {T: len(next(r for r in results if r["context"] == T)["units"]) for T in contexts}
    n_induction = len(results[0]["induction_per_batch"])
    return "\n\n".join(
        [f"## The V-cache frontier on SmolLM2-135M, post hoc\n\n`{payload['command'].strip()}`\n\n"
         f"{machine}Wall time {payload['wall_s']:.1f} s.",
         "Best at each budget (lowest mean loss; paired against it, a row within 2 SE is within noise):\n\n"
         + best_lines(results, hd), goal_line(results), geometry_lines(results)] + payload.get("notes", [])
        + [table(results, T, units[T], payload.get("unit", UNIT), n_induction) for T in contexts])


# the geometry's questions: (row, against, what the difference says), each paired at every budget both ran
GEOMETRY_PAIRS = (
    ("kvtc", "pca basis", "bits allocated by the fitted variances instead of equal bits on the fitted basis"),
    ("pca basis", "turbo", "the fitted PCA basis instead of a random rotation, equal bits"),
    ("kvtc", "turbo", "the transform coder against the random rotation, no exact token"),
    ("kvtc + sinks + window", "turbo + sinks + window", "the same, sinks and window exact"),
    ("spline kvtc + sinks", "kvtc + sinks", "KVSplice's spline before the transform coder"),
    ("spline turbo", "turbo", "KVSplice's spline before the random rotation"),
)


def geometry_lines(results):
    """Where the geometry lands: each GEOMETRY_PAIRS difference (loss, nats) paired over the same units."""
    by = {(r["context"], r["bits"], r["method"]): r for r in results}
    lines = ["Where the KVSplice geometry lands (loss differences in nats, paired over the same units; "
             "negative: the first is better):", ""]
    for a, b, what in GEOMETRY_PAIRS:
        cells = []
        for (T, bits, name), r in sorted(by.items()):
            if name == a and (T, bits, b) in by:
                d, se = paired_difference(r["units"], by[T, bits, b]["units"])
                cells.append(f"{bits:g} bits at {T}: {d:+.4f} ± {se:.4f} ({verdict(d, se, 'worse', 'better')})")
        if cells:
            lines.append(f"- {a} − {b} ({what}): " + "; ".join(cells))
    return "\n".join(lines)

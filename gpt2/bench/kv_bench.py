"""Post-hoc V-cache methods on a trained checkpoint: quality, memory, speed.

    python scripts/bench_kv.py --ckpt runs/cpu-quickstart/V0/best.pt
    python scripts/bench_kv.py --ckpt smollm2      # the pretrained SmolLM2-135M on held-out plays
    python scripts/bench_kv.py --decode-only --config defconfigs/gpt2-124m-finewebedu --device cuda \
        --decode-batches 1,16,64 --decode-contexts 1024     # the decode-speed table alone, on a GPU
    python scripts/bench_kv.py --memory            # SmolLM2's KV memory per method (gpt2/bench/kv_memory.py)

Each method (gpt2/bench/kv_methods.py: a list of lib.vcache records with
the checkpoint's settings) is put into the model's attention after training
and evaluated on the validation split, the same seeded batches for every
method (gpt2/bench/kv_measure.py); gpt2/bench/kv_report.py writes the
table and plot. `smollm2` where a checkpoint goes benchmarks the pretrained
model (gpt2/bench/kv_source.py) on held-out text of its own tokenizer, with
an induction test as a second quality measure, sizes that fit its cost,
and no H2O row or decode timing.

Columns, and what each is measured from:
    V bytes/token/layer    a real cache of that method, prefilled with
                           block_size tokens (batch 1): its V tensors' bytes /
                           (n_layer * block_size), checked against the bytes the
                           method declares; the reference is fp32
    compression            reference bytes / method bytes
    val loss, perplexity   mean next-token cross entropy on the val batches;
                           perplexity = exp(val loss). The full-sequence
                           attention of each method equals decoding through its
                           cache (tests/test_vcache.py); H2O has no such form and
                           runs through its cache token by token
    decode tok/s           batch 1: prefill block_size/2 tokens into the
                           method's real cache, then time --decode-steps
                           single-token steps; --decode-repeats rounds over all
                           methods (round-robin), median per method
    calib s                V collection + fit (geometry methods), else 0
    trained-in             perplexity change of the trained-in ablation runs
                           (V19 vs V0, V20 vs V0) under --matrix, if they exist

Then a decode-speed section (once, at the first checkpoint's shape): V0 and
V20, eager and compiled, and V22 (pruning + int4) eager, through
model.generate at each --decode-batches x --decode-contexts, with the
targets at context 1024 (prompt 896 + 96 new): compiled V20 >= 0.85x the
plain cache's decode at batch 1 and >= 1.0x at batch 16; eager V20 and V22
>= 0.9x the eager plain cache end to end (prefill included) at batch 1 and
>= 1.0x at batch 16; their prefill <= 1.1x the full one's. It runs on --device, under bf16
autocast on a GPU that supports it (fp32 on the CPU). --decode-only measures
this section alone and writes it into --out-md; with --config instead of
--ckpt its models take a defconfig's (or .config's) shape and pruning, at
--vocab.

--memory writes the section "KV memory" alone: per method, SmolLM2's cache
MB at 2k, 8k and 32k tokens and the longest context that fits 1 GiB, each
method's count confirmed by a real generation at about 2k tokens
(gpt2/bench/kv_memory.py).

Writes --out-md (docs/benchmarks.md: table, targets, command, machine; the
sections of checkpoints this run does not name are kept) and --out-png
(docs/kv_pareto.png: perplexity vs V bytes per token; a pretrained model's
plot adds its name).
"""

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from gpt2.atomic import atomic_write_text
from gpt2.bench.kv_measure import (compare_to_reference, decode_models, decode_rates, decode_row, eval_data, install,
                                   measure_quality, timing_geometry, v_heads)
from gpt2.bench.kv_methods import bench_methods, check_preconditions, prune_settings, step_record, widest_fit
from gpt2.bench.kv_report import (decode_rates_line, format_decode, format_table, machine_description, merge_report,
                                  notes, write_plot)
from gpt2.bench.kv_source import CHECKPOINT_DEFAULTS, PRETRAINED, load_model, needs_data, open_source
from gpt2.calibrate import MAX_SAMPLES, calibration_batches, collect, quiet
from gpt2.cli import GEOMETRY, GEOMETRY_FIT, parse_args as train_flags
from gpt2.cpu import configure_cpu
from gpt2.entry import ArgumentParser
from gpt2.induction import induction_batches
from gpt2.lm import load_checkpoint
from gpt2.prepare_data import prepare
from gpt2.pretrained import config_from_checkpoint
from gpt2.recall import RecallData
from gpt2.tokenizer import N_VOCAB, get_tokenizer
from gpt2.tracking import summary_complete
from gpt2.train import autocast_context, model_config_from_args
from lib.kv_pruning import keep_budget
from lib.vcache import FULL, describe

ROOT = Path(__file__).resolve().parents[2]

def trained_in_changes(matrix_dir):
    """Perplexity change % of the trained-in V19 and V20 runs vs V0 under matrix_dir.

    Reads DIR/<step>/summary.json and DIR/seed*/<step>/summary.json, leaving
    out runs marked incomplete (a V20 whose calibration never ran is no V20);
    seeds of a step are averaged in val loss, so the change is
    exp(mean L_step - mean L_V0) - 1.
    Returns ({"V19": pct or None, "V20": pct or None}, {step: number of runs}).
    """
    losses = {}
    if matrix_dir is not None and Path(matrix_dir).is_dir():
        d = Path(matrix_dir)
        for step in ("V0", "V19", "V20"):
            for path in [d / step / "summary.json", *sorted(d.glob(f"seed*/{step}/summary.json"))]:
                summary = json.loads(path.read_text()) if path.is_file() else None
                if summary is not None and summary_complete(summary):
                    losses.setdefault(step, []).append(float(summary["final_val_loss"]))
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


def check_settings(cfg, ks, prune, decode_steps, counts, calib_vectors, knots):
    """Every setting and every method's preconditions, before anything runs."""
    bs = cfg.block_size
    check_preconditions(ks, cfg.head_dim, bs, prune, calib_vectors, knots)
    if not 1 <= decode_steps <= bs - bs // 2:
        raise ValueError(f"--decode-steps must be in [1, block_size - block_size/2 = {bs - bs // 2}], "
                         f"found {decode_steps}")
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, found {value}")


def checked_settings(ckpt, cfg, ks, eval_batches, batch_size, calib_batches, decode_steps, decode_repeats,
                     fit_epochs):
    """(ks, prune, decode_steps, knots, fit epochs, V samples) of a benchmark of
    the checkpoint, each checked (check_settings) before anything runs."""
    args = ckpt.get("args") or {}
    bs = cfg.block_size
    ks = sorted(set(int(k) for k in ks))
    prune = prune_settings(ckpt)
    decode_steps = bs - bs // 2 if decode_steps is None else decode_steps
    knots = int(args.get("kvsplice_knots", GEOMETRY["knots"]))
    epochs = int(args.get("kvsplice_epochs", GEOMETRY_FIT["epochs"]) if fit_epochs is None else fit_epochs)
    samples = int(args.get("kvsplice_samples", MAX_SAMPLES))
    check_settings(cfg, ks, prune, decode_steps,
                   {"--eval-batches": eval_batches, "--batch-size": batch_size,
                    "--calib-batches": calib_batches, "--decode-repeats": decode_repeats},
                   min(samples, calib_batches * batch_size * bs * v_heads(cfg)), knots)
    return ks, prune, decode_steps, knots, epochs, samples


def sizes(pretrained, **given):
    """The benchmark's sizes: those given (not None), else the source's defaults."""
    defaults = CHECKPOINT_DEFAULTS if pretrained is None else pretrained.defaults
    return {**defaults, **{n: v for n, v in given.items() if v is not None}}


def ensure_data(path, ckpt, pretrained, log):
    """Prepare a pretrained source's corpus with its tokenizer on first use (as run_ablation does)."""
    if needs_data(ckpt, pretrained):
        args = ckpt["args"]
        log(f"[bench] {path}: preparing {args['dataset']} ({args['tokenizer']} tokens) into {args['data_dir']}/")
        prepare(args["dataset"], args["data_dir"], tokenizer=args["tokenizer"])


def preflight(args):
    """Every checkpoint's settings and data, checked before the first
    measurement (the decode section alone runs for minutes): one ValueError
    naming every problem. Then a pretrained source's corpus is prepared if
    it is not yet."""
    problems, sources = [], []
    for path in args.ckpt:
        try:
            ckpt, pretrained = open_source(path, args.data_dir)
            cfg = config_from_checkpoint(ckpt)
            s = sizes(pretrained, ks=args.ks, eval_batches=args.eval_batches, batch_size=args.batch_size,
                      calib_batches=args.calib_batches)
            checked_settings(ckpt, cfg, s["ks"], s["eval_batches"], s["batch_size"], s["calib_batches"],
                             args.decode_steps, args.decode_repeats, args.fit_epochs)
            if pretrained is not None:
                # its tokenizer: the model's package is there, and the induction ids are its own
                vocab = get_tokenizer(pretrained.tokenizer).vocab_size
                if pretrained.induction["high"] > vocab:
                    raise ValueError(f"induction ids up to {pretrained.induction['high']} exceed the "
                                     f"tokenizer's {vocab}")
            if not needs_data(ckpt, pretrained):
                eval_data(path, ckpt["args"], cfg.block_size, cfg.vocab_size, args.data_dir, 1, 1, 0)
            sources.append((path, ckpt, pretrained))
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"{path}: {e}")
    if problems:
        raise ValueError("nothing was measured or written:\n  " + "\n  ".join(problems))
    for path, ckpt, pretrained in sources:
        ensure_data(path, ckpt, pretrained, _log)


def collect_v(model, data, batch_size, calib_batches, codec, samples, seed, log):
    """V samples per layer from TRAINING batches, on the model with its own method removed."""
    t0 = time.perf_counter()
    # the rows' codec whose fit wants the most samples (the cap; kv_methods.widest_fit): unfitted, it leaves V alone
    model.set_v_cache({"select": FULL["select"], "codec": codec})
    with quiet():
        cal = collect(model, calibration_batches(data, calib_batches, batch_size, model.config.block_size, seed),
                      samples, seed)
    collect_s = time.perf_counter() - t0
    log(f"[bench] collected {cal.samples[0].shape[0]:,} V vectors per layer from {calib_batches} train "
        f"batches in {collect_s:.1f}s")
    return cal, collect_s


def run_benchmark(ckpt_path, ks=None, eval_batches=None, batch_size=None, calib_batches=None,
                  decode_steps=None, decode_repeats=5, matrix_dir=None, data_dir=None,
                  fit_epochs=None, seed=None, log=_log):
    """Evaluate every method on the checkpoint (or the pretrained model it names);
    returns one dict per method (the table's rows). Sizes left None are the source's
    (gpt2/bench/kv_source.py)."""
    t_start = time.perf_counter()
    ckpt, pretrained = open_source(str(ckpt_path), data_dir)
    args = ckpt.get("args") or {}
    s = sizes(pretrained, ks=ks, eval_batches=eval_batches, batch_size=batch_size, calib_batches=calib_batches)
    eval_batches, batch_size, calib_batches = s["eval_batches"], s["batch_size"], s["calib_batches"]
    checked_settings(ckpt, config_from_checkpoint(ckpt), s["ks"], eval_batches, batch_size, calib_batches,
                     decode_steps, decode_repeats, fit_epochs)  # before a pretrained model's load
    ensure_data(ckpt_path, ckpt, pretrained, log)
    if pretrained is not None:
        log(f"[bench] loading {ckpt_path} ...")
    model = load_model(str(ckpt_path), ckpt, pretrained).eval()
    cfg = model.config
    bs = cfg.block_size
    ks, prune, decode_steps, knots, epochs, samples = checked_settings(
        ckpt, cfg, s["ks"], eval_batches, batch_size, calib_batches, decode_steps, decode_repeats, fit_epochs)
    if cfg.v_cache != FULL:
        log(f"[bench] note: {ckpt_path} was trained with a V-cache method; it is removed for the "
            f"reference and applied post hoc like every other method")
    seed = args.get("seed", 1337) if seed is None else seed
    data, val = eval_data(ckpt_path, args, bs, cfg.vocab_size, data_dir, eval_batches, batch_size, seed)
    row0 = val[0][0][:1]  # (1, block_size)
    induction = None if pretrained is None else induction_batches(**pretrained.induction, seed=seed)
    log(f"[bench] {ckpt_path}: {cfg.n_layer} layers, {cfg.n_head} heads ({v_heads(cfg)} of V), head_dim "
        f"{cfg.head_dim}, block {bs}; {eval_batches} val batches x {batch_size} x {bs} tokens"
        + ("" if induction is None else f"; induction {len(induction)} batches"))

    cal, collect_s = collect_v(model, data, batch_size, calib_batches,
                               widest_fit(ks, prune, knots, bs, cfg.head_dim), samples, seed, log)
    methods = bench_methods(model, cal, collect_s, ks, prune, knots, epochs,
                            float(args.get("kvsplice_lr", GEOMETRY_FIT["lr"])), seed, log, h2o=s["h2o"])
    trained, n_runs = trained_in_changes(matrix_dir)
    if n_runs:
        log(f"[bench] trained-in runs under {matrix_dir}: " + ", ".join(f"{s} x{n}" for s, n in n_runs.items()))
    rows, t_rows = [], time.perf_counter()
    for i, m in enumerate(methods, 1):
        rows.append(measure_quality(model, m, val, row0, trained, prune["recency"], log, induction))
        spent = time.perf_counter() - t_rows
        log(f"[bench] {i}/{len(methods)} methods in {spent:.0f} s, ETA {spent / i * (len(methods) - i):.0f} s "
            f"(total so far {time.perf_counter() - t_start:.0f} s)")
    for row in rows:
        compare_to_reference(row, rows[0])
    rates = {}
    if s["decode"]:
        log(f"[bench] decode speed: {decode_repeats} round(s) over all methods, {decode_steps} steps each")
        rates = decode_rates(model, {m.name: m.layers for m in methods}, row0, bs // 2, decode_steps,
                             decode_repeats)
    else:
        log(f"[bench] decode tok/s: not measured for {ckpt_path} (its single-token steps would take most "
            f"of the time budget)")
    for row in rows:
        row["decode_tok_s"] = rates.get(row["method"])
        if row["decode_tok_s"] is not None:
            log(f"[bench] {row['method']:<28} decode {row['decode_tok_s']:7.1f} tok/s")
    install(model, methods[0].layers)
    h2o = next((m.record["select"] for m in methods if m.family == "h2o"), {"budget": None, "recency": None})
    info = {"n_eval_tokens": eval_batches * batch_size * bs, "block_size": bs, "n_eval_batches": eval_batches,
            "dataset": args["dataset"], "recall": isinstance(data, RecallData), "n_layer": cfg.n_layer,
            "pretrained": None if pretrained is None else pretrained.name,
            "induction": None if pretrained is None else pretrained.induction,
            "wall_target_s": None if pretrained is None else pretrained.wall_target_s,
            "prune_budget": keep_budget(prune["keep_ratio"], bs, prune["k_min"]),
            "prune_keep_ratio": prune["keep_ratio"], "prune_recency": prune["recency"],
            "h2o_budget": h2o["budget"], "h2o_recency": h2o["recency"], "decode_measured": s["decode"],
            "decode_prefill": bs // 2, "decode_steps": decode_steps, "decode_repeats": decode_repeats,
            "calib_vectors": cal.samples[0].shape[0], "calib_batches": calib_batches, "fit_epochs": epochs,
            "knots": knots, "matrix_dir": str(matrix_dir) if matrix_dir else None, "matrix_runs": n_runs,
            "seconds": time.perf_counter() - t_start}
    for row in rows:
        row["info"] = info
    return rows


def decode_checkpoint(paths):
    """The first GPT-2 training checkpoint among paths, whose shape the decode-speed
    section takes (its models are GPT-2's), or None."""
    for path in paths:
        if path not in PRETRAINED:
            ckpt = load_checkpoint(path)
            if ckpt.get("model_family", "gpt2") == "gpt2":
                return ckpt
    return None


def decode_shape(args):
    """(GPTConfig, pruning settings, what the models are) of the decode-speed
    section: the first GPT-2 checkpoint's, or --config's at --vocab."""
    if args.ckpt:
        ckpt = decode_checkpoint(args.ckpt)
        return config_from_checkpoint(ckpt), prune_settings(ckpt), "the first checkpoint's shape"
    flags = train_flags(["--config", args.config])
    prune = {"keep_ratio": flags.kv_prune_keep_ratio, "k_min": flags.kv_prune_k_min, "recency": flags.kv_prune_recency}
    return model_config_from_args(flags, args.vocab), prune, f"the shape of `{args.config}`"


def decode_speed(config, prune, shape, batches, contexts, repeats, device="cpu", log=_log):
    """V0 and V20 (the ablation step's method, with `prune`'s settings), eager
    and compiled, and V20's pruning with plain PCA, compiled, through model.generate at each (batch, context), at config's
    shape on `device` (autocast as training's --dtype auto sets it); returns
    the report section's text and its target checks (gpt2/bench/kv_report.py
    format_decode)."""
    record = step_record("V20", prune)
    geometry = timing_geometry(config.head_dim, record["codec"]["k"])
    amp, dtype = autocast_context(device, "auto")
    speeds = {}
    for context in contexts:
        models = [m.to(device) for m in decode_models(config, record, context, geometry)]
        for batch in batches:
            t0 = time.perf_counter()
            with amp:
                speeds[(batch, context)] = decode_row(*models, batch, context, repeats, config.vocab_size)
            log(f"[bench] decode batch {batch}, context {context}: {decode_rates_line(speeds[(batch, context)])} "
                f"({time.perf_counter() - t0:.0f} s)")
    where = "" if device == "cpu" else f"; {dtype} autocast, {torch.cuda.get_device_name(device)}"
    shape = (f"{shape} ({config.n_layer} layers, {config.n_head} heads, {config.n_embd} dims, "
             f"vocab {config.vocab_size}{where})")
    return format_decode(speeds, describe(record), shape)


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", nargs="+", default=[],
                    help="training checkpoint(s) (best.pt / last.pt), or smollm2 (the pretrained model); one "
                         "section and one plot each")
    ap.add_argument("--decode-only", action="store_true",
                    help="measure the decode-speed section alone and write it into --out-md (its other sections kept)")
    ap.add_argument("--memory", action="store_true",
                    help="measure the KV-memory section alone (SmolLM2: cache MB per method at 2k, 8k and 32k "
                         "tokens, the longest context in 1 GiB) and write it into --out-md")
    ap.add_argument("--config", default=None,
                    help="with --decode-only, instead of --ckpt: a defconfig or .config whose shape and "
                         "pruning the decode-speed models take")
    ap.add_argument("--vocab", type=int, default=N_VOCAB, help="with --config: the models' vocabulary size")
    ap.add_argument("--device", default="cpu", help="where the decode-speed section runs: cpu, cuda or cuda:N")
    ap.add_argument("--out-md", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--out-png", default=str(ROOT / "docs" / "kv_pareto.png"))
    ap.add_argument("--eval-batches", type=int, default=None,
                    help="validation batches (same for every method; default 20, smollm2 16)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="sequences per eval / calibration batch (default 8, smollm2 1)")
    ap.add_argument("--calib-batches", type=int, default=None,
                    help="training batches whose V the geometries are fitted on (default 8)")
    ap.add_argument("--decode-steps", type=int, default=None,
                    help="timed single-token decode steps (default and at most: block_size/2)")
    ap.add_argument("--decode-repeats", type=int, default=5,
                    help="rounds of decode timing over all methods; the median per method is reported")
    ap.add_argument("--decode-batches", default="1,16", help="batch sizes of the generate decode-speed section")
    ap.add_argument("--decode-contexts", default="256,1024",
                    help="contexts (prompt + new tokens) of the decode-speed section; empty skips it")
    ap.add_argument("--generate-repeats", type=int, default=5,
                    help="round-robin rounds of the decode-speed section; the median is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--ks", default=None,
                    help="latent dims for the PCA / SplinePCA rows (default 8,16,32; smollm2 16,32)")
    ap.add_argument("--fit-epochs", type=int, default=None,
                    help="SplinePCA fit epochs (default: the checkpoint's; smollm2 4)")
    ap.add_argument("--matrix", default=None,
                    help="ablation matrix dir for the trained-in column (default: the checkpoint's run dir's "
                         "parent, above any seed<N>/)")
    ap.add_argument("--data-dir", default=None, help="prepared data dir (default: the checkpoint's)")
    args = ap.parse_args(argv)
    if args.memory:
        if args.ckpt or args.config or args.decode_only:
            ap.error("--memory measures SmolLM2's memory alone: no --ckpt, --config or --decode-only with it")
        args.decode_contexts = ""  # no decode-speed section
    elif bool(args.ckpt) == bool(args.config) or (args.config and not args.decode_only):
        ap.error("expected --ckpt, or --decode-only with --config instead, or --memory")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}, but torch.cuda.is_available() is False (torch {torch.__version__})")
    elif not args.device.startswith("cuda") and args.device != "cpu":
        ap.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if args.ks is not None:
        try:
            args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
        except ValueError:
            ap.error(f"--ks expects comma-separated integers, found {args.ks!r}")
        if not args.ks:
            ap.error("--ks is empty")
    try:
        args.decode_batches = [int(b) for b in args.decode_batches.split(",") if b.strip()]
        args.decode_contexts = [int(c) for c in args.decode_contexts.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--decode-batches / --decode-contexts expect comma-separated integers, found "
                 f"{args.decode_batches!r} / {args.decode_contexts!r}")
    bad = [n for n in args.decode_batches + args.decode_contexts + [args.generate_repeats] if n < 1]
    if args.decode_only and not args.decode_contexts:
        ap.error("--decode-only with no --decode-contexts measures nothing")
    if bad or any(c < 64 for c in args.decode_contexts):
        ap.error(f"--decode-batches and --generate-repeats must be >= 1 and --decode-contexts >= 64, found "
                 f"batches {args.decode_batches}, contexts {args.decode_contexts}, repeats {args.generate_repeats}")
    return args


def default_matrix(ckpt):
    """The ablation matrix a checkpoint belongs to: its run dir's parent, above any seed<N>/."""
    matrix = Path(ckpt).resolve().parent.parent
    matrix = matrix.parent if matrix.name.startswith("seed") else matrix
    # relative to where the benchmark runs, so the report names no machine's paths
    return matrix.relative_to(Path.cwd()) if matrix.is_relative_to(Path.cwd()) else matrix


def plot_path(out_png, ckpt, first):
    """The first checkpoint's plot is --out-png; the others add their run's path to the
    name, and a pretrained model's its name wherever it comes."""
    if first and ckpt not in PRETRAINED:
        return Path(out_png)
    run = Path(ckpt).resolve().parent
    slug = ckpt if ckpt in PRETRAINED else "-".join(run.parts[-3:]).replace(" ", "_")
    return Path(out_png).with_name(f"{Path(out_png).stem}-{slug}{Path(out_png).suffix}")


def sections_of(command):
    """The report sections (kv_report.merge_report's keys) that a bench_kv command
    writes, or None when its flags no longer parse."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parse_args(shlex.split(command)[2:])
    except SystemExit:
        return None
    if args.memory:
        return {MEMORY_HEADING}
    keys = {f"## `{c}`" for c in args.ckpt}
    if args.decode_contexts and (args.decode_only or any(c not in PRETRAINED for c in args.ckpt)):
        keys.add(DECODE_HEADING)
    return keys


DECODE_HEADING = "## Decode speed"
MEMORY_HEADING = "## KV memory"


def pretrained_with_data(name, block_size, data_dir=None, log=_log):
    """(model at block_size, its corpus (gpt2.data), its source's checkpoint dict) of a pretrained
    source (`smollm2`), the corpus prepared first if it is not yet."""
    from gpt2.bench import kv_source

    ckpt, pretrained = open_source(name, data_dir)
    ensure_data(name, ckpt, pretrained, log)
    model = kv_source.load_pretrained(name, block_size=block_size).eval()
    data, _ = eval_data(name, ckpt["args"], min(block_size, 256), model.config.vocab_size, data_dir, 1, 1, 1337)
    return model, data, ckpt


def memory_section(args):
    """The KV-memory section's text (gpt2/bench/kv_memory.py) for SmolLM2."""
    from gpt2.bench import kv_memory
    from gpt2.pretrained import SMOLLM2

    model, data, ckpt = pretrained_with_data(SMOLLM2, kv_memory.PROMPT + kv_memory.NEW_TOKENS, args.data_dir)
    rows = kv_memory.memory_rows(model, data, prune_settings(ckpt), log=_log)
    return kv_memory.format_memory(rows, SMOLLM2, model.config)


def main(argv=None):
    """Benchmark each checkpoint, print its table and targets, write one md (a section per
    checkpoint, the sections of checkpoints not named here kept) and one png per checkpoint;
    returns {checkpoint: rows}."""
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]  # before this run adds its own load: tells an idle machine from a shared one
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    missing = [c for c in args.ckpt if c not in PRETRAINED and not Path(c).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint(s) not found: {', '.join(missing)} (--ckpt takes training "
                                f"checkpoints or {', '.join(PRETRAINED)})")
    if not args.decode_only:
        preflight(args)
    configure_cpu()
    if args.threads:
        torch.set_num_threads(args.threads)
    results, sections = {}, []
    if args.memory:
        text = memory_section(args)
        print("\n" + text, flush=True)
        sections.append((MEMORY_HEADING, text))
    decode = bool(args.decode_contexts) and (args.decode_only or decode_checkpoint(args.ckpt) is not None)
    if decode:  # first, while nothing else of this run has warmed or loaded the machine
        text, _ = decode_speed(*decode_shape(args), args.decode_batches, args.decode_contexts,
                               args.generate_repeats, args.device)
        print("\n" + text, flush=True)
    elif args.decode_contexts:
        print("[bench] decode-speed section left out: it times GPT-2-shaped models, and no GPT-2 checkpoint "
              "is named", flush=True)
    first_plot = next((c for c in args.ckpt if c not in PRETRAINED), None)
    for ckpt in args.ckpt:
        t0 = time.perf_counter()
        pretrained = ckpt in PRETRAINED
        matrix = Path(args.matrix) if args.matrix else None if pretrained else default_matrix(ckpt)
        rows = run_benchmark(ckpt, ks=args.ks, eval_batches=args.eval_batches, batch_size=args.batch_size,
                             calib_batches=args.calib_batches, decode_steps=args.decode_steps,
                             decode_repeats=args.decode_repeats, matrix_dir=matrix, data_dir=args.data_dir,
                             fit_epochs=args.fit_epochs)
        wall_s = time.perf_counter() - t0
        table = format_table(rows, wall_s=wall_s)
        print("\n" + table + f"\n\nwall time {wall_s:.1f} s", flush=True)
        png = plot_path(args.out_png, ckpt, ckpt == first_plot)
        write_plot(rows, png)
        what = ("Every method applied to the pretrained model, which was never trained with any of them."
                if pretrained else "Every method applied to the trained checkpoint after training.")
        sections.append((f"## `{ckpt}` ({rows[0]['info']['dataset']})",
                         f"{what} Plot: `{png.name}`.\n\n{table}\n\n### How each number is measured\n\n"
                         f"{notes(rows)}"))
        results[ckpt] = rows
    if decode:
        sections.append((DECODE_HEADING, text))
    wall_s = time.perf_counter() - t_start
    command = "python scripts/bench_kv.py " + shlex.join(argv)
    machine = (f"Machine: {machine_description(torch.get_num_threads())}, load average {load_before:.2f} "
               f"when the run began. Wall time {wall_s:.1f} s.")
    old = Path(args.out_md).read_text() if Path(args.out_md).is_file() else None
    atomic_write_text(args.out_md, merge_report(old, "# KV-cache benchmark: post-hoc V-cache methods", sections,
                                                command, machine, sections_of))
    print(f"wrote {args.out_md} and {len(results)} plot(s) next to {args.out_png}; total wall time {wall_s:.1f} s")
    return results


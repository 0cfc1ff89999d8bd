#!/usr/bin/env python3
"""A CUDA machine's first run: V0, V19 and V20 at GPT-2 124M shapes, checked.

    bash scripts/gpu_check.sh                  # this script with its defaults, on cuda
    python scripts/gpu_check.py --device cpu --n-layer 2 --n-head 2 --n-embd 64 --block-size 64 \\
        --vocab 96 --batch-size 2 --kv-prune-k-min 16 --kv-prune-recency 8 --no-compile   # the tests
    python scripts/gpu_check.py --estimate     # the figures of docs/ra.md's GPU section; no device

For each ablation step (V20 with a geometry fitted on the model's own V and
a spline that is not the identity, so its lookup runs):

  train    --warmup iterations (compilation), then --iters timed ones on random
           tokens, as gpt2/train.py runs them: autocast (bf16), torch.compile,
           AdamW (fused on CUDA). Prints ms/iter, tokens/s, MFU against
           the GPU's peak (by name, or --peak-flops), peak memory (reset per step) and the compile time.
           Every loss must be finite and, compiled, no graph may break.
  decode   a block of tokens through the decode cache (three quarters
           prefilled, the rest one token at a time) against the full
           forward: in fp32 within 1e-3 of the logits' scale, and under bf16
           within 4x what bf16 itself moves the full forward's logits (a
           pruning near-tie may order differently when rounding differs; a
           wrong cache is off by the logits' own scale); compiled, the same
           with each one-token step compiled, as GPT.generate(compile=True)
           runs it: one graph for every step, captured as a CUDA graph on
           CUDA (more graphs, or a skipped CUDA graph, fail); model.generate
           must sample.
  V cache  the bytes the cache holds after the block: V bytes must be what the
           method's record implies (min(T, budget) tokens x k or head_dim
           values, in the run's dtype) and what the method's v_bytes says.

--decode-speed 1,16,64 then times decoding through model.generate, V20
against the plain cache, eager and compiled, at those batch sizes and context
--block-size, under the autocast dtype: make bench's decode-speed table
(scripts/bench_kv.py) on this device. It prints figures, it checks nothing
(an error in it is a failure).

Exit status 0 when every check passed; 1 with a FAIL line per failed check;
2 when the device cannot run the check at all (no CUDA, no bf16).

--estimate needs no device: FLOPs per token, the memory of the pruned
attention and of a whole training micro-step at batch 12 (measured on fake
tensors of full size, so no compute), the HBM traffic pruning adds, and the
hours each GPU defconfig takes at a stated MFU (docs/ra.md quotes it).
"""

import argparse
import contextlib
import math
import sys
import time
import traceback
import warnings
import weakref
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.cpu import configure_cpu  # noqa: E402
from gpt2.model import GPT  # noqa: E402
from gpt2.train import GPU_PEAK_FLOPS, autocast_context, configure_optimizer, peak_flops, sync  # noqa: E402
from lib.vcache import describe  # noqa: E402
from lib.kv_pruning import keep_budget  # noqa: E402
from gpt2.bench.kv_measure import decode_models, decode_row, timing_geometry  # noqa: E402
from gpt2.bench.kv_report import decode_rates_line, format_decode  # noqa: E402
from gpt2.bench.train_steps import step_config, with_geometry  # noqa: E402
from train_ra_mla import parse_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# --estimate's GPU, H100 and H200 (SXM): dense bf16 tensor-core FLOP/s (1,979e12 is the 2:4-sparse figure)
H100_BF16_PEAK = dict(GPU_PEAK_FLOPS)["H100"]
GPUS = {"H100 SXM (80 GB, 3.35 TB/s)": (80e9, 3.35e12), "H200 (141 GB, 4.8 TB/s)": (141e9, 4.8e12)}
BF16_NOISE_FACTOR = 4  # decode under bf16 may differ from the full forward by this many times bf16's own effect
FP32_REL_TOL = 1e-3
FIVE_MINUTES = 300


class DeviceUnusable(Exception):
    """The device cannot run the check at all (exit status 2)."""


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--steps", default="V0,V19,V20",
                    help="ablation steps (gpt2/ablations.py); empty runs none (e.g. with --decode-speed)")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--kv-prune-k-min", type=int, default=64)
    ap.add_argument("--kv-prune-recency", type=int, default=64)
    ap.add_argument("--iters", type=int, default=30, help="timed training iterations per step")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="autocast dtype")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile")
    ap.add_argument("--compile-decode", action=argparse.BooleanOptionalAction, default=True,
                    help="with --compile, also decode with compiled one-token steps (GPT.generate(compile=True))")
    ap.add_argument("--peak-flops", type=float, default=0.0,
                    help="accelerator peak FLOP/s for MFU; 0: by the GPU's name, as training does "
                         "(gpt2/train.py GPU_PEAK_FLOPS: H100/H200 SXM dense bf16 989e12)")
    ap.add_argument("--decode-batch", type=int, default=2, help="sequences decoded in the decode check")
    ap.add_argument("--decode-speed", default="", metavar="BATCHES",
                    help="after the checks, V20 (and its same-bytes PCA control) against V0 decode tokens/s "
                         "through model.generate at these "
                         "batch sizes (e.g. 1,16,64), context --block-size, eager and compiled, under the "
                         "autocast dtype: the decode-speed table of docs/benchmarks.md on this device")
    ap.add_argument("--decode-speed-repeats", type=int, default=3, help="round-robin rounds per batch size")
    ap.add_argument("--estimate", action="store_true",
                    help="print what the GPU defconfigs cost (FLOPs, hours, memory) and exit; no device")
    ap.add_argument("--mfu", type=float, default=0.40, help="--estimate: the MFU assumed")
    a = ap.parse_args(argv)
    try:
        a.decode_speed = [int(b) for b in a.decode_speed.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--decode-speed {a.decode_speed!r}: expected comma-separated batch sizes, e.g. 1,16,64")
    if any(b < 1 for b in a.decode_speed) or a.decode_speed_repeats < 1:
        ap.error("--decode-speed batch sizes and --decode-speed-repeats must be >= 1")
    return a


def shape_flags(a):
    return ["--n-layer", str(a.n_layer), "--n-head", str(a.n_head), "--n-embd", str(a.n_embd),
            "--block-size", str(a.block_size), "--kv-prune-k-min", str(a.kv_prune_k_min),
            "--kv-prune-recency", str(a.kv_prune_recency)]


def check_device(a):
    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnusable(
                f"--device {a.device}, but torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'none'}). Run this on a CUDA machine with the CUDA build "
                f"of torch (make venv there installs it), or pass --device cpu for the CPU form of the check.")
        if a.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise DeviceUnusable(f"{torch.cuda.get_device_name(a.device)} does not support bf16; "
                                 f"pass --dtype float32")
    elif a.device != "cpu":
        raise DeviceUnusable(f"--device {a.device}: expected cuda, cuda:N or cpu")


@contextlib.contextmanager
def no_tf32(device):
    """Plain fp32 matmuls for the fp32 reference (training allows TF32, as gpt2/train.py does)."""
    if not device.startswith("cuda"):
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---- one step ----------------------------------------------------------------

def build(step, a):
    torch.manual_seed(0)
    cfg = step_config(step, a.vocab, shape_flags(a))
    model = GPT(cfg).to(a.device)
    codec = cfg.v_cache["codec"]
    if codec["kind"] == "splinepca":
        with_geometry(model, codec["k"], a.batch_size)
    return model


def train_timing(model, a, amp, fail):
    """Warmup + timed iterations; returns the figures of the train line."""
    opt_args = parse_args([])  # the training defaults: lr, betas, weight decay
    optimizer = configure_optimizer(model, opt_args, a.device)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step_model = torch.compile(model) if a.compile else model
    gen = torch.Generator(device=a.device).manual_seed(1)
    x, y = (torch.randint(0, a.vocab, (a.batch_size, a.block_size), device=a.device, generator=gen)
            for _ in range(2))
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(a.device)
    losses, times, warm = [], [], []
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(a.warmup + a.iters):
            sync(a.device)
            t0 = time.perf_counter()
            with amp:
                loss = step_model(x, y)[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(a.device)
            (times if i >= a.warmup else warm).append(time.perf_counter() - t0)
            losses.append(loss.item())
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        fail(f"non-finite training loss at iteration(s) {bad[:5]}: {[losses[i] for i in bad[:5]]}")
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    if a.compile and breaks:
        fail(f"{breaks} graph break(s) under torch.compile: "
             f"{dict(torch._dynamo.utils.counters['graph_break'])}")
    dt = sorted(times)[len(times) // 2] if times else float("nan")
    tokens = a.batch_size * a.block_size
    out = {"ms": dt * 1000, "tokens_s": tokens / dt, "loss": (losses[0], losses[-1]),
           "compile_s": max(0.0, sum(warm) - len(warm) * dt) if a.compile else None,
           "notes": sorted({str(w.message).splitlines()[0] for w in caught})}
    if a.device.startswith("cuda"):
        if a.peak:
            out["mfu"] = model.estimate_mfu(tokens, dt, a.peak)
        out["peak_gib"] = torch.cuda.max_memory_allocated(a.device) / 2**30
    del optimizer, step_model
    return out


@torch.no_grad()
def decode_and_forward(model, idx, amp, compile=False):
    """(full forward logits, cached decode logits, the cache): the first three
    quarters of idx prefilled, the rest decoded one token at a time; with
    compile, each one-token step as one torch.compile graph (a CUDA graph on
    CUDA), as GPT.generate(compile=True) runs it."""
    step = model.decode_step(compile)
    prefill = idx.size(1) - idx.size(1) // 4
    with amp:
        full = model(idx)[0].float()
        cache = model.make_cache()
        parts = [model(idx[:, :prefill], caches=cache)[0]]
        for t in range(prefill, idx.size(1)):
            parts.append(step(idx[:, t:t + 1], cache))
    return full, torch.cat(parts, dim=1).float(), cache


def decode_check(model, a, amp, fail):
    model.eval()
    gen = torch.Generator(device=a.device).manual_seed(2)
    idx = torch.randint(0, a.vocab, (a.decode_batch, a.block_size), device=a.device, generator=gen)
    out, clock = {"wall": {}}, time.perf_counter()

    def lap(name):  # wall time of each part of the check, for the step's wall line
        nonlocal clock
        sync(a.device)
        now = time.perf_counter()
        out["wall"][name], clock = now - clock, now

    with no_tf32(a.device):
        full32, dec32, _ = decode_and_forward(model, idx, contextlib.nullcontext())
    lap("fp32")
    scale = full32.abs().max().item()
    err32, tol32 = (dec32 - full32).abs().max().item(), FP32_REL_TOL * max(scale, 1.0)
    out.update(fp32=(err32, tol32), cache=None)
    if not err32 <= tol32:
        fail(f"cached decode differs from the full forward in fp32: max |dlogit| {err32:.3g} > {tol32:.3g}")
    if a.dtype == "bfloat16":
        full16, dec16, cache = decode_and_forward(model, idx, amp)
        floor = (full16 - full32).abs().max().item()
        tol16 = max(BF16_NOISE_FACTOR * floor, tol32)
        out["bf16"] = ((dec16 - full16).abs().max().item(), tol16, floor)
    else:
        full16, cache = full32, decode_and_forward(model, idx, amp)[2]
    lap(a.dtype)
    if a.compile and a.compile_decode:  # the compiled decode path, in the run's dtype
        before = dict(graphs=counters["stats"]["unique_graphs"], skips=counters["inductor"]["cudagraph_skips"])
        _, decc, _ = decode_and_forward(model, idx, amp, compile=True)
        out["compiled"] = ((decc - full16).abs().max().item(), tol16 if a.dtype == "bfloat16" else tol32)
        graphs = counters["stats"]["unique_graphs"] - before["graphs"]
        skips = counters["inductor"]["cudagraph_skips"] - before["skips"]
        if graphs > 1:
            fail(f"the compiled decode step compiled {graphs} graphs for {idx.size(1) // 4} steps, not one: "
                 f"a step's shapes or guards change with the length (TORCH_LOGS=recompiles says which)")
        if skips:
            fail(f"the compiled decode step was not captured as a CUDA graph ({skips} skip(s); "
                 f"TORCH_LOGS=perf_hints says why)")
        lap("compiled (compile included)")
    for name in ("bf16", "compiled"):
        if name in out and not out[name][0] <= out[name][1]:
            what = "compiled cached decode" if name == "compiled" else "cached decode"
            fail(f"{what} differs from the full forward under {a.dtype}: max |dlogit| {out[name][0]:.3g} > "
                 f"{out[name][1]:.3g}" + (f" ({BF16_NOISE_FACTOR} x what bf16 moves the full forward's logits)"
                                          if a.dtype == "bfloat16" else ""))
    out["cache"] = cache
    sample = model.generate(idx[:1, :8], 8, top_k=50)  # sampling on the device; the compiled steps are checked above
    if sample.shape != (1, 16) or not bool(((sample >= 0) & (sample < a.vocab)).all()):
        fail(f"model.generate returned {tuple(sample.shape)} with ids outside [0, {a.vocab})")
    lap("generate")
    return out


def v_cache_check(model, cache, a, fail):
    """Bytes the cache holds after a block, against what the method's record implies."""
    cfg, T, B = model.config, a.block_size, a.decode_batch
    record, hd = cfg.v_cache, cfg.head_dim
    select, codec = record["select"], record["codec"]
    held = T
    if select["kind"] == "prune":
        held = min(T, keep_budget(select["keep_ratio"], cfg.block_size, select["k_min"]))
    width = codec["k"] if codec["kind"] in ("splinepca", "pca") else hd  # the ablation steps' codecs
    elem = torch.empty((), dtype=getattr(torch, a.dtype)).element_size()
    per_head_layer = held * width * elem
    expected = cfg.n_layer * B * cfg.n_head * per_head_layer
    nbytes = cache.nbytes()
    method = model.transformer.h[0].attn.vcache
    claimed = method.v_bytes(T, hd, getattr(torch, a.dtype)) * cfg.n_layer * B * cfg.n_head
    if nbytes["v"] != expected or claimed != expected:
        fail(f"V cache holds {nbytes['v']:,} bytes and the method says {claimed:,}; its record "
             f"({held} tokens x {width} values x {elem} bytes per head, {cfg.n_layer} layers, batch {B}, "
             f"{cfg.n_head} heads) implies {expected:,}")
    ratio = per_head_layer / (T * hd * elem)
    measured = nbytes["v"] / (cfg.n_layer * B * cfg.n_head * T * hd * elem)
    if (select["kind"] != "full" or codec["kind"] != "none") and not measured < 1:
        fail(f"V bytes not reduced: the cache holds {measured:.1%} of a plain cache's V bytes, "
             f"where the method implies {ratio:.1%}")
    return {"bytes": nbytes, "per_head_layer": per_head_layer, "ratio": ratio, "held": held, "width": width}


def run_step(step, a, amp):
    failures = []

    def fail(msg):
        failures.append(msg)
        print(f"FAIL {step}: {msg}", flush=True)

    result = {"step": step}
    t0 = time.perf_counter()
    try:
        model = build(step, a)
        result["build_s"] = time.perf_counter() - t0
        result["train"] = train_timing(model, a, amp, fail)
        result["train_s"] = time.perf_counter() - t0 - result["build_s"]
        result["decode"] = decode_check(model, a, amp, fail)
        result["v"] = v_cache_check(model, result["decode"].pop("cache"), a, fail)
    except Exception as e:  # an OOM or a compile error is a failed check, not the end of the others
        traceback.print_exc()
        fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        model = None
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    result["failures"], result["wall_s"] = failures, time.perf_counter() - t0
    print_step(result, a)
    return result


def print_step(r, a):
    t = r.get("train")
    if t:
        line = f"{r['step']:<4} train  {t['ms']:9.1f} ms/iter {t['tokens_s']:12,.0f} tokens/s"
        if "peak_gib" in t:
            line += (f"  MFU {t['mfu']:6.1%}" if "mfu" in t else "  MFU n/a") + f"  peak memory {t['peak_gib']:6.2f} GiB"
        if t["compile_s"] is not None:
            line += f"  compile {t['compile_s']:5.1f} s"
        line += f"  loss {t['loss'][0]:.3f} -> {t['loss'][1]:.3f}"
        print(line)
        for note in t["notes"]:
            print(f"     note: {note}")
    d = r.get("decode")
    if d:
        line = (f"     decode {a.block_size} tokens x {a.decode_batch} vs full forward: "
                f"fp32 max |dlogit| {d['fp32'][0]:.2e} (tol {d['fp32'][1]:.0e})")
        if "bf16" in d:
            err, tol, floor = d["bf16"]
            line += f"; bf16 {err:.2e} (tol {BF16_NOISE_FACTOR} x {floor:.2e})"
        if "compiled" in d:
            line += f"; compiled steps {d['compiled'][0]:.2e} (tol {d['compiled'][1]:.2e})"
        print(line)
    v = r.get("v")
    if v:
        b = v["bytes"]
        print(f"     V cache after {a.block_size} tokens: {v['held']} tokens x {v['width']} values per head "
              f"= {v['per_head_layer']:,} bytes per (sequence, head, layer), {v['ratio']:.1%} of V0; "
              f"cache.nbytes(): V {b['v']:,}  K {b['k']:,}  index {b['index']:,}  total {b['total']:,}")
    if "build_s" in r:
        parts = [f"build {r['build_s']:.1f}"] + ([f"train {r['train_s']:.1f}"] if "train_s" in r else [])
        parts += [f"decode {name} {sec:.1f}" for name, sec in (d or {}).get("wall", {}).items()]
        print(f"     wall s: {', '.join(parts)}; in all {r['wall_s']:.0f}")
    print(flush=True)


def check(a):
    t_start = time.perf_counter()
    check_device(a)
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # as gpt2/train.py sets it
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(a.device)
    else:
        configure_cpu()
        name = f"CPU, {torch.get_num_threads()} threads"
    a.peak = peak_flops(a.device, a.peak_flops)
    amp, dtype = autocast_context(a.device, a.dtype)
    mfu = (f"; MFU against a peak of {a.peak / 1e12:,.0f} TFLOP/s" if a.peak else
           "; no MFU: no known peak for this GPU (--peak-flops)") if a.device.startswith("cuda") else ""
    print(f"gpu_check: {name}; torch {torch.__version__}; {a.n_layer} layers, {a.n_head} heads, {a.n_embd} dims, "
          f"block {a.block_size}, vocab {a.vocab}, batch {a.batch_size}; {dtype} autocast, "
          f"{'torch.compile' if a.compile else 'eager'}; median of {a.iters} iterations after {a.warmup}"
          + mfu, flush=True)
    results = [run_step(step, a, amp) for step in a.steps.split(",") if step.strip()]
    failures = [f"{r['step']}: {msg}" for r in results for msg in r["failures"]]
    print_summary(results, a)
    elapsed = time.perf_counter() - t_start  # the checks' time, which aims at five minutes
    tail = (f" (over the {FIVE_MINUTES // 60}-minute budget: the wall-time column says where; "
            f"--no-compile-decode skips compiling the decode steps)" if elapsed > FIVE_MINUTES else "")
    if a.decode_speed:
        t0 = time.perf_counter()
        try:
            print(decode_speed(a, amp))
        except Exception as e:  # measured after the checks: their results stand
            traceback.print_exc()
            failures.append(f"decode speed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        tail += f"; then the decode speed in {time.perf_counter() - t0:.0f} s"
    if failures:
        print(f"gpu_check: FAILED, {len(failures)} check(s), in {elapsed:.0f} s{tail}:", file=sys.stderr)
        for msg in failures:
            print(f"  FAIL {msg}", file=sys.stderr)
        return 1
    print(f"gpu_check: all checks passed in {elapsed:.0f} s{tail}")
    return 0


def decode_speed(a, amp):
    """V20 against the plain cache through model.generate, as make bench's
    decode section runs it (scripts/bench_kv.py decode_speed) but at this
    check's shapes, on its device and under its autocast dtype. Returns the
    section's markdown; the targets it states are measurements, not checks."""
    config = step_config("V0", a.vocab, shape_flags(a))
    record = step_config("V20", a.vocab, shape_flags(a)).v_cache
    geometry = timing_geometry(config.head_dim, record["codec"]["k"])
    models = [m.to(a.device) for m in decode_models(config, record, a.block_size, geometry)]
    speeds = {}
    for batch in a.decode_speed:
        t0 = time.perf_counter()
        with amp:
            speeds[(batch, a.block_size)] = decode_row(*models, batch, a.block_size, a.decode_speed_repeats, a.vocab)
        print(f"decode speed, batch {batch}: {decode_rates_line(speeds[(batch, a.block_size)])} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    shape = (f"this check's shape ({a.n_layer} layers, {a.n_head} heads, {a.n_embd} dims, vocab {a.vocab}; "
             f"{a.dtype} autocast, {torch.cuda.get_device_name(a.device) if a.device.startswith('cuda') else 'CPU'})")
    return format_decode(speeds, describe(record), shape)[0]


def print_summary(results, a):
    cuda = a.device.startswith("cuda")
    print(f"{'step':<4} {'ms/iter':>9} {'tokens/s':>12} {'MFU':>6} {'peak GiB':>9} {'V B/head/layer':>15} "
          f"{'V vs V0':>8} {'wall s':>7}  result")
    for r in results:
        t, v = r.get("train") or {}, r.get("v") or {}
        fmt = (lambda key, spec: format(t[key], spec) if key in t else "-")
        print(f"{r['step']:<4} {fmt('ms', '9.1f'):>9} {fmt('tokens_s', '12,.0f'):>12} "
              f"{fmt('mfu', '6.1%') if cuda else '-':>6} {fmt('peak_gib', '9.2f') if cuda else '-':>9} "
              f"{format(v['per_head_layer'], ',') if v else '-':>15} "
              f"{format(v['ratio'], '.1%') if v else '-':>8} {r['wall_s']:7.0f}  {'FAIL' if r['failures'] else 'ok'}")


# ---- --estimate: what the GPU defconfigs cost, on paper ----------------------------

class MemoryTracker(TorchDispatchMode):
    """Bytes of the tensors that ops create, live and at peak (a storage
    counts once however many views share it, until its last tensor dies),
    and the bytes each op reads and writes (views excluded), by op name.
    Run under FakeTensorMode it measures full-size shapes with no compute."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0
        self.traffic = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        flat_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage()._cdata for t in flat_in}
        name = func.overloadpacket.__name__
        moved = 0
        for t in flat_out:
            key = t.untyped_storage()._cdata
            if key in self.live:  # a view of, or an in-place op on, memory made in here
                self.live[key][1] += 1
            elif key in inputs:  # ... of memory made before: not ours to count
                continue
            else:
                self.live[key] = [t.untyped_storage().nbytes(), 1]
                self.now += self.live[key][0]
                self.peak = max(self.peak, self.now)
            weakref.finalize(t, self._drop, key)
            if key not in inputs or name.endswith("_"):  # views move nothing; in-place ops do
                moved += t.numel() * t.element_size()
        if moved:
            if name == "searchsorted":  # a binary search reads log2(n) of a row's n sorted values: count the needles
                flat_in = flat_in[1:]
            moved += sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes()) for t in flat_in)
            self.traffic[name] = self.traffic.get(name, 0) + moved
        return out

    def _drop(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def reset_peak(self):
        self.peak = self.now


def measure_training_step(step, batch, shape=()):
    """Full-size memory of one training micro-step (forward under CPU bf16
    autocast, as gpt2/train.py's loop writes it, then backward), with fake
    tensors: (after forward, peak, traffic bytes by op, params)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = GPT(step_config(step, 50257, list(shape)))
        x = torch.zeros(batch, model.config.block_size, dtype=torch.long)
        tracker = MemoryTracker()
        with tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(x, x)  # as gpt2/train.py: the logits stay referenced through backward
            after_forward = tracker.now
            loss.backward()
        return after_forward, tracker.peak, tracker.traffic, model.get_num_params(non_embedding=False)


def measure_pruned_layer(batch, n_head, T, hs=64):
    """Memory of one pruned attention layer in fp32 (lib/kv_pruning.py TokenKeep:
    the ranking, then attention under its keep mask): (kept for backward,
    forward peak, backward peak) in bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lib.kv_pruning import VOnlyPruner

    with FakeTensorMode():
        rule = VOnlyPruner(block_size=T)
        q, k, v = (torch.zeros(batch, n_head, T, hs, requires_grad=True) for _ in range(3))
        tracker = MemoryTracker()
        with tracker:
            y = rule(q, k, v)
            saved = tracker.now - y.untyped_storage().nbytes()
            forward_peak = tracker.peak
            tracker.reset_peak()
            y.backward(torch.ones_like(y))
        return saved, forward_peak, tracker.peak


def over(hours, cap_s, flag):
    """' (within FLAG)' or ' (over FLAG)' for hours against a time cap in seconds; '' for no cap."""
    return "" if not cap_s else f" ({'over' if hours * 3600 > cap_s else 'within'} {flag})"


def estimate(a):
    GB = 1e9
    rate = a.mfu * H100_BF16_PEAK
    print(f"What the GPU defconfigs cost, on paper (python scripts/gpu_check.py --estimate): bf16 peak "
          f"{H100_BF16_PEAK / 1e12:.0f} TFLOP/s (H100 and H200 SXM, dense), MFU {a.mfu:.0%}, so "
          f"{rate / 1e12:.1f} TFLOP/s of model FLOPs")

    print("\n1. FLOPs per token (GPT.estimate_mfu: 6 N + 12 L H Q T, N = parameters without wpe)")
    flops = {}
    for step in ("V0", "V19", "V20", "V21"):
        with torch.device("meta"):
            model = GPT(step_config(step, 50257, []))
        cfg = model.config
        n = model.get_num_params()
        flops[step] = model.estimate_mfu(1, 1.0, 1.0)  # FLOPs per token
        print(f"   {step:<4} N = {n:,}; 6N = {6 * n:,}; 12 L H Q T = 12 x {cfg.n_layer} x {cfg.n_head} x "
              f"{cfg.head_dim} x {cfg.block_size} = {12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size:,};"
              f" {flops[step] / 1e6:,.1f} MFLOP per token")

    B, T, nh, L = 12, 1024, 12, 12
    E = B * nh * T * T
    print(f"\n2. Memory of the pruned attention at batch {B}, block {T}, {nh} heads, {L} layers (measured "
          f"with fake tensors: lib/kv_pruning.py as it runs, full size, no compute; eager, not compiled)")
    saved, fwd, bwd = measure_pruned_layer(B, nh, T)
    print(f"   one (B, nh, T, T) tensor: {E:,} elements = {E * 4 / GB:.3f} GB in fp32, {E / GB:.3f} GB as bool")
    print(f"   one layer: kept for backward {saved / GB:.3f} GB ({saved / E:.2f} bytes per element: the keep "
          f"mask as the attention kernel takes it, additive in q's dtype, so 2 under bf16 autocast), "
          f"forward peak {fwd / GB:.3f} GB ({fwd / E:.1f} B/elt), backward peak {bwd / GB:.3f} GB "
          f"({bwd / E:.1f} B/elt)")
    print(f"   {L} layers kept for backward: {L * saved / GB:.2f} GB")
    print(f"   whole training micro-step (GPT-2 124M, batch {B}; bf16 autocast as the CPU applies it; logits "
          f"included; weights fp32 and AdamW's two moments add 12 bytes per parameter):")
    steps = {}
    for step in ("V0", "V19"):
        after, peak, traffic, n_all = measure_training_step(step, B)
        steps[step] = (peak, traffic)
        total = peak + 12 * n_all
        print(f"   {step:<4} live after forward {after / GB:5.2f} GB, peak {peak / GB:5.2f} GB, with weights and "
              f"AdamW {total / GB:5.2f} GB: " + ", ".join(f"{gpu.split(' (')[0]} {mem / GB:.0f} GB "
                                                         f"{'fits' if total < mem else 'DOES NOT FIT'}"
                                                         for gpu, (mem, _) in GPUS.items()))
    slope = (steps["V19"][0] - measure_training_step("V19", B // 2)[1]) / (B - B // 2)
    fixed = steps["V19"][0] + 12 * n_all - slope * B
    print(f"   V19's peak grows {slope / GB:.2f} GB per sequence (batch {B // 2} against {B}), so the largest "
          f"batch that fits is " + ", ".join(f"{int((mem - fixed) // slope)} on {gpu.split(' (')[0]}"
                                             for gpu, (mem, _) in GPUS.items()))

    extra = sum(steps["V19"][1].values()) - sum(steps["V0"][1].values())
    v0_s = B * T * flops["V0"] / rate
    print(f"\n3. Time the pruned attention adds. Eager, every op reads its inputs from HBM and writes its output "
          f"back; the bytes they move, V19 minus V0, per micro-batch of {B} x {T}: {extra / GB:.0f} GB")
    top = sorted(((v - steps["V0"][1].get(k, 0), k) for k, v in steps["V19"][1].items()), reverse=True)[:6]
    print("   the most by op: " + ", ".join(f"{k} {b / GB:.0f} GB" for b, k in top))
    slowdown = {}
    for gpu, (_, bandwidth) in GPUS.items():
        slowdown[gpu] = (v0_s + extra / bandwidth) / v0_s
        print(f"   {gpu}: at least {extra / bandwidth * 1000:.0f} ms per micro-batch at full bandwidth, on top of "
              f"V0's {v0_s * 1000:.1f} ms at {a.mfu:.0%} MFU: a pruned step takes about {slowdown[gpu]:.1f}x V0's time")

    print(f"\n4. The runs: tokens per iteration = batch x block x grad_accum; evaluation is forward only (a third "
          f"of the training FLOPs per token); hours = FLOPs / {rate / 1e12:.1f} TFLOP/s, times section 3's "
          f"factor for the pruned steps (V19, V20, V21)")
    for name in ("gpt2-124m-finewebedu", "gpt2-kv-pruning-ablation", "gpt2-kv-compression-ablation"):
        args = parse_args(["--config", str(ROOT / "defconfigs" / name)])
        names = [s for s in args.ablation_steps.split(",") if s] or ["V0"]
        per_iter = args.batch_size * args.block_size * args.grad_accum
        train_tokens = per_iter * args.max_iters
        evals = args.max_iters // args.eval_interval + (1 if args.max_iters % args.eval_interval else 0)
        eval_tokens = evals * 2 * args.eval_iters * args.batch_size * args.block_size
        print(f"   {name}: {args.batch_size} x {args.block_size} x {args.grad_accum} = {per_iter:,} tokens/iter x "
              f"{args.max_iters:,} iters = {train_tokens / 1e9:.3f}B tokens per step, {evals} evaluations x 2 splits "
              f"x {args.eval_iters} batches = {eval_tokens / 1e6:.1f}M tokens; "
              + (f"--matrix-time {args.matrix_time / 3600:g} h" if args.matrix_time else
                 f"--max-time {args.max_time / 3600:g} h" if args.max_time else "no time cap"))
        totals = dict.fromkeys(GPUS, 0.0)
        for step in names:
            ideal = (train_tokens * flops[step] + eval_tokens * flops[step] / 3) / rate / 3600
            pruned = step != "V0"
            cells = []
            for gpu in GPUS:
                hours = ideal * (slowdown[gpu] if pruned else 1.0)
                totals[gpu] += hours
                cells.append(f"{gpu.split(' (')[0]} {hours:.2f} h{over(hours, args.max_time, '--max-time')}")
            print(f"     {step:<4} {train_tokens * flops[step] / 1e18:.2f} EFLOP training; {ideal:.2f} h at "
                  f"{a.mfu:.0%} MFU" + (f"; with the pruned attention's traffic: {', '.join(cells)}" if pruned else ""))
        print(f"     all {len(names)}: " + ", ".join(f"{gpu.split(' (')[0]} {h:.1f} h"
                                                   f"{over(h, args.matrix_time, '--matrix-time')}"
                                                   for gpu, h in totals.items()))
    return 0


def main(argv=None):
    a = parse(argv)
    if a.estimate:
        return estimate(a)
    try:
        return check(a)
    except DeviceUnusable as e:
        print(f"gpu_check: FAIL: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

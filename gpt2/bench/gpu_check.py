"""A CUDA machine's first run: V0, V19 and V20 at GPT-2 124M shapes, checked.

    bash scripts/gpu_check.sh                  # this script with its defaults, on cuda
    python scripts/gpu_check.py --device cpu --n-layer 2 --n-head 2 --n-embd 64 --block-size 64 \\
        --vocab 96 --batch-size 2 --kv-prune-k-min 16 --kv-prune-recency 8 --no-compile   # the tests

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

Exit status 0 when every check passed; 1 with a FAIL line per failed check;
2 when the device cannot run the check at all (no CUDA, no bf16) or a flag is bad.

Beside it, on the same machine: make bench's decode-speed table (V20 against
the plain cache through model.generate) with
`python scripts/bench_kv.py --decode-only --config defconfigs/gpt2-124m-finewebedu
--device cuda --decode-batches 1,16,64 --decode-contexts 1024`; what the GPU
defconfigs cost on paper, with no device, with
`python scripts/estimate_gpu_cost.py`.
"""

import argparse
import contextlib
import math
import sys
import time
import traceback
import warnings

import torch
from torch._dynamo.utils import counters

from gpt2.ablations import STEPS
from gpt2.bench.train_steps import step_config, with_geometry
from gpt2.cli import PRUNE, parse_args
from gpt2.cpu import configure_cpu
from gpt2.entry import ArgumentParser
from gpt2.model import GPT
from gpt2.train import autocast_context, configure_optimizer, peak_flops, sync
from lib.kv_pruning import keep_budget

BF16_NOISE_FACTOR = 4  # decode under bf16 may differ from the full forward by this many times bf16's own effect
FP32_REL_TOL = 1e-3
FIVE_MINUTES = 300


class DeviceUnusable(Exception):
    """The device cannot run the check at all (exit status 2)."""


def parse(argv):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--steps", default="V0,V19,V20", help="ablation steps (gpt2/ablations.py)")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--kv-prune-k-min", type=int, default=PRUNE["k_min"])
    ap.add_argument("--kv-prune-recency", type=int, default=PRUNE["recency"])
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
    a = ap.parse_args(argv)
    if problems := setting_problems(a):
        ap.error("; ".join(problems))
    return a


def setting_problems(a):
    """Flags the check cannot run with (the device aside: check_device)."""
    least = {"--n-layer": (a.n_layer, 1), "--n-head": (a.n_head, 1), "--n-embd": (a.n_embd, 1),
             "--block-size": (a.block_size, 1), "--vocab": (a.vocab, 1), "--batch-size": (a.batch_size, 1),
             "--iters": (a.iters, 1), "--warmup": (a.warmup, 0), "--decode-batch": (a.decode_batch, 1),
             "--peak-flops": (a.peak_flops, 0)}
    problems = [f"{flag} must be >= {low}, found {value}" for flag, (value, low) in least.items() if not value >= low]
    if a.n_embd % max(a.n_head, 1):
        problems.append(f"--n-embd {a.n_embd} is not divisible by --n-head {a.n_head}")
    steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    if not steps or any(s not in STEPS for s in steps):
        problems.append(f"--steps {a.steps!r}: expected comma-separated ablation steps among {', '.join(STEPS)}")
    return problems


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
        with_geometry(model, a.batch_size)
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
    claimed = method.v_bytes(T, getattr(torch, a.dtype)) * cfg.n_layer * B * cfg.n_head
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
    if failures:
        print(f"gpu_check: FAILED, {len(failures)} check(s), in {elapsed:.0f} s{tail}:", file=sys.stderr)
        for msg in failures:
            print(f"  FAIL {msg}", file=sys.stderr)
        return 1
    print(f"gpu_check: all checks passed in {elapsed:.0f} s{tail}")
    return 0


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


def main(argv=None):
    a = parse(argv)
    try:
        return check(a)
    except DeviceUnusable as e:
        print(f"gpu_check: FAIL: {e}", file=sys.stderr)
        return 2


"""Where an eager decode step's time goes: the plain cache (V0) against pruning
+ KVSplice (V20) and pruning + int4 (V22), at the quick-start shape; or, with
--model smollm2, SmolLM2-135M's plain cache against int4 and the frontier's
best at 2.5 bits per dimension (kvtc + sinks 4 + window 64).

    python scripts/profile_decode.py                 # batch 1 and 16, prompt 896 + 96 new
    python scripts/profile_decode.py --batches 1 --top 8
    python scripts/profile_decode.py --model smollm2 --batches 1 --prompt 1024 --new 128
    python scripts/profile_decode.py --floors        # the attention work each path cannot skip

The models are those of the decode-speed section (gpt2/bench/kv_measure.py
decode_models: the quick-start shape at block_size 1024, random weights
shared by all, a SplinePCA whose spline is not the identity). For each batch
it prints, eager, through model.generate: the prefill's time, the decode
time per step and the end-to-end tokens/s against V0 (median of --repeats
round-robin rounds), then per method the aten ops of --steps decode steps
under torch.profiler, by self CPU time per step, with their calls per step.
SmolLM2 runs its pretrained weights at block_size prompt + new; the kvtc
codec is fitted (PCA and bit allocation) on V of two train batches.

--floors times, per layer at the quick-start head shape, the attention
work below which each path cannot go (floors()):
the plain prefill's fused causal kernel against the passes a prefill needs
once it must see the attention probabilities (the keep rule scores tokens by
them) and against attention under the keep rule's mask, eager and as a
compiled FlexAttention kernel; and a decode step's read of the plain cache
against the reads of the budget's tokens through SplinePCA and int4.
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from gpt2.bench.kv_measure import call_times, decode_models, generate_timings, timing_geometry
from gpt2.bench.kv_methods import step_record
from gpt2.cpu import configure_cpu
from gpt2.entry import ArgumentParser
from gpt2.model import GPTConfig
from lib.kv_pruning import keep_budget, kept_until
from lib.vcache import CODECS

QUICKSTART = dict(n_layer=4, n_head=4, n_embd=256)
PRUNE = {"keep_ratio": 0.382, "k_min": 32, "recency": 32}  # the quick-start defconfig's


def models(vocab, context):
    cfg = GPTConfig(vocab_size=vocab, **QUICKSTART)
    record = step_record("V20", PRUNE)
    plain, v20, _, v22 = decode_models(cfg, record, context, timing_geometry(cfg.n_embd // cfg.n_head, 16))
    return {"V0": plain, "V20": v20, "V22": v22}


def smollm2_models(context, data_dir=None):
    """{name: SmolLM2 at block_size context}: the plain cache, int4 and the frontier's best at 2.5
    bits per dimension (kv_memory.FRONTIER_BEST), each its own copy of the weights."""
    import copy

    from gpt2.bench.kv_bench import pretrained_with_data
    from gpt2.bench.kv_memory import FRONTIER_BEST
    from gpt2.calibrate import calibration_batches, fit_codecs, quiet
    from gpt2.pretrained import SMOLLM2
    from lib.vcache import FULL

    plain, data, _ = pretrained_with_data(SMOLLM2, context, data_dir)
    out = {"V0": plain}
    for name, record in (("int4", {"select": FULL["select"], "codec": {"kind": "int4", "group_size": 32}}),
                         ("kvtc+sinks+window", FRONTIER_BEST)):
        m = copy.deepcopy(plain)
        m.set_v_cache(record)
        if m.needs_fit():
            with quiet():
                fit_codecs(m, calibration_batches(data, 2, 1, min(256, context), 0), seed=0)
        out[name] = m
    return out


@torch.no_grad()
def step_ops(model, batch, prompt_len, steps, vocab):
    """{op: (self CPU us, calls)} per decode step, over `steps` steps after a prefill."""
    from torch.profiler import ProfilerActivity, profile

    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = model.make_cache()
    logits = model(prompt, caches=cache, last_only=True)[0]
    step = model.decode_step()
    idx = logits[:, -1].argmax(-1, keepdim=True)
    step(idx, cache)  # one step outside the profile: first-call allocations
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            idx = step(idx, cache)[:, -1].argmax(-1, keepdim=True)
    return {e.key: (e.self_cpu_time_total / steps, e.count / steps) for e in prof.key_averages()}


def _flex_under(keep, q, k, v):
    """FlexAttention of q, k, v under the mask keep (B, nh, T, T) bool, torch.compile'd (the
    first call compiles): a fused kernel that takes any mask. Its block mask is built here, once."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, nh, T, _ = keep.shape
    block = create_block_mask(lambda b, h, i, j: keep[b, h, i, j], B, nh, T, T, device=q.device)
    kernel = torch.compile(flex_attention, dynamic=False)
    return lambda: kernel(q, k, v, block_mask=block)


def floors(batch, prompt, new, repeats=10):
    """{what: ms per layer, median of `repeats`} at the quick-start head shape (4 heads of 64),
    random inputs: a prefill's attention of `prompt` tokens four ways (the keep mask is the rule's,
    from random scores; FlexAttention's compile and block mask are not timed), and a decode step's read
    at prompt + new / 2 tokens: every token's V (the plain cache) against the keep budget's
    tokens through SplinePCA (k 16, a spline that is not the identity) and through int4."""
    nh, hs = QUICKSTART["n_head"], QUICKSTART["n_embd"] // QUICKSTART["n_head"]
    g = torch.Generator().manual_seed(0)
    geometry = timing_geometry(hs, 16)  # fitted first: the fit needs gradients
    q, k, v = (torch.randn(batch, nh, prompt, hs, generator=g) for _ in range(3))
    budget = keep_budget(PRUNE["keep_ratio"], 1024, PRUNE["k_min"])
    causal = torch.ones(prompt, prompt, dtype=torch.bool).tril()
    # the keep rule's own mask, from random scores: key j's value read by queries j .. until[j] - 1
    pos = torch.arange(prompt)
    until = kept_until(torch.rand(batch, nh, prompt, generator=g), budget, PRUNE["recency"], pos)
    keep = causal & (pos[:, None] < until[..., None, :])

    def materialised():  # what a prefill that needs the probabilities cannot do without
        att = (q @ k.transpose(-2, -1)).mul_(1.0 / math.sqrt(hs)).masked_fill_(~causal, -math.inf)
        return F.softmax(att, dim=-1) @ v

    t = prompt + new // 2
    w_all, v_all = torch.randn(batch, nh, 1, t, generator=g).softmax(-1), torch.randn(batch, nh, t, hs, generator=g)
    w = torch.randn(batch, nh, 1, budget, generator=g).softmax(-1)
    held = torch.randn(batch, nh, budget, hs, generator=g)
    latents = geometry.compress(held)
    int4 = CODECS["int4"](hs, group_size=32)
    codes = int4.write(held)
    runs = {
        f"prefill of {prompt}: fused causal attention (the plain cache)":
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        f"prefill of {prompt}: logits, one softmax, weights @ V": materialised,
        f"prefill of {prompt}: fused attention under a keep mask": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep),
        f"prefill of {prompt}: FlexAttention under a keep mask, compiled": _flex_under(keep, q, k, v),
        f"step read: weights @ V of {t} tokens (the plain cache)": lambda: w_all @ v_all,
        f"step read: SplinePCA k 16, {budget} tokens": lambda: geometry.attend(w, latents),
        f"step read: int4, {budget} tokens": lambda: int4.read(w, codes),
    }
    with torch.no_grad():
        return {name: statistics.median(call_times(fn, repeats)) * 1e3 for name, fn in runs.items()}


def report(name, ops, top):
    total = sum(us for us, _ in ops.values())
    calls = sum(n for _, n in ops.values())
    lines = [f"{name}: {total / 1e3:.2f} ms of aten self time per step, {calls:.0f} op calls per step"]
    for op, (us, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"    {op:<28} {us / 1e3:7.3f} ms  {n:6.1f} calls")
    return "\n".join(lines)


def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    ap.add_argument("--prompt", type=int, default=896, help="prompt tokens (default 896)")
    ap.add_argument("--new", type=int, default=96, help="new tokens (default 96)")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin rounds of the timings (default 3)")
    ap.add_argument("--steps", type=int, default=16, help="profiled decode steps (default 16)")
    ap.add_argument("--top", type=int, default=12, help="ops shown per method (default 12)")
    ap.add_argument("--model", choices=("quickstart", "smollm2"), default="quickstart",
                    help="the quick-start shape with random weights (default), or the pretrained SmolLM2-135M")
    ap.add_argument("--data-dir", default=None, help="with --model smollm2: its prepared corpus (default data/)")
    ap.add_argument("--vocab", type=int, default=19083,
                    help="the quick-start models' vocabulary (default: its compact one)")
    ap.add_argument("--floors", action="store_true",
                    help="only the per-layer attention work each path cannot skip (under a minute)")
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches must be comma-separated ints, got {args.batches!r}")
    problems = [f"--{n} must be >= 1" for n in ("prompt", "new", "repeats", "steps", "top") if getattr(args, n) < 1]
    if any(b < 1 for b in batches):
        problems.append("--batches must be >= 1")
    if args.floors and args.model != "quickstart":
        problems.append("--floors times the quick-start head shape: leave out --model")
    if args.model == "quickstart" and args.prompt + args.new > 1024:
        problems.append(f"--prompt + --new must fit the context of 1024, got {args.prompt + args.new}")
    if problems:
        ap.error("; ".join(problems))
    configure_cpu()
    t0 = time.perf_counter()
    if args.floors:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; per layer, 4 heads of 64, "
              f"median of 10", flush=True)
        for batch in batches:
            print(f"\nbatch {batch}:")
            for name, ms in floors(batch, args.prompt, args.new).items():
                print(f"    {name:<58} {ms:8.3f} ms", flush=True)
        return 0
    if args.model == "smollm2":
        runs = smollm2_models(args.prompt + args.new, args.data_dir)
        vocab = runs["V0"].config.vocab_size
        shape = f"SmolLM2-135M at block {args.prompt + args.new}"
    else:
        runs, vocab = models(args.vocab, 1024), args.vocab
        shape = f"quick-start shape (4 layers, 4 heads, 256 dims, vocab {vocab}) at block 1024"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {shape}; prompt {args.prompt} + "
          f"{args.new} new, eager", flush=True)
    for batch in batches:
        prompt = torch.randint(0, vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(0))
        t = generate_timings({name: (m, False) for name, m in runs.items()}, prompt, args.new, args.repeats)
        e2e0 = sum(t["V0"])
        print(f"\nbatch {batch}: method  prefill ms  decode ms/step  end-to-end tok/s  x V0", flush=True)
        for name, (p, d) in t.items():
            print(f"    {name:<18} {p * 1e3:10.1f} {d * 1e3 / args.new:15.2f} {batch * args.new / (p + d):17.1f} "
                  f"{e2e0 / (p + d):6.2f}x", flush=True)
        for name, m in runs.items():
            print(report(f"  {name} (batch {batch})", step_ops(m, batch, args.prompt, args.steps, vocab),
                         args.top), flush=True)
    print(f"\nwall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

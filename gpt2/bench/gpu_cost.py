"""What the GPU defconfigs cost, on paper (scripts/estimate_gpu_cost.py): FLOPs
per token, the memory of the pruned attention and of a whole training
micro-step (measured on fake tensors of full size, so no compute), the HBM
traffic pruning adds, and the hours each GPU defconfig takes at a stated
MFU. The shapes are the GPT-2 124M defconfig's."""

import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gpt2.bench.train_steps import step_config
from gpt2.cli import parse_args
from gpt2.model import GPT
from gpt2.tokenizer import N_VOCAB
from gpt2.train import GPU_PEAK_FLOPS

ROOT = Path(__file__).resolve().parents[2]
GPT2_124M = ROOT / "defconfigs" / "gpt2-124m-finewebedu"
# H100 and H200 (SXM): dense bf16 tensor-core FLOP/s (1,979e12 is the 2:4-sparse figure)
H100_BF16_PEAK = dict(GPU_PEAK_FLOPS)["H100"]
GPUS = {"H100 SXM (80 GB, 3.35 TB/s)": (80e9, 3.35e12), "H200 (141 GB, 4.8 TB/s)": (141e9, 4.8e12)}


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
        model = GPT(step_config(step, N_VOCAB, list(shape)))
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


def estimate(mfu):
    """Print what the GPU defconfigs cost at `mfu`: FLOPs per token, the memory
    of the pruned attention and of a training micro-step, the traffic pruning
    adds, and the hours of each defconfig's runs."""
    GB = 1e9
    rate = mfu * H100_BF16_PEAK
    print(f"What the GPU defconfigs cost, on paper (python scripts/estimate_gpu_cost.py): bf16 peak "
          f"{H100_BF16_PEAK / 1e12:.0f} TFLOP/s (H100 and H200 SXM, dense), MFU {mfu:.0%}, so "
          f"{rate / 1e12:.1f} TFLOP/s of model FLOPs")
    shape = ["--config", str(GPT2_124M)]
    base = parse_args(shape)

    print("\n1. FLOPs per token (GPT.estimate_mfu: 6 N + 12 L H Q T, N = parameters without wpe)")
    flops = {}
    for step in ("V0", "V19", "V20", "V21"):
        with torch.device("meta"):
            model = GPT(step_config(step, N_VOCAB, shape))
        cfg = model.config
        n = model.get_num_params()
        flops[step] = model.estimate_mfu(1, 1.0, 1.0)  # FLOPs per token
        print(f"   {step:<4} N = {n:,}; 6N = {6 * n:,}; 12 L H Q T = 12 x {cfg.n_layer} x {cfg.n_head} x "
              f"{cfg.head_dim} x {cfg.block_size} = {12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size:,};"
              f" {flops[step] / 1e6:,.1f} MFLOP per token")

    B, T, nh, L = base.batch_size, base.block_size, base.n_head, base.n_layer
    E = B * nh * T * T
    print(f"\n2. Memory of the pruned attention at batch {B}, block {T}, {nh} heads, {L} layers (measured "
          f"with fake tensors: lib/kv_pruning.py as it runs, full size, no compute; eager, not compiled)")
    saved, fwd, bwd = measure_pruned_layer(B, nh, T, base.n_embd // nh)
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
        after, peak, traffic, n_all = measure_training_step(step, B, shape)
        steps[step] = (peak, traffic)
        total = peak + 12 * n_all
        print(f"   {step:<4} live after forward {after / GB:5.2f} GB, peak {peak / GB:5.2f} GB, with weights and "
              f"AdamW {total / GB:5.2f} GB: " + ", ".join(f"{gpu.split(' (')[0]} {mem / GB:.0f} GB "
                                                         f"{'fits' if total < mem else 'DOES NOT FIT'}"
                                                         for gpu, (mem, _) in GPUS.items()))
    slope = (steps["V19"][0] - measure_training_step("V19", B // 2, shape)[1]) / (B - B // 2)
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
              f"V0's {v0_s * 1000:.1f} ms at {mfu:.0%} MFU: a pruned step takes about {slowdown[gpu]:.1f}x V0's time")

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
                  f"{mfu:.0%} MFU" + (f"; with the pruned attention's traffic: {', '.join(cells)}" if pruned else ""))
        print(f"     all {len(names)}: " + ", ".join(f"{gpu.split(' (')[0]} {h:.1f} h"
                                                   f"{over(h, args.matrix_time, '--matrix-time')}"
                                                   for gpu, h in totals.items()))
    return 0

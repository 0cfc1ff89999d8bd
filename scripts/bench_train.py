#!/usr/bin/env python3
"""Training throughput of the CPU quick-start model (what `make bench-train` prints).

Times forward + backward + AdamW step on random tokens with the quick-start
shapes (4 layers, 4 heads, 256 dims, block 256, batch 8, compact Shakespeare
vocabulary of 19,083 ids), for the ablation steps' attention variants side by
side in one run, so the ratios are not at the mercy of a noisy machine.

    python scripts/bench_train.py [--iters 8] [--steps V0,V19] [--vocab 19083]
"""

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.calibrate import KVSpliceCalibrator  # noqa: E402
from gpt2.model import GPT  # noqa: E402
from gpt2.train import model_config_from_args  # noqa: E402
from train_ra_mla import parse_args  # noqa: E402


def with_geometry(model, k, batch, warp=True, seed=0):
    """Attach a geometry fitted on this model's own V (random tokens).

    A fit on random tokens keeps the identity spline (it does not beat PCA
    there), and the identity skips the spline's lookup altogether. With
    `warp`, the spline's slopes are set to fixed random values instead
    (knots stay at the data's quantiles): the lookup tables have a fitted
    spline's size and the timing includes them.
    """
    device = model.lm_head.weight.device
    cal = KVSpliceCalibrator(model, k, max_samples=20000)
    with contextlib.redirect_stdout(io.StringIO()):  # its per-layer lines would report the identity spline
        cal.collect(torch.randint(0, model.config.vocab_size, (batch, model.config.block_size), device=device)
                    for _ in range(2))
        geometry = cal.fit(knots=7, epochs=0 if warp else 1)
    if warp:
        gen = torch.Generator().manual_seed(seed)
        for sd in geometry["state_dict"]:
            raw = sd["spline.raw_slope"]  # (D, K+1): slopes are min_slope + exp(raw), identity ~ log(0.99)
            sd["spline.raw_slope"] = raw + 0.5 * torch.randn(raw.shape, generator=gen)
    model.attach_kvsplice(geometry)
    return model


def bench(cfg, batch, iters, warmup=2):
    torch.manual_seed(0)
    model = GPT(cfg)
    codec = cfg.v_cache["codec"]
    if codec["kind"] == "splinepca":
        with_geometry(model, codec["k"], batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]  # median


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--steps", default="V0,V19,V20,V21", help="ablation steps to time")
    ap.add_argument("--vocab", type=int, default=19083)
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; quick-start shapes: 4 layers, "
          f"4 heads, 256 dims, block 256, batch {a.batch_size}, vocab {a.vocab}; median of {a.iters} iters")
    base = None
    for step in a.steps.split(","):
        args = parse_args(["--ablation-step", step, "--n-layer", "4", "--n-head", "4", "--n-embd", "256",
                           "--block-size", "256", "--kv-prune-k-min", "32", "--kv-prune-recency", "32"])
        cfg = model_config_from_args(args, a.vocab)
        dt = bench(cfg, a.batch_size, a.iters)
        base = base or dt
        tok = a.batch_size * cfg.block_size / dt
        print(f"{step:<4} {dt * 1000:8.1f} ms/iter {tok:10,.0f} tokens/s   x{dt / base:.2f} of {a.steps.split(',')[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

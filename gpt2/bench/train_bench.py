"""Training throughput of the CPU quick-start model (what `make bench-train` prints).

Times forward + backward + AdamW step on random tokens with the quick-start
shapes (4 layers, 4 heads, 256 dims, block 256, batch 8, compact Shakespeare
vocabulary of 19,083 ids), for the ablation steps' attention variants side by
side in one run, so the ratios are not at the mercy of a noisy machine.

Two columns per step: eager, and under torch.compile (Inductor). The
compiled column is the median of the iterations after the warmup ones, so
it excludes compilation; the compile time (the warmup iterations' wall time
beyond as many steady ones) is printed on its own, each variant compiled
from empty Inductor caches (a warm cache makes reruns far faster). Every
variant is built and warmed first, then all are timed in turns, one
iteration each per round.

    python scripts/bench_train.py [--iters 8] [--steps V0,V19] [--vocab 19083] [--no-compile] [--threads N]
"""

import argparse
import tempfile
import time

import torch

from gpt2.ablations import STEPS
from gpt2.bench.train_steps import QUICKSTART, step_config, with_geometry
from gpt2.cpu import configure_cpu
from gpt2.entry import ArgumentParser
from gpt2.model import GPT

# the spline's budget on the training hot path: V20's compiled step within this factor of V0's
COMPILED_V20_TARGET = 1.10


def training_step(cfg, batch, compiled=False):
    """A closure running one forward + backward + AdamW step of a fresh model of cfg."""
    torch.manual_seed(0)
    model = GPT(cfg)
    codec = cfg.v_cache["codec"]
    if codec["kind"] == "splinepca":
        with_geometry(model, batch)
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))

    def step():
        t0 = time.perf_counter()
        _, loss = step_model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0
    return step


def warmed(step, warmup=2):
    """(step, seconds of its first `warmup` iterations): compilation happens there."""
    return step, [step() for _ in range(warmup)]


def bench(steps, iters):
    """Time warmed closures in turns, one iteration each per round, so that a
    change in the machine's load hits them all alike. Returns per closure
    (median seconds per iteration, seconds its warmup took beyond as many medians)."""
    times = [[] for _ in steps]
    for _ in range(iters):
        for (step, _), t in zip(steps, times):
            t.append(step())
    medians = [sorted(t)[len(t) // 2] for t in times]
    return [(m, max(0.0, sum(warm) - len(warm) * m)) for m, (_, warm) in zip(medians, steps)]


def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=8, help="timed iterations per step and column")
    ap.add_argument("--steps", default="V0,V19,V20,V21", help="ablation steps to time")
    ap.add_argument("--vocab", type=int, default=19083)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time each step under torch.compile")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = ap.parse_args(argv)
    steps = a.steps.split(",")
    counts = {"--iters": a.iters, "--vocab": a.vocab, "--batch-size": a.batch_size, "--threads": a.threads}
    problems = [f"{flag} must be >= 1, found {n}" for flag, n in counts.items() if n is not None and n < 1]
    if unknown := [s for s in steps if s not in STEPS]:
        problems.append(f"--steps: unknown ablation step(s) {', '.join(map(repr, unknown))}; known steps: "
                        f"{', '.join(STEPS)}")
    if problems:
        ap.error("; ".join(problems))
    configure_cpu()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; quick-start shapes: 4 layers, "
          f"4 heads, 256 dims, block 256, batch {a.batch_size}, vocab {a.vocab}; median of {a.iters} iters"
          + ("; compiled: Inductor, compile time apart" if a.compile else ""))
    header = f"{'step':<4} {'eager ms/iter':>14} {'tokens/s':>10} {'x ' + steps[0]:>7}"
    if a.compile:
        header += f" | {'compiled ms/iter':>16} {'tokens/s':>10} {'x ' + steps[0]:>7} {'compile s':>9}"
    cfgs = [step_config(step, a.vocab, QUICKSTART) for step in steps]
    closures = [warmed(training_step(cfg, a.batch_size)) for cfg in cfgs]
    if a.compile:
        from torch._inductor.utils import fresh_inductor_cache

        torch.compile(torch.sin)(torch.ones(2))  # Inductor's one-time start-up, charged to no step
        with tempfile.TemporaryDirectory(prefix="bench-train-inductor-") as cache:
            for cfg in cfgs:  # each from empty caches: its compile time, not a hit on the previous one's kernels
                with fresh_inductor_cache(dir=cache, delete=False):
                    closures.append(warmed(training_step(cfg, a.batch_size, compiled=True)))
    results = bench(closures, a.iters)
    eager, compiled = results[:len(steps)], results[len(steps):]
    print(header)
    tokens = a.batch_size * cfgs[0].block_size
    for i, step in enumerate(steps):
        dt = eager[i][0]
        row = f"{step:<4} {dt * 1000:14.1f} {tokens / dt:10,.0f} {dt / eager[0][0]:7.2f}"
        if a.compile:
            dtc, compile_s = compiled[i]
            row += f" | {dtc * 1000:16.1f} {tokens / dtc:10,.0f} {dtc / compiled[0][0]:7.2f} {compile_s:9.1f}"
        print(row)
    if a.compile and "V0" in steps and "V20" in steps:
        ratio = compiled[steps.index("V20")][0] / compiled[steps.index("V0")][0]
        verdict = "meets" if ratio <= COMPILED_V20_TARGET else "misses"
        print(f"compiled V20 / compiled V0 = {ratio:.2f} ({verdict} the target of {COMPILED_V20_TARGET:.2f})")
    return 0


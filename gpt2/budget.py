"""One iteration count for every run of an ablation matrix, from a time budget.

The steps of a matrix compare only at equal training: every run (steps x
seeds x datasets) trains the same number of iterations, hence tokens. With
--matrix-time SECONDS the runner (scripts/run_ablation.py) decides that
number once, before the first run:

- probe_pace times, for each step, a few training iterations and an
  evaluation forward pass at the configured shapes, on this machine as it is
  now, and estimates its KVSplice calibration (the collection forward passes,
  and the fit from a fit with no epoch and one with one epoch);
- iterations_for_budget picks the largest count, at most --max-iters, whose
  estimated cost for the whole matrix (the probe included) fits the budget;
- the runner records it in OUT_DIR/budget.json and passes it to every run
  as --max-iters, with no per-run time cut; a rerun or resume reads it back.

A run's estimate counts its iterations, its evaluations (2 x --eval-iters
forward passes at every --eval-interval and at the end) and its calibration.
Process start-up, checkpoint writes, the sample and the summary come on top:
a few seconds per run. The probe runs without torch.compile and on one
device; under DDP a run's iteration is timed as one rank's share of it.
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gpt2.atomic import atomic_write_text
from gpt2.calibrate import calibration_batches, fit_codecs, kept_rows, quiet
from gpt2.cpu import configure_cpu
from gpt2.data import open_data
from gpt2.method_flags import method_needs_fit
from gpt2.train import autocast_context, build_model, configure_optimizer, resolve_device, sync
from gpt2.validation import calibration_iter

PROBE_ITERS = 2  # timed training iterations per step, after one untimed (allocations, caches)
BUDGET_FILE = "budget.json"


@dataclass
class Pace:
    """Seconds one run of a step spends, as measured by probe_pace."""
    iter_s: float        # one training iteration (this rank's share of --grad-accum micro-batches)
    eval_s: float        # one evaluation: 2 splits x this rank's share of --eval-iters forward passes
    eval_interval: int
    calib_s: float = 0.0  # KVSplice calibration, once per run

    def run_seconds(self, iters):
        """Estimated seconds of a run of `iters` iterations."""
        return iters * self.iter_s + math.ceil(iters / self.eval_interval) * self.eval_s + self.calib_s


def probe_pace(args, world=1, iters=PROBE_ITERS, calibrations=None):
    """Time one step's training iteration, evaluation and calibration (args: that
    step's parsed flags; world: the processes a run will use).

    `calibrations` caches calibration estimates and fitted codec states across
    steps that calibrate alike (V20 and V21 fit the same codec): a dict, filled here.
    """
    device = resolve_device(args.device)
    if device == "cpu":
        configure_cpu()  # as the training loop does
    torch.manual_seed(args.seed)
    data = open_data(args)
    model = build_model(args, data, None).to(device)
    amp = autocast_context(device, args.dtype)[0]
    per_rank = max(1, args.grad_accum // world)

    calib_s = 0.0
    if model.needs_fit():
        calib_s, states = _probe_calibration(model, data, args, device, amp, calibrations)
        for codec, state in zip(model.v_codecs(), states):
            codec.load_state_dict(state)

    optimizer = configure_optimizer(model, args, device)
    times = []
    for it in range(iters + 1):  # the first, untimed, pays for allocations and caches
        sync(device)
        t0 = time.perf_counter()
        for j in range(per_rank):
            x, y = data.get_batch("train", args.batch_size, args.block_size, args.seed, it, j, device)
            with amp:
                _, loss = model(x, y)
            (loss / per_rank).backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)

    model.eval()
    x, y = data.get_batch("val", args.batch_size, args.block_size, args.seed, 0, 0, device)
    t0 = time.perf_counter()
    with torch.no_grad(), amp:
        model(x, y)
    sync(device)
    forward_s = time.perf_counter() - t0
    del model, optimizer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    eval_s = 2 * math.ceil(args.eval_iters / world) * forward_s
    return Pace(iter_s=sum(times[1:]) / iters, eval_s=eval_s, eval_interval=args.eval_interval, calib_s=calib_s)


def _probe_calibration(model, data, args, device, amp, cache):
    """(estimated seconds of the run's calibration, fitted codec states, one per
    layer, to time the step with).

    The run collects V over --kvsplice-max-batches forward passes, then fits
    every layer's codec (or one shared) for --kvsplice-epochs epochs. Here a
    calibrator collects as many rows as a fit will see, timing its forward
    passes, and fits them twice as one codec shared by all layers: with no
    epoch (the fit's fixed part: for a geometry, knots, PCA, tables) and with
    one (the fixed part and an epoch); fixed part + epochs x epoch, times the
    layers, estimates the run's fit. When the one-epoch fit keeps the identity
    spline, the probe's iterations skip the spline's table lookups (a small
    share of an iteration: `make bench-train` measures it)."""
    key = (model.config.n_layer, model.config.head_dim, repr(model.config.v_cache["codec"]),
           args.kvsplice_samples, args.kvsplice_max_batches, args.batch_size, args.block_size,
           args.kvsplice_epochs, args.kvsplice_shared)
    if cache is not None and key in cache:
        return cache[key]
    rows_per_batch = args.batch_size * args.block_size * model.config.n_head
    n_batches = min(args.kvsplice_max_batches, math.ceil(kept_rows(model, args.kvsplice_samples) / rows_per_batch))
    batches = list(calibration_batches(data, n_batches, args.batch_size, args.block_size, args.seed,
                                       device=device))

    def states():
        return [{n: t.clone() for n, t in codec.state_dict().items()} for codec in model.v_codecs()]

    with quiet():  # the calibrator's progress lines
        sync(device)
        cal, stats = fit_codecs(model, batches, args.kvsplice_samples, shared=True, seed=args.seed, autocast=amp,
                                epochs=0, lr=args.kvsplice_lr)
        collect_s = stats["collect_seconds"] / n_batches * args.kvsplice_max_batches
        fitted, fixed_s = states(), stats["seconds"]
        epoch_s = 0.0
        if args.kvsplice_epochs > 0:
            one_epoch_s = cal.fit(shared=True, seed=args.seed, epochs=1, lr=args.kvsplice_lr)["seconds"]
            fitted, epoch_s = states(), max(one_epoch_s - fixed_s, 0.0)
    fits = 1 if args.kvsplice_shared else model.config.n_layer
    result = (collect_s + fits * (fixed_s + args.kvsplice_epochs * epoch_s), fitted)
    if cache is not None:
        cache[key] = result
    return result


def iterations_for_budget(paces, budget_s, cap):
    """The largest n in [1, cap] whose estimated cost, summed over the runs (one
    Pace per run), fits budget_s; 0 when not even one iteration fits."""
    def fits(n):
        return sum(p.run_seconds(n) for p in paces) <= budget_s

    lo, hi = 0, cap
    while lo < hi:  # the cost grows with n: the last n that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def fewest_iterations(step_args):
    """(the fewest iterations every run needs, why): past --warmup-iters (the LR
    schedule decays after it) and past the calibration iteration of a step that
    calibrates. step_args: {label: parsed flags}."""
    need = {}
    for label, a in step_args.items():
        reasons = [(a.warmup_iters + 1, f"--warmup-iters {a.warmup_iters}")]
        if method_needs_fit(a):
            reasons.append((calibration_iter(a) + 1, f"calibration at iteration {calibration_iter(a)}"))
        for n, why in reasons:
            need.setdefault((n, why), []).append(label)
    most = max((n for n, _ in need), default=1)
    return most, "; ".join(f"{why} ({', '.join(labels)})" for (n, why), labels in need.items() if n == most)


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:  # not on every platform
        return None


def read_budget(out_dir):
    path = Path(out_dir) / BUDGET_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_budget(out_dir, record):
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out_dir) / BUDGET_FILE, json.dumps(record, indent=1) + "\n")


def pace_record(pace):
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(pace).items()}

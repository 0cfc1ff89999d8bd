"""Run the ablation steps a .config lists (what `make train` does).

Each step of CONFIG_ABLATION_STEPS runs as its own process (torchrun when
this machine has more than one GPU), with the same seed and the same number
of iterations, into OUT_DIR/<step>/ (OUT_DIR/<dataset>/<step>/ for each
dataset of CONFIG_ABLATION_DATASETS, which runs the whole matrix once per
dataset), as its own wandb run (group = the out dir's name, run name = the
step). A failing step is reported and the others still run; so is one that
ends incomplete (a feature it asked for never engaged), which the comparison
leaves out. A step with a complete summary.json is skipped unless --force;
one that was interrupted or incomplete (last.pt, no complete summary.json)
resumes. At the end the comparison table and plot are written
(gpt2/compare.py, as scripts/compare_runs.py writes them).

Every run trains --max-iters iterations. With --matrix-time SECONDS
(CONFIG_MATRIX_TIME) the whole matrix has one time budget instead: before the
first run the pace of each step is measured, one iteration count (at most
--max-iters) is chosen for all runs to fit, printed, and recorded in
OUT_DIR/budget.json, which a rerun or resume reads back (gpt2/budget.py).
Decided once: if the machine slows down later, the matrix takes longer rather
than train its steps unequally. A per-run --max-time is refused in a matrix
of several runs: each run would cut itself at its own pace, and the steps
would train different token counts.

    python scripts/run_ablation.py --config .config [--force] [extra train flags...]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from gpt2 import budget
from gpt2.ablations import STEPS, step_overrides
from gpt2.atomic import atomic_write_text
from gpt2.cli import build_parser
from gpt2.compare import INVALID, write_comparison
from gpt2.config import parse_with_config
from gpt2.data import dataset_dir_name, stale_reason
from gpt2.entry import ArgumentParser
from gpt2.recall import is_recall
from gpt2.tracking import summary_complete
from gpt2.train import format_eta
from gpt2.validation import BadArguments, matrix_problems, validate_args

ROOT = Path(__file__).resolve().parents[1]


def ensure_data(args, dataset):
    from gpt2.prepare_data import prepare

    if is_recall(dataset):  # recall tasks are generated on the fly
        return
    meta = Path(args.data_dir) / dataset_dir_name(dataset, args.tokenizer) / "meta.json"
    if meta.exists():
        stale = stale_reason(json.loads(meta.read_text()), dataset)
        if stale is None:
            return
        print(f"[ablation] {meta.parent}: {stale}", flush=True)
    print(f"[ablation] preparing dataset {dataset} ({args.tokenizer} tokens) into {args.data_dir}/", flush=True)
    prepare(dataset, args.data_dir, compact_vocab=args.compact_vocab, max_tokens=args.max_tokens or None,
            tokenizer=args.tokenizer)


def completed(run_dir):
    """A summary.json not marked incomplete."""
    path = Path(run_dir) / "summary.json"
    return path.exists() and summary_complete(json.loads(path.read_text()))


def gpu_count():
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def step_command(config, step, run_dir, group, extra, resume):
    launcher = [sys.executable]
    n_gpu = gpu_count()
    if n_gpu > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpu}"]
    cmd = launcher + [str(ROOT / "train_ra_mla.py"), "--config", str(config),
                      "--tracker-group", group, "--tracker-run-name", step or group]
    if step:
        cmd += ["--ablation-step", step]
    if resume:
        cmd.append("--resume")
    # last: an --out-dir among the extra flags names the matrix's directory, not this run's
    return cmd + extra + ["--out-dir", str(run_dir)]


class BudgetError(ValueError):
    """The matrix cannot train as asked: nothing has been trained or written."""


def run_label(dataset, step, datasets):
    return "/".join(part for part in [dataset if len(datasets) > 1 else None, step or "run"] if part)


def decide_iterations(ours, extra, args, datasets, steps, plan, out_dir):
    """The iteration count of every run of the matrix: --max-iters, or under
    --matrix-time the count this matrix's budget fits (measured now, or read back
    from OUT_DIR/budget.json)."""
    tokens_per_iter = args.batch_size * args.block_size * args.grad_accum
    if problems := matrix_problems(args):
        raise BudgetError("; ".join(problems))
    if args.matrix_time <= 0:
        print(f"[ablation] every run trains --max-iters {args.max_iters} iterations "
              f"({args.max_iters * tokens_per_iter:,} tokens)", flush=True)
        return args.max_iters
    path = out_dir / budget.BUDGET_FILE
    recorded = None if ours.force else budget.read_budget(out_dir)
    if recorded is not None:
        print(f"[budget] {recorded['iters']} iterations per run ({recorded['tokens_per_run']:,} tokens), as decided "
              f"for this matrix in {path} (FORCE=1 measures the pace again)", flush=True)
        return recorded["iters"]

    world = max(gpu_count(), 1)
    step_args, skipped = {}, []
    for dataset in datasets:
        for step in steps or [""]:
            argv = ["--config", str(ours.config), *extra, *(["--ablation-step", step] if step else []),
                    *(["--dataset", dataset] if dataset else [])]
            a = parse_with_config(build_parser(), argv, step_overrides)
            try:
                validate_args(a, world)
                step_args[run_label(dataset, step, datasets)] = a
            except BadArguments:
                skipped.append(run_label(dataset, step, datasets))  # its run reports why, and fails fast
    floor, why = budget.fewest_iterations(step_args)
    load = budget.load_average()
    print(f"[budget] measuring the pace of {', '.join(step_args)}: {budget.PROBE_ITERS} training iterations "
          f"each at the configured shapes" + (f" (load average {load:.2f})" if load is not None else ""), flush=True)
    t0 = time.perf_counter()
    paces, calibrations = {}, {}
    for label, a in step_args.items():
        paces[label] = budget.probe_pace(a, world, calibrations=calibrations)
    probe_s = time.perf_counter() - t0
    runs = [paces[run_label(d, s, datasets)] for d, _, s in plan if run_label(d, s, datasets) in paces]
    iters = budget.iterations_for_budget(runs, args.matrix_time - probe_s, args.max_iters)
    cost = probe_s + sum(p.run_seconds(iters) for p in runs)
    described = ", ".join(f"{label} {p.iter_s * 1000:,.0f} ms/iter"
                          + (f" + calibration ~{p.calib_s:.0f} s" if p.calib_s else "") for label, p in paces.items())
    print(f"[budget] pace measured: {described} (the probe took {probe_s:.0f} s)", flush=True)
    if iters < floor:
        raise BudgetError(
            f"--matrix-time {args.matrix_time:g} s fits {iters} iterations per run for the {len(runs)} runs of this "
            f"matrix at the pace measured, but every run needs at least {floor} ({why}): raise "
            f"--matrix-time (CONFIG_MATRIX_TIME), or lower --warmup-iters / --kvsplice-calib-iter")
    cap = " (the --max-iters cap)" if iters == args.max_iters else ""
    print(f"[budget] --matrix-time {args.matrix_time:g} s for {len(plan)} runs: {iters} iterations per run{cap}, "
          f"{iters * tokens_per_iter:,} tokens each; training estimated at {format_eta(cost)}, the probe included"
          + (f"; not measured, bad arguments: {', '.join(skipped)}" if skipped else "")
          + f"; recorded in {path}", flush=True)
    budget.write_budget(out_dir, {
        "iters": iters, "tokens_per_run": iters * tokens_per_iter, "max_iters": args.max_iters,
        "matrix_time": args.matrix_time, "runs": len(plan), "estimated_s": round(cost, 1),
        "probe_s": round(probe_s, 1), "load_average": load, "world": world,
        "pace": {label: budget.pace_record(p) for label, p in paces.items()},
        "decided": time.strftime("%Y-%m-%d %H:%M:%S")})
    return iters


def runner_parser():
    """The runner's own flags; every other flag goes to each step's training. No abbreviations: the
    trainer's --seed must reach the trainer, not be read as the runner's --seeds."""
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                        allow_abbrev=False)
    ap.add_argument("--config", required=True, help=".config to run")
    ap.add_argument("--force", action="store_true", help="rerun steps that already completed")
    ap.add_argument("--prepare-only", action="store_true", help="only prepare the dataset")
    ap.add_argument("--steps", default=None, help="override CONFIG_ABLATION_STEPS (comma-separated)")
    ap.add_argument("--seeds", default=None,
                    help="comma-separated seeds: run the whole matrix once per seed into OUT_DIR/seed<N>/<step>/; "
                         "the summary then gives mean +- sd per step")
    return ap


def main(argv=None):
    runner = runner_parser()
    ours, extra = runner.parse_known_args(argv)
    args = parse_with_config(build_parser(), ["--config", ours.config] + extra, step_overrides)
    steps = [s.strip() for s in (ours.steps or args.ablation_steps).split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown and not ours.prepare_only:
        print(f"unknown ablation step(s) {unknown}; known steps: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in ours.seeds.split(",")] if ours.seeds else [None]
    except ValueError:
        runner.error(f"--seeds expects comma-separated integers, found {ours.seeds!r}")
    datasets = [d.strip() for d in args.ablation_datasets.split(",") if d.strip()] or [None]
    for dataset in datasets:
        ensure_data(args, dataset or args.dataset)
    if ours.prepare_only:
        return 0

    out_dir = Path(args.out_dir)
    group = out_dir.name
    plan = [(dataset, seed, step) for dataset in datasets for seed in seeds for step in (steps or [""])]
    if args.max_time > 0 and len(plan) > 1:
        print(f"[ablation] --max-time {args.max_time:g} (CONFIG_MAX_TIME) would let each of the {len(plan)} runs of "
              f"this matrix cut its own schedule at its own pace, so the steps would train different token counts; "
              f"give the whole matrix one budget with --matrix-time (CONFIG_MATRIX_TIME) instead", file=sys.stderr)
        return 2
    try:
        iters = decide_iterations(ours, extra, args, datasets, steps, plan, out_dir)
    except BudgetError as e:
        print(f"[budget] error: {e}", file=sys.stderr)
        return 2
    budget_flags = ["--max-iters", str(iters)]
    run_dirs, failed = {dataset: [] for dataset in datasets}, []
    for n, (dataset, seed, step) in enumerate(plan, 1):
        base = out_dir if dataset is None else out_dir / dataset
        base = base if seed is None else base / f"seed{seed}"
        run_dir = base / step if step else base
        parts = [dataset, step or None, None if seed is None else f"seed{seed}"]
        name = "-".join(part for part in parts if part)
        label = " ".join(part for part in [dataset, step or "(single run)", parts[2]] if part)
        seed_flags = ([] if seed is None else ["--seed", str(seed)]) + (["--tracker-run-name", name] if name else [])
        seed_flags += [] if dataset is None else ["--dataset", dataset]
        if completed(run_dir) and not ours.force:
            trained = json.loads((run_dir / "summary.json").read_text()).get("iters")
            other = f", but it trained {trained} iterations, not {iters}" if trained != iters else ""
            print(f"[ablation] {label}: already complete in {run_dir}{other}, skipped (FORCE=1 reruns it)")
            run_dirs[dataset].append(run_dir)
            continue
        resume = (run_dir / "last.pt").exists() and not ours.force
        print(f"\n[ablation] run {n}/{len(plan)}: {label} -> {run_dir}"
              f"{' (resuming)' if resume else ''}", flush=True)
        t0 = time.time()
        rc = subprocess.call(step_command(ours.config, step, run_dir, group, extra + seed_flags + budget_flags,
                                          resume), cwd=ROOT)
        if rc != 0:
            print(f"[ablation] {label} FAILED (exit {rc}) after {time.time() - t0:.0f}s; continuing")
            failed.append(label)
            continue
        print(f"[ablation] {label} done in {time.time() - t0:.0f}s")
        run_dirs[dataset].append(run_dir)

    invalid = False
    if len(plan) > len(datasets) or len(datasets) > 1:
        texts = [write_comparison(dirs, out_dir if dataset is None else out_dir / dataset, dataset)
                 for dataset, dirs in run_dirs.items() if dirs]
        if len(datasets) > 1 and texts:
            atomic_write_text(out_dir / "summary.md", "\n".join(texts))
            print(f"wrote {out_dir / 'summary.md'}")
        invalid = any(INVALID in text for text in texts)
    if failed:
        print(f"[ablation] failed steps: {', '.join(failed)}", file=sys.stderr)
    if invalid:
        print(f"[ablation] {INVALID}: the runs in {out_dir} trained different token counts (summary.md)",
              file=sys.stderr)
    return 1 if failed or invalid else 0


"""The training loop behind train_ra_mla.py.

nanoGPT's train.py, restructured into functions: DDP setup, model and
optimizer construction, the LR schedule, evaluation, atomic checkpoints, and
the loop itself. KVSplice calibration runs inside the loop at
--kvsplice-calib-iter, on the model as trained so far.
"""

import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2.atomic import atomic_torch_save
from gpt2.calibrate import LOG, calibration_batches, fit_codecs
from gpt2.cpu import configure_cpu
from gpt2.data import TokenData, open_data
from gpt2.geometry import load_fitted, save_fitted
from gpt2.lm import CausalLM, load_checkpoint
from gpt2.method_flags import method_record
from gpt2.model import GPT, GPTConfig
from gpt2.prepare_data import decode_tokens, unigram_entropy
from gpt2.pretrained import load_pretrained, model_from_checkpoint, source_family
from gpt2.recall import RecallData, accuracy_names, answer_accuracy, format_accuracy
from gpt2.tracking import Tracker
from gpt2.validation import BadArguments, calibration_iter, sample_prompt_ids, validate_args
from lib.vcache import describe, describe_part

CHECKPOINT_FORMAT = 2  # 1: the KVSplice geometry in a side entry, "kvsplice"
EVAL_SEED_SALT = 7919  # evaluation batches: seed + this, the same at every evaluation


@dataclass
class Runtime:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: str = "cpu"
    ddp: bool = False

    @property
    def master(self):
        return self.rank == 0


def resolve_device(device_arg):
    """--device: "auto" is cuda when this machine has a GPU, else cpu."""
    if device_arg == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device_arg


def sync(device):
    """Wait for the device's queued work (CUDA runs asynchronously), so a timer reads the work done."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# dense bf16 tensor-core peaks from NVIDIA's datasheets, by a part of the name
# torch.cuda.get_device_name gives; the first match counts (PCIe and NVL
# parts before the SXM ones whose names they contain)
GPU_PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                  ("H800", 989e12), ("A100", 312e12))


def peak_flops(device, flag=0.0):
    """The peak FLOP/s MFU is measured against: --peak-flops when it is set
    (> 0), else GPU_PEAK_FLOPS for the GPU's name; None on a CPU or a GPU not
    in the table (then no MFU is reported, rather than one against a wrong peak)."""
    if flag > 0:
        return flag
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in GPU_PEAK_FLOPS if part in name), None)


def setup_runtime(device_arg):
    """Device choice and, under torchrun, the process group (NCCL on CUDA, gloo on CPU)."""
    device_arg = resolve_device(device_arg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        if device_arg.startswith("cuda"):
            device_arg = f"cuda:{local_rank}"
            torch.cuda.set_device(device_arg)
            dist.init_process_group("nccl")
        else:
            # share the cores between the processes on this machine
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
            dist.init_process_group("gloo")
        return Runtime(rank, local_rank, world, device_arg, True)
    return Runtime(device=device_arg)


def autocast_context(device, dtype_arg):
    if dtype_arg == "auto":
        dtype_arg = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype_arg == "float32":
        return nullcontext(), dtype_arg
    dtype = getattr(torch, dtype_arg)
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype), dtype_arg


class IncompleteRun(RuntimeError):
    """The run trained, but a feature it asked for never engaged; its
    summary.json says so ("complete": false), so nothing downstream counts it."""


def model_config_from_args(args, vocab_size):
    return GPTConfig(
        block_size=args.block_size, vocab_size=vocab_size, n_layer=args.n_layer,
        n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=args.bias,
        v_cache=method_record(args), rmlp=args.rmlp, rmlp_rff=args.rmlp_rff,
    )


def build_model(args, data, ckpt):
    if ckpt is not None:
        model = model_from_checkpoint(ckpt)
    elif args.init_from == "scratch":
        model = GPT(model_config_from_args(args, data.vocab_size))
    else:
        llama = source_family(args.init_from) == "llama"
        if isinstance(data, RecallData) or data.meta.get("compact"):
            raise ValueError(f"--init-from {args.init_from} needs the full {'its tokenizer' if llama else 'GPT-2'} "
                             f"vocabulary, but {data.dir} has its own (a recall task, or --compact-vocab)")
        if llama:
            model = load_pretrained(args.init_from, dropout=args.dropout, v_cache=method_record(args))
        else:
            model = GPT.from_pretrained(args.init_from, dropout=args.dropout, v_cache=method_record(args),
                                        rmlp=args.rmlp, rmlp_rff=args.rmlp_rff)
        if model.config.vocab_size < data.vocab_size:
            raise ValueError(f"--init-from {args.init_from} has {model.config.vocab_size:,} token ids, fewer "
                             f"than {data.dir}'s {data.vocab_size:,}")
        if args.block_size > model.config.block_size:
            raise ValueError(f"--block-size {args.block_size} exceeds the context of --init-from "
                             f"{args.init_from}, {model.config.block_size} positions")
        if args.block_size < model.config.block_size:
            model.crop_block_size(args.block_size)
    if args.kvsplice_load and model.needs_fit():
        load_fitted(args.kvsplice_load, model)
    if args.trainable:
        freeze_all_but(model, args.trainable)
    return model


def freeze_all_but(model, pattern):
    """Train only the parameters whose names match the regular expression
    `pattern` (--trainable); ValueError when none does."""
    names = [n for n, _ in model.named_parameters() if ".vcache." not in n]  # a codec's state is never trained
    chosen = {n for n in names if re.search(pattern, n)}
    if not chosen:
        raise ValueError(f"--trainable {pattern!r} matches none of the model's parameters, e.g. {names[:3]}")
    for n, p in model.named_parameters():
        if ".vcache." not in n:
            p.requires_grad_(n in chosen)


def calibrate_model(model, data, args, rt, tracker, step):
    """Fit every layer's V codec on V of the model as trained so far, and save it.

    Under DDP, rank 0 collects and fits; the fitted states are broadcast so
    every rank holds the identical codecs. `model` is the raw module (not the
    compiled or DDP wrapper): hooks see plain calls of its V projections.
    """
    codec = model.config.v_cache["codec"]
    states = None
    if rt.master:
        LOG.info(f"calibrating at iteration {step}: {args.kvsplice_max_batches} batches, {describe_part(codec)}")
        t0 = time.time()
        batches = calibration_batches(data, args.kvsplice_max_batches, args.batch_size, args.block_size, args.seed,
                                      step, rt.device)
        cal, fit_stats = fit_codecs(model, batches, args.kvsplice_samples, args.kvsplice_shared, args.seed,
                                    autocast_context(rt.device, args.dtype)[0],
                                    epochs=args.kvsplice_epochs, lr=args.kvsplice_lr)
        save_fitted(model, Path(args.out_dir) / args.kvsplice_save, fit_stats)
        if args.kvsplice_dump_samples:
            cal.dump_samples(args.kvsplice_dump_samples)
        record = {"kvsplice/seconds": time.time() - t0, "kvsplice/fit_seconds": fit_stats["seconds"]}
        for i, s in enumerate(fit_stats["layers"]):  # every numeric statistic of every codec's fit
            record.update({f"kvsplice/layer{i}_{name}": float(value) for name, value in s.items()
                           if isinstance(value, (int, float)) and not isinstance(value, bool)})
        tracker.log(record, step=step)
        states = [{n: t.cpu() for n, t in c.state_dict().items()} for c in model.v_codecs()]
    if rt.ddp:
        box = [states]
        dist.broadcast_object_list(box, src=0)
        if not rt.master:
            for c, state in zip(model.v_codecs(), box[0]):
                c.load_state_dict(state)


def configure_optimizer(model, args, device):
    """AdamW; weight decay on matrices only (nanoGPT); frozen parameters excluded."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.beta1, args.beta2), fused=fused)


def schedule_iters_for_budget(it, elapsed, args):
    """How many iterations the LR schedule spans: --max-iters, unless --max-time
    would end the run first; then the iterations that fit the budget at the
    pace measured so far (it iterations in `elapsed` seconds).

    Decided once, at the end of warmup: every later LR is a function of the
    iteration alone, so a run whose time budget does not bind is reproducible
    however fast the machine happens to be, and one whose budget binds still
    ends at the minimum LR.
    """
    if args.max_time <= 0 or it == 0 or elapsed <= 0:
        return args.max_iters
    fit = it + int((args.max_time - elapsed) * it / elapsed)
    return max(it + 1, min(args.max_iters, fit))


def schedule_progress(it, schedule_iters, args):
    """How far through the decay we are, in [0, 1]."""
    span = max(1, schedule_iters - args.warmup_iters)
    return min(max((it - args.warmup_iters) / span, 0.0), 1.0)


def learning_rate(it, progress, args):
    """Linear warmup over --warmup-iters, then cosine decay to min_lr at the end of the budget."""
    if it < args.warmup_iters:
        return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
    min_lr = args.learning_rate * args.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.learning_rate - min_lr)


@torch.no_grad()
def estimate_loss(model, data, args, rt, amp):
    """Mean loss over --eval-iters fixed batches per split, shared out across ranks;
    on recall data also answer accuracy on val (overall, near and far: the answer
    inside or beyond --kv-prune-recency tokens back; per task)."""
    model.eval()
    out = {}
    names = accuracy_names(data.tasks) if isinstance(data, RecallData) else []
    for split in ("train", "val"):
        total = torch.zeros(2 + 2 * len(names), dtype=torch.float64, device=rt.device)
        for j in range(rt.rank, args.eval_iters, rt.world):
            if names:
                x, y, distance, task = data.get_batch_with_distance(split, args.batch_size, args.block_size,
                                                                    args.seed + EVAL_SEED_SALT, 0, j)
                x, y, distance, task = (t.to(rt.device) for t in (x, y, distance, task))
            else:
                x, y = data.get_batch(split, args.batch_size, args.block_size,
                                      args.seed + EVAL_SEED_SALT, 0, j, rt.device)
            with amp:
                logits, loss = model(x, y)
            counts = [loss.item(), 1.0] + [0.0] * (2 * len(names))
            if names and split == "val":
                acc = answer_accuracy(logits, y, distance, task, args.kv_prune_recency)  # on device: no logits copy
                counts[2:] = [v for name in names for v in acc.get(name, (0, 0))]
            total += torch.tensor(counts, dtype=torch.float64, device=rt.device)
        if rt.ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
        if split == "val":
            for i, name in enumerate(names):
                correct, n = total[2 + 2 * i].item(), total[3 + 2 * i].item()
                out[f"val_{name}"] = correct / n if n else None
    model.train()
    return out


def format_eta(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@dataclass
class Run:
    """Everything one training run holds; its progress is what checkpoints save."""
    args: object
    rt: Runtime
    out_dir: Path
    data: TokenData
    raw_model: CausalLM     # the module itself: hooks, checkpoints, fitted codecs
    model: object           # what the step calls: raw_model, compiled and/or DDP-wrapped
    optimizer: object
    scaler: object
    amp: object             # the autocast context
    tracker: Tracker
    tokens_per_iter: int
    it: int = 0
    schedule_iters: int = 0
    best_val: float = float("inf")
    elapsed: float = 0.0    # wall seconds since the run started, across resumes
    tokens: int = 0
    t_train: float = 0.0    # seconds spent in training steps only (throughput)
    peak_flops: float = None  # per process, for MFU (peak_flops()); None: no MFU

    def log(self, *a, **k):
        if self.rt.master:
            print(*a, **k)


def train(args, on_iter=None):
    """Train as args say; returns the summary dict. `on_iter(it)` is called after each step.

    Raises BadArguments (nothing written) for arguments that cannot make a
    run, and IncompleteRun (after writing summary.json) for a run in which a
    feature it asked for never engaged.
    """
    validate_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    rt = setup_runtime(args.device)
    try:
        return _train(args, rt, on_iter)
    finally:
        if rt.ddp:
            dist.destroy_process_group()


def _train(args, rt, on_iter):
    run = setup(args, rt)
    calib_iter = calibration_iter(args)
    decide_at = max(args.warmup_iters, 1)  # when a time budget fixes schedule_iters
    it_start, t_start = run.it, time.time() - run.elapsed
    losses = None
    run.model.train()
    try:
        while run.it < run.schedule_iters and not (args.max_time > 0 and run.elapsed >= args.max_time):
            if run.it >= calib_iter and run.raw_model.needs_fit():
                calibrate_model(run.raw_model, run.data, args, rt, run.tracker, step=run.it)
            if run.it == decide_at and args.max_time > 0:
                fix_schedule(run)
            lr, loss_sum, dt = train_step(run)
            run.elapsed = agreed_elapsed(run, time.time() - t_start)
            if run.it % args.log_interval == 0 or run.it == run.schedule_iters:
                log_step(run, lr, loss_sum, dt, it_start)
            if run.it % args.eval_interval == 0:
                losses = evaluate_and_checkpoint(run)
            if on_iter is not None:
                on_iter(run.it)
    except KeyboardInterrupt:
        # nothing lost: the completed iterations go to last.pt, --resume continues
        if rt.master:
            atomic_torch_save(checkpoint_state(run), run.out_dir / "last.pt")
            run.log(f"interrupted: saved {run.out_dir / 'last.pt'} at iteration {run.it}; continue with --resume")
        run.tracker.close(exit_code=1)
        raise
    if losses is None or run.it % args.eval_interval:
        losses = evaluate_and_checkpoint(run)
    summary = finish_summary(run.raw_model, run.data, args, losses, run.best_val, run.it, run.tokens,
                             run.t_train, run.elapsed)
    reason = unengaged_features(run, calib_iter)
    summary.update(complete=reason is None, incomplete_reason=reason)
    if rt.master:
        print_results(summary)
        if args.sample_tokens > 0 and isinstance(run.data, TokenData):
            print_sample(run.raw_model, run.data, args, rt.device)
    run.tracker.finish(summary, exit_code=0 if reason is None else 1)
    if reason is not None:
        raise IncompleteRun(reason)
    return summary


def unengaged_features(run, calib_iter):
    """Why the trained model is not what the arguments asked for, or None."""
    args = run.args
    if run.raw_model.needs_fit():
        budget = f" under --max-time {args.max_time:g}s" if args.max_time > 0 else ""
        return (f"{describe(run.raw_model.config.v_cache)}: calibration (its codec's fit) was due at iteration "
                f"{calib_iter}, but training ended at iteration {run.it}{budget}, so the model trained without "
                f"its codec; raise --max-time or lower --kvsplice-calib-iter")
    return None


def setup(args, rt):
    """Build data, model, optimizer and tracker; restore them on --resume.

    Everything that can reject the arguments (the checkpoint, the model, a
    geometry to load) comes before the run directory is created."""
    if rt.device == "cpu":
        configure_cpu()  # denormals flushed, freed memory reused (gpt2/cpu.py)
    if rt.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    data = open_data(args)
    try:
        ckpt = load_checkpoint(out_dir / "last.pt", map_location=rt.device) if args.resume else None
        if ckpt is not None:
            check_resume(args, ckpt, out_dir / "last.pt")
        raw_model = build_model(args, data, ckpt).to(rt.device)
    except (OSError, ValueError) as e:
        raise BadArguments(f"bad arguments:\n  {e}") from None
    if rt.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            print(f"resuming from {out_dir / 'last.pt'} at iteration {ckpt['iter']}")
    optimizer = configure_optimizer(raw_model, args, rt.device)
    progress = {"schedule_iters": args.max_iters}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        progress = {"it": ckpt["iter"], "best_val": ckpt["best_val_loss"], "elapsed": ckpt["elapsed"],
                    "tokens": ckpt["tokens"], "schedule_iters": ckpt["schedule_iters"]}
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if rt.device.startswith("cuda") and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
        del ckpt
    model = torch.compile(raw_model) if args.compile else raw_model
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device.startswith("cuda") else None)
    amp, dtype_name = autocast_context(rt.device, args.dtype)
    tracker = Tracker(out_dir, vars(args), kind=args.tracker, project=args.tracker_project,
                      run_name=args.tracker_run_name, group=args.tracker_group, rank=rt.rank)
    run = Run(args, rt, out_dir, data, raw_model, model, optimizer,
              torch.amp.GradScaler(enabled=(dtype_name == "float16")), amp, tracker,
              args.batch_size * args.block_size * args.grad_accum, peak_flops=peak_flops(rt.device, args.peak_flops),
              **progress)
    if args.resume:
        tracker.truncate_after(run.it)
    cfg = raw_model.config
    every = sum(p.numel() for n, p in raw_model.named_parameters() if ".vcache." not in n)
    trained = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    frozen = (f" ({trained / 1e6:.2f}M of {every / 1e6:.2f}M trained: --trainable {args.trainable})"
              if args.trainable else "")
    run.log(f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters{frozen}, {cfg.n_layer} layers, "
            f"{cfg.n_head} heads, head_dim {cfg.head_dim}, block {cfg.block_size}, vocab {cfg.vocab_size}")
    sizes = ("" if isinstance(data, RecallData)
             else f" ({len(data.splits['train']):,} train / {len(data.splits['val']):,} val tokens)")
    run.log(f"data: {data.dir}{sizes}; "
            f"{run.tokens_per_iter:,} tokens/iter = {args.batch_size} x {args.block_size} x {args.grad_accum} "
            f"over {rt.world} process(es); device {rt.device}, {dtype_name}")
    if rt.device.startswith("cuda"):
        run.log(f"MFU against {run.peak_flops / 1e12:,.0f} TFLOP/s per GPU" if run.peak_flops else
                f"MFU not logged: no known peak for {torch.cuda.get_device_name(rt.device)!r}; "
                f"pass --peak-flops (its dense bf16 FLOP/s)")
    return run


def check_resume(args, ckpt, path):
    """--resume continues the saved run as it was scheduled: the LR schedule
    spans the checkpoint's --max-iters, so a different one is refused (a
    silent mix of the two schedules would be neither run)."""
    saved = (ckpt.get("args") or {}).get("max_iters", args.max_iters)
    if saved != args.max_iters:
        raise ValueError(f"--resume: {path} belongs to a run of --max-iters {saved}, but --max-iters is "
                         f"{args.max_iters}; its LR schedule was set by --max-iters {saved}: resume with "
                         f"--max-iters {saved}, or start a new run in another --out-dir")


def fix_schedule(run):
    """At the end of warmup, let a time budget shorten the LR schedule, once."""
    run.schedule_iters = schedule_iters_for_budget(run.it, run.elapsed, run.args)
    if run.rt.ddp:  # every rank follows rank 0's decision
        n = torch.tensor([run.schedule_iters], device=run.rt.device)
        dist.broadcast(n, 0)
        run.schedule_iters = int(n.item())
    if run.schedule_iters < run.args.max_iters:
        run.log(f"time budget: {run.args.max_time:.0f}s fits {run.schedule_iters} iterations at "
                f"{run.elapsed / run.it:.2f}s each; the LR schedule ends there")


def train_step(run):
    """One optimizer step over --grad-accum micro-batches; returns (lr, summed loss, seconds)."""
    args, rt = run.args, run.rt
    lr = learning_rate(run.it, schedule_progress(run.it, run.schedule_iters, args), args)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    t0 = time.time()
    per_rank = args.grad_accum // rt.world
    loss_sum = torch.zeros((), device=rt.device)
    for j in range(per_rank):
        x, y = run.data.get_batch("train", args.batch_size, args.block_size, args.seed, run.it,
                                  rt.rank * per_rank + j, rt.device)
        grad_sync = nullcontext() if (not rt.ddp or j == per_rank - 1) else run.model.no_sync()
        with grad_sync:
            with run.amp:
                loss = run.model(x, y)[1]  # drop the logits now: they would live through backward
            run.scaler.scale(loss / per_rank).backward()
        loss_sum += loss.detach()
    if args.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), args.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.it += 1
    run.tokens += run.tokens_per_iter
    sync(rt.device)
    dt = time.time() - t0
    run.t_train += dt
    return lr, loss_sum, dt


def agreed_elapsed(run, elapsed):
    """Under DDP with a time budget every rank must agree on when time is up: rank 0's clock."""
    if run.args.max_time > 0 and run.rt.ddp:
        e = torch.tensor([elapsed], dtype=torch.float64, device=run.rt.device)
        dist.broadcast(e, 0)
        elapsed = e.item()
    return elapsed


def log_step(run, lr, loss_sum, dt, it_start):
    """The progress line, and the same figures to the tracker."""
    args, rt = run.args, run.rt
    per_rank = args.grad_accum // rt.world
    if rt.ddp:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    loss_val = loss_sum.item() / per_rank
    tpi = run.tokens_per_iter
    record = {"iter": run.it, "tokens": run.tokens, "loss": loss_val, "lr": lr,
              "ms_per_iter": dt * 1000, "tokens_per_s": tpi / dt}
    line = (f"iter {run.it}/{run.schedule_iters} | loss {loss_val:.4f} | lr {lr:.2e} | "
            f"{dt * 1000:.0f} ms/iter | {tpi / dt:,.0f} tok/s")
    if run.peak_flops:
        record["mfu"] = run.raw_model.estimate_mfu(tpi, dt, run.peak_flops * rt.world)
        line += f" | mfu {record['mfu'] * 100:.1f}%"
    remaining = (run.schedule_iters - run.it) * run.t_train / (run.it - it_start)
    if args.max_time > 0:
        remaining = min(remaining, args.max_time - run.elapsed)
    run.tracker.log(record, step=run.it)
    run.log(line + f" | ETA {format_eta(remaining)}")


def checkpoint_state(run):
    return {
        "format_version": CHECKPOINT_FORMAT,
        "model": run.raw_model.state_dict(),  # the fitted codecs' state included
        "model_family": run.raw_model.family,
        "model_config": asdict(run.raw_model.config),
        "optimizer": run.optimizer.state_dict(),
        "iter": run.it, "schedule_iters": run.schedule_iters, "best_val_loss": run.best_val,
        "elapsed": run.elapsed, "tokens": run.tokens,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if run.rt.device.startswith("cuda") else None},
        "args": vars(run.args),
    }


def evaluate_and_checkpoint(run):
    """Evaluate both splits; write best.pt when val improved and last.pt always."""
    losses = estimate_loss(run.model, run.data, run.args, run.rt, run.amp)
    val = losses["val"]
    record = {"iter": run.it, "tokens": run.tokens, "train_loss": losses["train"], "val_loss": val,
              "val_ppl": math.exp(min(val, 50)), **{k: v for k, v in losses.items() if k.startswith("val_acc")}}
    run.tracker.log(record, step=run.it)
    accuracy = f", {format_accuracy(record, run.data.tasks)}" if isinstance(run.data, RecallData) else ""
    run.log(f"eval  {run.it}: train loss {losses['train']:.4f}, val loss {val:.4f}, "
            f"val ppl {record['val_ppl']:.2f}{accuracy}")
    if run.rt.master:
        if val < run.best_val:
            run.best_val = val
            atomic_torch_save(checkpoint_state(run), run.out_dir / "best.pt")
        atomic_torch_save(checkpoint_state(run), run.out_dir / "last.pt")
    return losses


def finish_summary(model, data, args, losses, best_val, it, tokens, t_train, elapsed):
    val = losses["val"]
    recall = isinstance(data, RecallData)
    baseline = ({"chance_loss": data.chance_loss(), "recall_tasks": list(data.tasks)} if recall
                else {"unigram_entropy": unigram_entropy(data.dir)})
    return {
        "step": args.ablation_step, "final_val_loss": val, "final_train_loss": losses["train"],
        "best_val_loss": min(best_val, val), "val_ppl": math.exp(min(val, 50)),
        **baseline, **{k: v for k, v in losses.items() if k.startswith("val_acc")}, "iters": it, "tokens": tokens,
        "tokens_per_s": tokens / t_train if t_train > 0 else None, "wall_s": elapsed,
        "params": model.get_num_params(), "v_cache": v_cache_footprint(model),
        "v_cache_method": model.config.v_cache,
    }


@torch.no_grad()
def v_cache_footprint(model):
    """V-cache elements and bytes per head of V (a KV head under grouped-query
    attention) per layer at block_size, read off a real cache."""
    cfg = model.config
    was_training = model.training
    model.eval()
    cache = model.make_cache()
    device = model.lm_head.weight.device
    idx = torch.zeros(1, cfg.block_size, dtype=torch.long, device=device)
    model(idx, caches=cache)
    model.train(was_training)
    layer = cache.layers[0]
    return {"elements_per_head": layer.v_elements_per_head(),
            "bytes_per_head": layer.v_bytes_per_head(),
            "baseline_elements_per_head": cfg.block_size * cfg.head_dim}


def print_results(s):
    print("\n== results ==")
    if "recall_tasks" in s:
        print(f"final val loss {s['final_val_loss']:.4f} on answers; chance {s['chance_loss']:.4f} nats")
        print(f"final val {format_accuracy(s, s['recall_tasks'])}")
    else:
        print(f"final val loss {s['final_val_loss']:.4f} (ppl {s['val_ppl']:.2f}); "
              f"unigram baseline {s['unigram_entropy']:.4f} nats")
    tps = f"{s['tokens_per_s']:,.0f}" if s["tokens_per_s"] else "n/a"
    print(f"{s['iters']} iterations, {s['tokens']:,} tokens, {tps} tokens/s, wall {format_eta(s['wall_s'])}")
    vc = s["v_cache"]
    print(f"V cache per head per layer at block_size: {vc['elements_per_head']:,} elements "
          f"({vc['bytes_per_head']:,} bytes) vs {vc['baseline_elements_per_head']:,} uncompressed")


def print_sample(model, data, args, device):
    """--sample-tokens tokens after --sample-prompt, drawn with --seed: every step of a
    matrix continues the same prompt with the same random draws, so the samples
    differ only by what the models learned."""
    model.eval()
    start = torch.tensor([sample_prompt_ids(args, data.meta)], dtype=torch.long, device=device)
    torch.manual_seed(args.seed)
    out = model.generate(start, args.sample_tokens, temperature=args.sample_temperature,
                         top_k=args.sample_top_k or None)
    print(f"\n== sample (temperature {args.sample_temperature:g}, top-k {args.sample_top_k or 'all'}, "
          f"seed {args.seed}) ==\n" + decode_tokens(out[0].tolist(), data.meta))

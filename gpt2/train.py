"""The training loop behind train_ra_mla.py.

nanoGPT's train.py, restructured into functions: DDP setup, model and
optimizer construction, the LR schedule, evaluation, atomic checkpoints, and
the loop itself. KVSplice calibration runs inside the loop at
--kvsplice-calib-iter, on the model as trained so far.
"""

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2.data import TokenData
from gpt2.model import GPT, GPTConfig, load_checkpoint
from lib.atomic import atomic_torch_save
from lib.tracking import Tracker

CHECKPOINT_FORMAT = 1


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


def setup_runtime(device_arg):
    """Device choice and, under torchrun, the process group (NCCL on CUDA, gloo on CPU)."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
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


def validate_args(args, world):
    problems = []
    if args.n_embd % args.n_head:
        problems.append(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    head_dim = args.n_embd // args.n_head
    if args.kvsplice_enable or args.kvsplice_load:
        if not 1 <= args.kvsplice_k <= head_dim:
            problems.append(f"--kvsplice-k must be in [1, head_dim={head_dim}], got {args.kvsplice_k}")
    if args.grad_accum < 1 or args.grad_accum % world:
        problems.append(f"--grad-accum {args.grad_accum} must be a positive multiple of the "
                        f"{world} DDP processes")
    if args.max_iters < 1:
        problems.append(f"--max-iters must be >= 1, got {args.max_iters}")
    for name in ("batch_size", "block_size", "eval_interval", "eval_iters", "log_interval"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if problems:
        raise ValueError("bad arguments:\n  " + "\n  ".join(problems))


def model_config_from_args(args, vocab_size):
    return GPTConfig(
        block_size=args.block_size, vocab_size=vocab_size, n_layer=args.n_layer,
        n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=args.bias,
        kv_prune=args.kv_prune, kv_prune_keep_ratio=args.kv_prune_keep_ratio,
        kv_prune_k_min=args.kv_prune_k_min, kv_prune_recency=args.kv_prune_recency,
        kvsplice_strategy=args.kvsplice_strategy, rmlp=args.rmlp, rmlp_rff=args.rmlp_rff,
    )


def build_model(args, data, ckpt):
    if ckpt is not None:
        model = GPT.from_checkpoint_state(ckpt)
    elif args.init_from == "scratch":
        model = GPT(model_config_from_args(args, data.vocab_size))
    else:
        if data.meta.get("compact"):
            raise ValueError(f"--init-from {args.init_from} needs the full GPT-2 vocabulary, but "
                             f"{data.dir} was prepared with --compact-vocab")
        base = model_config_from_args(args, data.vocab_size)
        features = {k: getattr(base, k) for k in ("kv_prune", "kv_prune_keep_ratio", "kv_prune_k_min",
                                                   "kv_prune_recency", "kvsplice_strategy",
                                                   "rmlp", "rmlp_rff")}
        model = GPT.from_pretrained(args.init_from, dropout=args.dropout, **features)
        if args.block_size < model.config.block_size:
            model.crop_block_size(args.block_size)
    if args.kvsplice_load and model.kvsplice_meta is None:
        from gpt2.calibrate import load_geometry

        model.attach_kvsplice(load_geometry(args.kvsplice_load, model.config, args.kvsplice_k))
    return model


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
    """Mean loss over --eval-iters fixed batches per split, shared out across ranks."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        total = torch.zeros(2, dtype=torch.float64, device=rt.device)
        for j in range(rt.rank, args.eval_iters, rt.world):
            x, y = data.get_batch(split, args.batch_size, args.block_size,
                                  args.seed + 7919, 0, j, rt.device)
            with amp:
                _, loss = model(x, y)
            total += torch.tensor([loss.item(), 1.0], dtype=torch.float64, device=rt.device)
        if rt.ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


def format_eta(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train(args, on_iter=None):
    """Train as args say; returns the summary dict. `on_iter(it)` is called after each step."""
    rt = setup_runtime(args.device)
    try:
        return _train(args, rt, on_iter)
    finally:
        if rt.ddp:
            dist.destroy_process_group()


def _train(args, rt, on_iter):
    validate_args(args, rt.world)
    if rt.device == "cpu":
        torch.set_flush_denormal(True)  # denormals make CPU backward passes ~10x slower
    if rt.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    if rt.master:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = print if rt.master else (lambda *a, **k: None)

    data = TokenData(args.data_dir, args.dataset)
    data.check_block_size(args.block_size)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(out_dir / "last.pt", map_location=rt.device)
        log(f"resuming from {out_dir / 'last.pt'} at iteration {ckpt['iter']}")
    model = build_model(args, data, ckpt).to(rt.device)
    raw_model = model
    cfg = raw_model.config
    optimizer = configure_optimizer(raw_model, args, rt.device)
    it, best_val, elapsed, tokens = 0, float("inf"), 0.0, 0
    schedule_iters = args.max_iters
    decide_at = max(args.warmup_iters, 1)  # when a time budget fixes schedule_iters
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        it, best_val, elapsed, tokens = ckpt["iter"], ckpt["best_val_loss"], ckpt["elapsed"], ckpt["tokens"]
        schedule_iters = ckpt["schedule_iters"]
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if rt.device.startswith("cuda") and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
        del ckpt
    if args.compile:
        model = torch.compile(model)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device.startswith("cuda") else None)
    amp, dtype_name = autocast_context(rt.device, args.dtype)
    scaler = torch.amp.GradScaler(enabled=(dtype_name == "float16"))

    per_rank = args.grad_accum // rt.world
    tokens_per_iter = args.batch_size * args.block_size * args.grad_accum
    calib_iter = args.kvsplice_calib_iter if args.kvsplice_calib_iter is not None else args.warmup_iters
    tracker = Tracker(out_dir, vars(args), kind=args.tracker, project=args.tracker_project,
                      run_name=args.tracker_run_name, group=args.tracker_group, rank=rt.rank)
    if args.resume:
        tracker.truncate_after(it)
    log(f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers, "
        f"{cfg.n_head} heads, head_dim {cfg.head_dim}, block {cfg.block_size}, vocab {cfg.vocab_size}")
    log(f"data: {data.dir} ({len(data.splits['train']):,} train / {len(data.splits['val']):,} val tokens); "
        f"{tokens_per_iter:,} tokens/iter = {args.batch_size} x {args.block_size} x {args.grad_accum} "
        f"over {rt.world} process(es); device {rt.device}, {dtype_name}")

    def checkpoint_state():
        return {
            "format_version": CHECKPOINT_FORMAT,
            "model": raw_model.model_state_dict(),
            "model_config": asdict(cfg),
            "kvsplice": raw_model.kvsplice_meta,
            "optimizer": optimizer.state_dict(),
            "iter": it, "schedule_iters": schedule_iters, "best_val_loss": best_val, "elapsed": elapsed,
            "tokens": tokens,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if rt.device.startswith("cuda") else None},
            "args": vars(args),
        }

    def evaluate_and_checkpoint():
        nonlocal best_val
        losses = estimate_loss(model, data, args, rt, amp)
        val = losses["val"]
        record = {"iter": it, "tokens": tokens, "train_loss": losses["train"], "val_loss": val,
                  "val_ppl": math.exp(min(val, 50))}
        tracker.log(record, step=it)
        log(f"eval  {it}: train loss {losses['train']:.4f}, val loss {val:.4f}, "
            f"val ppl {record['val_ppl']:.2f}")
        if rt.master:
            if val < best_val:
                best_val = val
                atomic_torch_save(checkpoint_state(), out_dir / "best.pt")
            atomic_torch_save(checkpoint_state(), out_dir / "last.pt")
        return losses

    model.train()
    it_start = it
    t_start = time.time() - elapsed
    t_train = 0.0  # seconds spent in training steps only (throughput)
    losses = None
    try:
        while it < schedule_iters and not (args.max_time > 0 and elapsed >= args.max_time):
            if args.kvsplice_enable and raw_model.kvsplice_meta is None and it >= calib_iter:
                from gpt2.calibrate import calibrate_model

                calibrate_model(raw_model, data, args, rt, tracker, step=it)
            if it == decide_at and args.max_time > 0:
                schedule_iters = schedule_iters_for_budget(it, elapsed, args)
                if rt.ddp:  # every rank follows rank 0's decision
                    n = torch.tensor([schedule_iters], device=rt.device)
                    dist.broadcast(n, 0)
                    schedule_iters = int(n.item())
                if schedule_iters < args.max_iters:
                    log(f"time budget: {args.max_time:.0f}s fits {schedule_iters} iterations at "
                        f"{elapsed / it:.2f}s each; the LR schedule ends there")
            lr = learning_rate(it, schedule_progress(it, schedule_iters, args), args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            loss_sum = torch.zeros((), device=rt.device)
            for j in range(per_rank):
                x, y = data.get_batch("train", args.batch_size, args.block_size, args.seed, it,
                                      rt.rank * per_rank + j, rt.device)
                sync = nullcontext() if (not rt.ddp or j == per_rank - 1) else model.no_sync()
                with sync:
                    with amp:
                        _, loss = model(x, y)
                    scaler.scale(loss / per_rank).backward()
                loss_sum += loss.detach()
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            tokens += tokens_per_iter
            if rt.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.time() - t0
            t_train += dt
            elapsed = time.time() - t_start
            if args.max_time > 0 and rt.ddp:  # every rank must agree on when time is up
                e = torch.tensor([elapsed], dtype=torch.float64, device=rt.device)
                dist.broadcast(e, 0)
                elapsed = e.item()
            if it % args.log_interval == 0 or it == schedule_iters:
                if rt.ddp:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
                loss_val = loss_sum.item() / per_rank
                record = {"iter": it, "tokens": tokens, "loss": loss_val, "lr": lr,
                          "ms_per_iter": dt * 1000, "tokens_per_s": tokens_per_iter / dt}
                line = (f"iter {it}/{schedule_iters} | loss {loss_val:.4f} | lr {lr:.2e} | "
                        f"{dt * 1000:.0f} ms/iter | {tokens_per_iter / dt:,.0f} tok/s")
                if rt.device.startswith("cuda"):
                    record["mfu"] = raw_model.estimate_mfu(tokens_per_iter, dt,
                                                           args.peak_flops * rt.world)
                    line += f" | mfu {record['mfu'] * 100:.1f}%"
                remaining = (schedule_iters - it) * t_train / (it - it_start)
                if args.max_time > 0:
                    remaining = min(remaining, args.max_time - elapsed)
                tracker.log(record, step=it)
                log(line + f" | ETA {format_eta(remaining)}")
            if it % args.eval_interval == 0:
                losses = evaluate_and_checkpoint()
            if on_iter is not None:
                on_iter(it)
    except KeyboardInterrupt:
        # nothing lost: the completed iterations go to last.pt, --resume continues
        if rt.master:
            atomic_torch_save(checkpoint_state(), out_dir / "last.pt")
            log(f"interrupted: saved {out_dir / 'last.pt'} at iteration {it}; continue with --resume")
        tracker.close(exit_code=1)
        raise
    if losses is None or it % args.eval_interval:
        losses = evaluate_and_checkpoint()
    summary = finish_summary(raw_model, data, args, losses, best_val, it, tokens, t_train, elapsed)
    if rt.master:
        print_results(summary)
        if args.sample_tokens > 0:
            print_sample(raw_model, data, args.sample_tokens, rt.device)
    tracker.finish(summary)
    return summary


def finish_summary(model, data, args, losses, best_val, it, tokens, t_train, elapsed):
    from gpt2.prepare_data import unigram_entropy

    val = losses["val"]
    return {
        "step": args.ablation_step, "final_val_loss": val, "final_train_loss": losses["train"],
        "best_val_loss": min(best_val, val), "val_ppl": math.exp(min(val, 50)),
        "unigram_entropy": unigram_entropy(data.dir), "iters": it, "tokens": tokens,
        "tokens_per_s": tokens / t_train if t_train > 0 else None, "wall_s": elapsed,
        "params": model.get_num_params(), "v_cache": v_cache_footprint(model),
    }


@torch.no_grad()
def v_cache_footprint(model):
    """V-cache elements and bytes per head per layer at block_size, read off a real cache."""
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
            "bytes_per_head": layer.nbytes()["v"] // cfg.n_head,
            "baseline_elements_per_head": cfg.block_size * cfg.head_dim}


def print_results(s):
    print("\n== results ==")
    print(f"final val loss {s['final_val_loss']:.4f} (ppl {s['val_ppl']:.2f}); "
          f"unigram baseline {s['unigram_entropy']:.4f} nats")
    tps = f"{s['tokens_per_s']:,.0f}" if s["tokens_per_s"] else "n/a"
    print(f"{s['iters']} iterations, {s['tokens']:,} tokens, {tps} tokens/s, wall {format_eta(s['wall_s'])}")
    vc = s["v_cache"]
    print(f"V cache per head per layer at block_size: {vc['elements_per_head']:,} elements "
          f"({vc['bytes_per_head']:,} bytes) vs {vc['baseline_elements_per_head']:,} uncompressed")


def print_sample(model, data, n, device):
    from gpt2.prepare_data import decode_tokens

    model.eval()
    start = torch.tensor([[data.splits["val"][0]]], dtype=torch.long, device=device)
    out = model.generate(start, n, temperature=0.8, top_k=50)
    print("\n== sample ==\n" + decode_tokens(out[0].tolist(), data.meta))

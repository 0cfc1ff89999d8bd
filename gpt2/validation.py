"""Every flag with a domain, and the inputs the flags name, checked before a run
creates, writes or trains anything: validate_args raises BadArguments listing
every problem in one message (train_ra_mla.py prints it and exits 2)."""

import math
import re
from pathlib import Path

import torch

from gpt2.cpu import malloc_problems
from gpt2.data import TokenData, recall_data
from gpt2.method_flags import flag, flag_problem, v_cache_record
from gpt2.prepare_data import encode_text
from gpt2.pretrained import source_family
from gpt2.recall import is_recall
from lib.settings import BadSettings
from lib.vcache import build_method


class BadArguments(ValueError):
    """Arguments that cannot make a run, found before anything is written or
    trained; train_ra_mla.py prints the message and exits with status 2."""


def _finite(lo, hi=math.inf, closed_hi=False):
    """A test for lo <= v < hi (v <= hi when closed_hi), NaN and inf failing."""
    return lambda v: math.isfinite(v) and lo <= v and (v <= hi if closed_hi else v < hi)


# flag -> (test, what it must be), for flags that matter whatever else is on
_DOMAINS = {
    "seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),
    "sample_tokens": (lambda v: v >= 0, ">= 0"),
    "sample_temperature": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "sample_top_k": (lambda v: v >= 0, ">= 0 (0 = all tokens)"),
    "peak_flops": (_finite(0), "a finite number >= 0 (0 = by the GPU's name)"),
    "max_tokens": (lambda v: v >= 0, ">= 0"),
    "n_layer": (lambda v: v >= 1, ">= 1"),
    "n_head": (lambda v: v >= 1, ">= 1"),
    "n_embd": (lambda v: v >= 1, ">= 1"),
    "block_size": (lambda v: v >= 1, ">= 1"),
    "dropout": (_finite(0, 1), "in [0, 1)"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "learning_rate": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "min_lr_ratio": (_finite(0, 1, closed_hi=True), "in [0, 1]"),
    "warmup_iters": (lambda v: v >= 0, ">= 0"),
    "max_iters": (lambda v: v >= 1, ">= 1"),
    "max_time": (_finite(0), "a finite number >= 0 (0 = no budget)"),
    "matrix_time": (_finite(0), "a finite number >= 0 (0 = no budget: every run trains --max-iters)"),
    "weight_decay": (_finite(0), "a finite number >= 0"),
    "beta1": (_finite(0, 1), "in [0, 1)"),
    "beta2": (_finite(0, 1), "in [0, 1)"),
    "grad_clip": (_finite(0), "a finite number >= 0 (0 = no clipping)"),
    "eval_interval": (lambda v: v >= 1, ">= 1"),
    "eval_iters": (lambda v: v >= 1, ">= 1"),
    "log_interval": (lambda v: v >= 1, ">= 1"),
}
_CALIBRATION_DOMAINS = {
    "kvsplice_max_batches": (lambda v: v >= 1, ">= 1"),
    "kvsplice_epochs": (lambda v: v >= 0, ">= 0 (0 = PCA with the identity spline)"),
    "kvsplice_lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
}


def _domain_problems(args, domains):
    return [f"{flag(dest)} must be {what}, got {getattr(args, dest)}"
            for dest, (ok, what) in domains.items() if not ok(getattr(args, dest))]


def matrix_problems(args):
    """The flags only the ablation runner reads (scripts/run_ablation.py), checked before it measures or trains."""
    return _domain_problems(args, {"matrix_time": _DOMAINS["matrix_time"]})


def calibration_iter(args):
    return args.kvsplice_calib_iter if args.kvsplice_calib_iter is not None else args.warmup_iters


def flag_problems(args, world):
    """Every flag whose value is outside its domain, or does not fit the others."""
    problems = _domain_problems(args, _DOMAINS)
    if args.n_head >= 1 and args.n_embd % args.n_head:
        problems.append(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if args.grad_accum < 1 or args.grad_accum % world:
        problems.append(f"--grad-accum {args.grad_accum} must be a positive multiple of the "
                        f"{world} DDP processes")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        problems.append(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: CUDA is not available on this machine")
    problems += pretrained_problems(args)
    if args.trainable:
        try:
            re.compile(args.trainable)
        except re.error as e:
            problems.append(f"--trainable {args.trainable!r} is not a regular expression: {e}")
    if args.rmlp and not 0 < args.rmlp_rff < 4 * args.n_embd:
        problems.append(f"--rmlp-rff must be in (0, 4 x --n-embd = {4 * args.n_embd}), got {args.rmlp_rff}")
    return problems + method_problems(args)


def pretrained_problems(args):
    """A pretrained Llama (--init-from smollm2 or a Llama directory) reads the ids of
    a Llama tokenizer, not GPT-2's, and has no R-MLP. (The model's vocabulary is
    checked against the data's when it is built.)"""
    try:
        family = source_family(args.init_from) if args.init_from != "scratch" else None
    except ValueError as e:
        return [f"--init-from {args.init_from}: {e}"]
    problems = []
    if family == "llama" and args.tokenizer == "gpt2":
        problems.append(f"--init-from {args.init_from} reads the ids of its own tokenizer, not GPT-2's: add "
                        f"--tokenizer {args.init_from if args.init_from == 'smollm2' else 'NAME_OR_DIR'} "
                        f"(the data is prepared with it)")
    if family == "llama" and args.rmlp:
        problems.append(f"--rmlp: the Reciprocal MLP is GPT-2's, and --init-from {args.init_from} is a Llama")
    return problems


def method_problems(args):
    """The V-cache method the flags ask for, built as the model will build it
    (each class checks its own settings), and what its fit will need."""
    try:
        record, filled = v_cache_record(args)
    except BadSettings as e:
        return e.problems
    problems = []
    if args.v_cache and (args.kv_prune or args.kvsplice_enable):
        on = " and ".join(f for f, v in (("--kv-prune", args.kv_prune), ("--kvsplice-enable", args.kvsplice_enable))
                          if v)
        problems.append(f"--v-cache names the whole method: drop {on} (their settings flags still give what "
                        f"the record leaves out)")
    if args.n_head < 1 or args.n_embd % args.n_head or args.block_size < 1:
        return problems  # no head_dim or block to build with: reported above
    head_dim = args.n_embd // args.n_head
    try:
        method = build_method(record, args.block_size, head_dim)
    except BadSettings as e:
        problems += [flag_problem(p, filled, bool(args.v_cache)) for p in e.problems]
        try:  # the codec alone, so that what its calibration needs is listed too
            method = build_method({"select": {"kind": "full"}, "codec": record["codec"]}, args.block_size, head_dim)
        except BadSettings:
            return problems
    if args.kvsplice_load:
        if not method.codec.needs_fit:
            problems.append(f"--kvsplice-load {args.kvsplice_load}: the method's codec "
                            f"{record['codec']['kind']!r} has no fitted state to load")
        elif not Path(args.kvsplice_load).is_file():
            problems.append(f"--kvsplice-load {args.kvsplice_load}: no such file")
        return problems
    if method.needs_fit:
        problems += calibration_problems(args, method.codec)
    return problems


def calibration_problems(args, codec):
    """Everything the calibration of a codec that needs a fit depends on, so that
    it cannot fail or be skipped after training began."""
    problems = _domain_problems(args, _CALIBRATION_DOMAINS)
    need, kind = codec.fit_rows()[0], codec.kind
    if args.kvsplice_samples < need:
        problems.append(f"--kvsplice-samples must be at least {need}, the V vectors per layer the {kind} fit "
                        f"needs, got {args.kvsplice_samples}")
    vectors = args.kvsplice_max_batches * args.batch_size * args.block_size * args.n_head
    if args.kvsplice_max_batches >= 1 and vectors < need:
        problems.append(f"--kvsplice-max-batches {args.kvsplice_max_batches} x --batch-size {args.batch_size} x "
                        f"--block-size {args.block_size} x --n-head {args.n_head} = {vectors} V vectors per "
                        f"layer, fewer than the {need} the {kind} fit needs; raise --kvsplice-max-batches")
    calib = calibration_iter(args)
    which = ("--kvsplice-calib-iter" if args.kvsplice_calib_iter is not None
             else "--kvsplice-calib-iter (default: --warmup-iters)")
    if not 0 <= calib < args.max_iters:
        problems.append(f"{which} is {calib}, outside [0, --max-iters = {args.max_iters}): the {kind} fit "
                        f"would never run and the run would train without its codec")
    if not args.kvsplice_save or Path(args.kvsplice_save).name != args.kvsplice_save:
        problems.append(f"--kvsplice-save must be a file name (it is written in --out-dir), "
                        f"got {args.kvsplice_save!r}")
    return problems


def sample_prompt_ids(args, meta):
    """--sample-prompt as token ids of the dataset (a newline when empty); ValueError
    when the prompt needs tokens the dataset's vocabulary lacks."""
    try:
        return encode_text(args.sample_prompt or "\n", meta)
    except ValueError as e:
        raise ValueError(f"--sample-prompt {args.sample_prompt!r}: {e}") from None


def input_problems(args):
    """The data the flags name (prepared data long enough for a block, or a recall
    task that fits one) and the checkpoint to resume from."""
    problems = []
    if is_recall(args.dataset):
        problems += recall_data(args).problems(args.block_size)
    else:
        try:
            data = TokenData(args.data_dir, args.dataset, args.tokenizer)
            if args.block_size >= 1:
                data.check_block_size(args.block_size)
            if args.sample_tokens > 0:
                sample_prompt_ids(args, data.meta)
        except (OSError, ValueError) as e:
            problems.append(str(e))
    if args.resume and not (Path(args.out_dir) / "last.pt").is_file():
        problems.append(f"--resume: {Path(args.out_dir) / 'last.pt'} not found")
    return problems


def validate_args(args, world=1):
    """Raise BadArguments listing every problem with the flags, the files
    they name and KVSPLICE_MALLOC, before anything is created, written or trained."""
    problems = flag_problems(args, world) + input_problems(args) + malloc_problems()
    if problems:
        raise BadArguments("bad arguments:\n  " + "\n  ".join(problems))

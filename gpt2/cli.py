"""Train GPT-2 with a V-cache method in attention: V-only KV pruning, KVSplice
compression, or any registered method (--v-cache).

Single process:   python train_ra_mla.py --config .config [--flag value ...]
Several GPUs:     torchrun --nproc_per_node=N train_ra_mla.py --config .config

Every flag is declared here, once. A Kconfig symbol CONFIG_FOO_BAR sets the
default of --foo-bar (gpt2/config.py); an --ablation-step applies its row of
gpt2/ablations.py; a flag on the command line overrides both.
"""
# The docstring above is the trainer's --help. train_ra_mla.py, the entry point
# (python or torchrun), runs main(); the runner, the benchmarks and the Kconfig
# generator read the flags through build_parser / parse_args.

import argparse
import sys

from gpt2.ablations import format_steps, step_overrides
from gpt2.calibrate import MAX_SAMPLES
from gpt2.config import parse_with_config
from gpt2.entry import ArgumentParser
from gpt2.method_flags import method_record
from gpt2.train import IncompleteRun, train
from gpt2.validation import BadArguments
from lib.vcache import CODECS, SELECTORS, build_method, describe, settings_of

PRUNE = settings_of(SELECTORS["prune"])  # the defaults of the seed's flags are the methods' own
GEOMETRY = settings_of(CODECS["splinepca"])
GEOMETRY_FIT = CODECS["splinepca"].fit_defaults  # epochs and lr: the fit options the calibrator passes


def build_parser():
    p = ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    B = argparse.BooleanOptionalAction

    g = p.add_argument_group("run")
    g.add_argument("--config", default=None, help="a .config file (Kconfig) giving the defaults")
    g.add_argument("--out-dir", default="out/run", help="run directory: checkpoints, metrics.jsonl, summary.json")
    g.add_argument("--resume", action=B, default=False, help="continue from OUT_DIR/last.pt")
    g.add_argument("--seed", type=int, default=1337, help="seed for init, data order and dropout")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype; auto = bfloat16 on CUDA when supported, float32 on CPU")
    g.add_argument("--compile", action=B, default=False, help="torch.compile the model")
    g.add_argument("--sample-tokens", type=int, default=0,
                   help="after training, generate this many tokens through the KV cache")
    g.add_argument("--sample-prompt", default="",
                   help="the text the sample continues (empty: a newline, as nanoGPT's sample.py); drawn "
                        "with --seed, so every step of a matrix continues the same prompt with the same draws")
    g.add_argument("--sample-temperature", type=float, default=0.8,
                   help="sampling temperature: below 1 favours the likelier tokens (nanoGPT samples at 0.8)")
    g.add_argument("--sample-top-k", type=int, default=200,
                   help="sample among the k likeliest tokens only (0 = all; nanoGPT samples with 200)")
    g.add_argument("--peak-flops", type=float, default=0.0,
                   help="accelerator peak FLOP/s for MFU; 0: the dense bf16 datasheet peak of a GPU known by "
                        "name (A100 312e12, H100/H200 SXM 989e12, H100 PCIe 756e12), no MFU on others")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="shakespeare",
                   help="shakespeare (the plays as plain text; shakespeare-raw: their Markdown as shipped), "
                        "file:PATH, finewebedu or openwebtext; or a recall task generated on "
                        "the fly (gpt2/recall.py): copy, mqar (associative recall), recall (both)")
    g.add_argument("--data-dir", default="data", help="where prepared datasets live")
    g.add_argument("--tokenizer", default="gpt2",
                   help="what the dataset is tokenized with: gpt2, or a pretrained model's (smollm2, a Hugging Face "
                        "directory), prepared into DATA_DIR/<dataset>-<tokenizer>/")
    g.add_argument("--compact-vocab", action=B, default=False,
                   help="when preparing data: remap to the ids present (small LM head)")
    g.add_argument("--max-tokens", type=int, default=0,
                   help="when preparing data: cap on tokens (0 = dataset default)")

    g = p.add_argument_group("recall tasks")
    g.add_argument("--recall-vocab", type=int, default=64,
                   help="content token ids (mqar: first half keys, second half values)")
    g.add_argument("--recall-segment", type=int, default=32, help="copy: tokens to copy (answers lie this far back)")
    g.add_argument("--recall-pairs", type=int, default=8, help="mqar: key-value pairs per sequence")
    g.add_argument("--recall-queries", type=int, default=8, help="mqar: keys queried per sequence")
    g.add_argument("--recall-pair-tokens", type=int, default=2,
                   help="mqar: 2 = key and value tokens (Zoology's layout, needs an induction circuit); "
                        "1 = one fused token per pair, so the answer is in that one token's V")
    g.add_argument("--recall-gap", type=int, default=0,
                   help="filler tokens between what is to be recalled and the questions: pushes answers back")

    g = p.add_argument_group("model")
    g.add_argument("--init-from", default="scratch",
                   help="scratch (a GPT-2), smollm2 (the embedded SmolLM2-135M), a local Hugging Face GPT-2, "
                        "Llama, Qwen2 or Mistral directory, or a hub name such as gpt2 (online)")
    g.add_argument("--trainable", default="",
                   help="train only the parameters whose names match this regular expression (e.g. 'self_attn' "
                        "for a Llama's attention); empty: all")
    g.add_argument("--n-layer", type=int, default=12, help="transformer blocks")
    g.add_argument("--n-head", type=int, default=12, help="attention heads (head_dim = n_embd / n_head)")
    g.add_argument("--n-embd", type=int, default=768, help="embedding width")
    g.add_argument("--block-size", type=int, default=1024, help="context length in tokens")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout probability (0 for pretraining)")
    g.add_argument("--bias", action=B, default=True, help="biases in Linear and LayerNorm")
    g.add_argument("--rmlp", action=B, default=False, help="Reciprocal MLP (V21; GPT-2's MLP only)")
    g.add_argument("--rmlp-rff", type=int, default=64, help="width of the reciprocal branch")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=12, help="micro-batch size per process")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per iteration, over all processes (divided across DDP ranks)")
    g.add_argument("--learning-rate", type=float, default=6e-4, help="peak learning rate (after warmup)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --learning-rate")
    g.add_argument("--warmup-iters", type=int, default=100, help="linear LR warmup iterations")
    g.add_argument("--max-iters", type=int, default=5000, help="iterations; the LR schedule spans them")
    g.add_argument("--max-time", type=float, default=0.0,
                   help="time budget in seconds of one run (0 = none); if, at the end of warmup, the measured "
                        "pace says --max-iters will not fit, the LR schedule is shortened once to the "
                        "iterations that do, so the run still ends at the minimum LR. A matrix of runs "
                        "takes --matrix-time instead, so that its steps train alike")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on weight matrices")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=250, help="also when checkpoints are written")
    g.add_argument("--eval-iters", type=int, default=20, help="batches per split for each evaluation")
    g.add_argument("--log-interval", type=int, default=10, help="iterations between progress lines")
    g.add_argument("--tracker", default="auto", choices=["auto", "wandb", "none"],
                   help="auto: wandb online when logged in, offline otherwise")
    g.add_argument("--tracker-project", default="kvsplice", help="wandb project")
    g.add_argument("--tracker-run-name", default=None, help="wandb run name (default: wandb picks one)")
    g.add_argument("--tracker-group", default=None, help="wandb group (make train: the defconfig name)")

    g = p.add_argument_group("V-cache method")
    g.add_argument("--v-cache", default="",
                   help="the V-cache method every attention layer trains and decodes with, as a lib/vcache.py "
                        'record in JSON, e.g. \'{"select": {"kind": "prune"}, "codec": {"kind": "int4"}}\' '
                        "(docs/vcache.md lists the kinds); settings it leaves out come from --kv-prune-* "
                        "(prune, random) and --kvsplice-k/--kvsplice-knots (pca, splinepca). Empty: "
                        "--kv-prune and --kvsplice-enable choose")

    g = p.add_argument_group("V-only KV pruning")
    g.add_argument("--kv-prune", action=B, default=False, help="keep V only for the most important tokens")
    g.add_argument("--kv-prune-keep-ratio", type=float, default=PRUNE["keep_ratio"],
                   help="fraction of block_size whose V is kept (1/(1+golden ratio): 391 of 1024)")
    g.add_argument("--kv-prune-k-min", type=int, default=PRUNE["k_min"], help="never keep fewer V than this")
    g.add_argument("--kv-prune-recency", type=int, default=PRUNE["recency"],
                   help="the most recent tokens always kept")

    g = p.add_argument_group("KVSplice")
    g.add_argument("--kvsplice-enable", action=B, default=False,
                   help="calibrate a KVSplice geometry (the splinepca codec) during warmup and use it in attention")
    g.add_argument("--kvsplice-k", type=int, default=GEOMETRY["k"], help="latent dims per head")
    g.add_argument("--kvsplice-knots", type=int, default=GEOMETRY["knots"], help="spline knots per dimension")
    g.add_argument("--kvsplice-samples", type=int, default=MAX_SAMPLES,
                   help="max V vectors per layer kept for a codec's fit")
    g.add_argument("--kvsplice-save", default="kvsplice.pt",
                   help="the fitted codecs' file, relative to --out-dir")
    g.add_argument("--kvsplice-max-batches", type=int, default=64, help="forward passes used for collection")
    g.add_argument("--kvsplice-epochs", type=int, default=GEOMETRY_FIT["epochs"], help="fit epochs (0: a geometry is plain PCA)")
    g.add_argument("--kvsplice-lr", type=float, default=GEOMETRY_FIT["lr"], help="fit learning rate")
    g.add_argument("--kvsplice-load", default=None,
                   help="load a saved kvsplice.pt (a fitted codec, or a KVSplice geometry) instead of calibrating")
    g.add_argument("--kvsplice-calib-iter", type=int, default=None,
                   help="iteration at which a method whose codec needs a fit is fitted (default: end of LR warmup)")
    g.add_argument("--kvsplice-shared", action=B, default=False, help="one fitted codec for all layers")
    g.add_argument("--kvsplice-dump-samples", default=None,
                   help="also save the collected V samples (per layer) to this .pt file")

    g = p.add_argument_group("ablations")
    g.add_argument("--ablation-step", default=None, help="apply one step of gpt2/ablations.py (e.g. V20)")
    g.add_argument("--ablation-steps", default="",
                   help="comma-separated steps that `make train` (scripts/run_ablation.py) runs")
    g.add_argument("--matrix-time", type=float, default=0.0,
                   help="time budget in seconds for the whole matrix `make train` runs (steps x seeds x "
                        "datasets; 0 = none): the pace of each step is measured first, then every run trains "
                        "the one iteration count, at most --max-iters, that fits the matrix in it "
                        "(recorded in OUT_DIR/budget.json)")
    g.add_argument("--ablation-datasets", default="",
                   help="comma-separated datasets: `make train` runs the matrix once per dataset, into "
                        "OUT_DIR/<dataset>/ (empty: --dataset alone)")
    g.add_argument("--list-steps", action="store_true", help="print the ablation steps and exit")
    return p


def parse_args(argv=None):
    return parse_with_config(build_parser(), argv, step_overrides)


def step_method(args):
    """The record of the method a step's flags train, every setting filled in
    (as given when the flags cannot build it: the run would say why)."""
    record = method_record(args)
    try:
        return build_method(record, args.block_size, args.n_embd // args.n_head).record()
    except (ValueError, ZeroDivisionError):
        return record


def main(argv=None):
    args = parse_args(argv)
    if args.list_steps:
        argv = sys.argv[1:] if argv is None else list(argv)
        print(format_steps(lambda step: describe(step_method(parse_args([*argv, "--ablation-step", step])))))
        return 0
    try:
        train(args)
    except BadArguments as e:
        print(f"train_ra_mla.py: error: {e}", file=sys.stderr)
        return 2
    except IncompleteRun as e:
        print(f"train_ra_mla.py: error: the run is incomplete: {e}", file=sys.stderr)
        return 1
    return 0


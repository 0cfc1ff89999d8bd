"""Shared fixtures: a small prepared corpus and tiny-model flags.

Everything runs on CPU, offline, in seconds: the corpus is the first 60k
tokens of the shipped Shakespeare, with a compact vocabulary.
"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2.cpu import configure_cpu  # noqa: E402

configure_cpu()  # as every entry point does: gpt2/cpu.py
# Tiny models: one thread is as fast as two, and far faster when the other
# core is busy (OpenMP threads spin-wait on each other).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    from gpt2.prepare_data import prepare

    data_dir = tmp_path_factory.mktemp("data")
    prepare("shakespeare", data_dir, compact_vocab=True, max_tokens=60_000)
    return data_dir


def qkv(B, H, T, hs, seed=0, scale=1.0):
    """Random q, k, v (B, H, T, hs) from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, hs, generator=g) * scale for _ in range(3)]


def tiny_argv(data_dir, out_dir, *extra):
    """Flags for a 2-layer, 2-head, 64-dim model (head_dim 32) that trains in seconds."""
    return ["--data-dir", str(data_dir), "--dataset", "shakespeare", "--out-dir", str(out_dir),
            "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64",
            "--batch-size", "4", "--learning-rate", "3e-3", "--warmup-iters", "5",
            "--max-iters", "30", "--eval-interval", "10", "--eval-iters", "2",
            "--log-interval", "1", "--tracker", "none", "--device", "cpu", *extra]


def tiny_args(data_dir, out_dir, *extra):
    from gpt2.cli import parse_args

    return parse_args(tiny_argv(data_dir, out_dir, *extra))


def fail_at(iteration, exc=KeyboardInterrupt):
    """An on_iter callback for gpt2.train.train that raises after `iteration`."""
    def on_iter(it):
        if it == iteration:
            raise exc("stopped by the test")
    return on_iter


def losses_by_iter(run_dir):
    from gpt2.tracking import read_metrics

    return {r["iter"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="session")
def smollm2_tokens(tmp_path_factory):
    """20k tokens of the plays in SmolLM2's tokenizer, as --tokenizer smollm2 prepares them."""
    from gpt2.prepare_data import prepare

    data_dir = tmp_path_factory.mktemp("smollm2-data")
    prepare("shakespeare", data_dir, max_tokens=20_000, tokenizer="smollm2")
    return data_dir


def tiny_llama_dir(path):
    """A random Llama of SmolLM2's vocabulary and grouped-query layout, saved as a Hugging Face directory."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(HFConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              tie_word_embeddings=True)).save_pretrained(path)
    return path


def importance_scores(probs, recency):
    """The reference the pruning's scores are checked against: full-key causal
    softmax (..., T, T) -> (..., T), score[j] = the sum of probs[q, j] over q in
    [j, j + recency - 1], over recency, as one masked pass (lib.kv_pruning sums
    the same along diagonals: window_received)."""
    pos = torch.arange(probs.size(-1), device=probs.device)
    lag = pos[:, None] - pos[None, :]  # (T, T) query - key
    in_window = (lag >= 0) & (lag < recency)
    return probs.masked_fill(~in_window, 0.0).sum(-2) / recency

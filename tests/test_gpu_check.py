"""scripts/gpu_check.sh and its Python entry, as far as a CPU allows: tiny
shapes, no compile, bf16 autocast on CPU; and that it fails loudly."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from gpt2.bench import gpu_check
from gpt2.model import GPT
from lib.kv_cache import KVCache

TINY = ["--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64",
        "--vocab", "96", "--batch-size", "2", "--kv-prune-k-min", "16", "--kv-prune-recency", "8",
        "--iters", "2", "--warmup", "1", "--no-compile"]


def run(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *argv],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_shell_script_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cpu_check_passes_and_prints_every_figure():
    r = run(*TINY)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "bfloat16 autocast, eager" in out and "gpu_check: all checks passed" in out
    for step in ("V0", "V19", "V20"):
        assert f"{step:<4} train" in out
    assert out.count("decode 64 tokens x 2 vs full forward: fp32 max |dlogit|") == 3
    assert out.count("; bf16 ") == 3
    # budget max(16, int(64 x 0.382)) = 24 of 64 tokens; V20 also 16 of 32 dims; bf16: 2 bytes
    assert "64 tokens x 32 values per head = 4,096 bytes per (sequence, head, layer), 100.0% of V0" in out
    assert "24 tokens x 32 values per head = 1,536 bytes per (sequence, head, layer), 37.5% of V0" in out
    assert "24 tokens x 16 values per head = 768 bytes per (sequence, head, layer), 18.8% of V0" in out
    assert "cache.nbytes(): V 6,144" in out  # 768 x 2 layers x batch 2 x 2 heads


def test_cuda_on_a_machine_without_it_fails_loudly():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run("--device", "cuda", "--steps", "V0")
    assert r.returncode == 2
    assert "gpu_check: FAIL: --device cuda, but torch.cuda.is_available() is False" in r.stderr
    assert "pass --device cpu" in r.stderr


def test_a_cache_that_is_not_the_method_fails_every_check_it_breaks(monkeypatch, capsys):
    """A decode cache that keeps every token's V in full, under a pruned model:
    decode no longer equals the forward and the V bytes are not reduced."""
    monkeypatch.setattr(GPT, "make_cache", lambda self: KVCache(self.config.n_layer))
    assert gpu_check.main([*TINY, "--steps", "V19"]) == 1
    captured = capsys.readouterr()
    assert "FAIL V19: cached decode differs from the full forward in fp32" in captured.out
    assert "FAIL V19: V cache holds 32,768 bytes and the method says 12,288" in captured.out
    assert "gpu_check: FAILED, 4 check(s)" in captured.err  # fp32 and bf16 decode, bytes, not reduced


def test_a_non_finite_loss_fails(monkeypatch, capsys):
    real_forward = GPT.forward

    def nan_loss(self, idx, targets=None, caches=None):
        logits, loss = real_forward(self, idx, targets, caches)
        return logits, None if loss is None else loss * float("nan")

    monkeypatch.setattr(GPT, "forward", nan_loss)
    assert gpu_check.main([*TINY, "--steps", "V0"]) == 1
    assert "FAIL V0: non-finite training loss at iteration(s) [0, 1, 2]" in capsys.readouterr().out


def test_the_compiled_decode_check_wants_one_graph_for_every_step(monkeypatch):
    """With --compile, the decode check also decodes through GPT.decode_step's
    compiled step: on CPU it equals the full forward and compiles one graph
    for all 16 steps. A step whose graph depends on the cache's length (here
    the forward path, compiled with Dynamo alone) fails the check."""
    from gpt2.train import autocast_context

    a = gpu_check.parse([arg for arg in TINY if arg != "--no-compile"] + ["--dtype", "float32"])
    amp, _ = autocast_context(a.device, a.dtype)
    torch._dynamo.reset()
    failures = []
    out = gpu_check.decode_check(gpu_check.build("V20", a), a, amp, failures.append)
    assert failures == [] and out["compiled"][0] <= out["compiled"][1]

    def per_length(self, compile=False):
        forward = torch.compile(lambda idx, cache: self(idx, caches=cache, last_only=True)[0], backend="eager")
        return forward if compile else (lambda idx, cache: self(idx, caches=cache, last_only=True)[0])

    monkeypatch.setattr(GPT, "decode_step", per_length)
    failures = []
    gpu_check.decode_check(gpu_check.build("V0", a), a, amp, failures.append)
    assert len(failures) == 1 and "graphs for 16 steps, not one" in failures[0], failures

"""Every flag with a domain is checked before anything is created, written or
trained: one message listing every problem, exit status 2 from the CLI."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_argv
from gpt2.cli import main

KV = ("--kvsplice-enable", "--kvsplice-k", "4")  # head_dim is 32 in the tiny model

# (extra flags, the line the message must contain); the tiny model has
# n_embd 64, 2 heads, block 64, batch 4, 30 iterations, 5 warmup iterations
BAD = [
    (("--kv-prune", "--kv-prune-keep-ratio", "-0.5"), "--kv-prune-keep-ratio must be in (0, 1], got -0.5"),
    (("--kv-prune", "--kv-prune-keep-ratio", "1.5"), "--kv-prune-keep-ratio must be in (0, 1], got 1.5"),
    (("--kv-prune", "--kv-prune-recency", "0"), "--kv-prune-recency must be an int >= 1, got 0"),
    (("--kv-prune", "--kv-prune-k-min", "-1"), "--kv-prune-k-min must be an int >= 0, got -1"),
    (("--kv-prune", "--kv-prune-k-min", "8", "--kv-prune-recency", "40"),
     "--kv-prune-recency 40 exceeds the keep budget 24"),
    (("--dropout", "1.5"), "--dropout must be in [0, 1), got 1.5"),
    (("--learning-rate", "nan"), "--learning-rate must be a finite number > 0, got nan"),
    (("--learning-rate", "0"), "--learning-rate must be a finite number > 0, got 0.0"),
    (("--min-lr-ratio", "1.5"), "--min-lr-ratio must be in [0, 1], got 1.5"),
    (("--beta2", "1"), "--beta2 must be in [0, 1), got 1.0"),
    (("--weight-decay", "inf"), "--weight-decay must be a finite number >= 0, got inf"),
    (("--grad-clip", "-1"), "--grad-clip must be a finite number >= 0 (0 = no clipping), got -1.0"),
    (("--max-time", "-5"), "--max-time must be a finite number >= 0 (0 = no budget), got -5.0"),
    (("--matrix-time", "nan"), "--matrix-time must be a finite number >= 0 (0 = no budget: every run trains "
                               "--max-iters), got nan"),
    (("--warmup-iters", "-1"), "--warmup-iters must be >= 0, got -1"),
    (("--max-iters", "0"), "--max-iters must be >= 1, got 0"),
    (("--eval-iters", "0"), "--eval-iters must be >= 1, got 0"),
    (("--grad-accum", "0"), "--grad-accum 0 must be a positive multiple of the 1 DDP processes"),
    (("--n-head", "3"), "--n-embd 64 is not divisible by --n-head 3"),
    (("--seed", "-1"), "--seed must be in [0, 2**32), got -1"),
    (("--sample-tokens", "-1"), "--sample-tokens must be >= 0, got -1"),
    (("--sample-temperature", "0"), "--sample-temperature must be a finite number > 0, got 0.0"),
    (("--sample-temperature", "inf"), "--sample-temperature must be a finite number > 0, got inf"),
    (("--sample-top-k", "-1"), "--sample-top-k must be >= 0 (0 = all tokens), got -1"),
    (("--peak-flops", "-1"), "--peak-flops must be a finite number >= 0 (0 = by the GPU's name), got -1.0"),
    (("--sample-tokens", "5", "--sample-prompt", "\u65e5\u672c"),
     "--sample-prompt '\u65e5\u672c': the corpus never uses the token(s)"),
    (("--device", "gpu"), "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (("--rmlp", "--rmlp-rff", "0"), "--rmlp-rff must be in (0, 4 x --n-embd = 256), got 0"),
    (("--kvsplice-enable", "--kvsplice-k", "33"), "--kvsplice-k must be an int in [1, head_dim = 32], got 33"),
    ((*KV, "--kvsplice-knots", "0"), "--kvsplice-knots must be an int >= 1, got 0"),
    ((*KV, "--kvsplice-max-batches", "0"), "--kvsplice-max-batches must be >= 1, got 0"),
    ((*KV, "--kvsplice-samples", "0"), "--kvsplice-samples must be at least 5, the V vectors per layer the splinepca fit needs"),
    ((*KV, "--kvsplice-samples", "3"), "--kvsplice-samples must be at least 5, the V vectors per layer the splinepca fit needs"),
    ((*KV, "--kvsplice-epochs", "-1"), "--kvsplice-epochs must be >= 0 (0 = PCA with the identity spline), got -1"),
    ((*KV, "--kvsplice-lr", "0"), "--kvsplice-lr must be a finite number > 0, got 0.0"),
    ((*KV, "--kvsplice-max-batches", "1", "--batch-size", "1", "--block-size", "2"),
     "--kvsplice-max-batches 1 x --batch-size 1 x --block-size 2 x --n-head 2 = 4 V vectors per layer, "
     "fewer than the 5 the splinepca fit needs"),
    ((*KV, "--kvsplice-calib-iter", "30"), "--kvsplice-calib-iter is 30, outside [0, --max-iters = 30): "
                                           "the splinepca fit would never run"),
    ((*KV, "--kvsplice-calib-iter", "-1"), "--kvsplice-calib-iter is -1, outside [0, --max-iters = 30)"),
    ((*KV, "--warmup-iters", "30"), "--kvsplice-calib-iter (default: --warmup-iters) is 30, outside"),
    ((*KV, "--kvsplice-save", "sub/kvsplice.pt"), "--kvsplice-save must be a file name"),
    (("--kvsplice-k", "4", "--kvsplice-load", "missing.pt"), "--kvsplice-load missing.pt: no such file"),
    (("--resume",), "last.pt not found"),
    (("--block-size", "100000"), "fewer than block_size + 2 = 100002"),
    (("--dataset", "nowhere"), "no prepared data for dataset 'nowhere'"),
    (("--init-from", "gpt2"), "--init-from gpt2 needs the full GPT-2 vocabulary"),
    (("--init-from", "/no/such/dir"), "--init-from /no/such/dir: /no/such/dir: no such model directory"),
    (("--dataset", "copy", "--recall-segment", "40"), "copy needs 2 x --recall-segment + --recall-gap = 80 "
                                                      "<= block_size 64"),
    (("--dataset", "mqar", "--recall-pairs", "40"), "--recall-pairs 40 exceeds the 32 keys of --recall-vocab"),
    (("--dataset", "mqar", "--recall-pair-tokens", "3"), "--recall-pair-tokens must be 1 or 2, got 3"),
    (("--dataset", "recall", "--recall-vocab", "2"), "--recall-vocab must be >= 4, got 2"),
    (("--v-cache", '{"select": {"kind": "full"}, "codec": {"kind": "int", "bits": 5}}'),
     "--v-cache: v_cache codec 'int': bits must be one of 2, 3, 4, 8, got 5"),
    (("--v-cache", '{"select": {"kind": "full"}, "codec": {"kind": "int", "bits": 2, "group_size": 24}}'),
     "--v-cache: v_cache codec 'int': head_dim 32 is not divisible by group_size 24"),
    (("--v-cache", '{"select": {"kind": "sinks", "sinks": 4, "window": 60}, "codec": {"kind": "int", "bits": 2}}'),
     "--v-cache: v_cache select 'sinks': sinks + window must be in [1, block_size = 64), got 4 + 60 = 64"),
    (("--v-cache", '{"select": {"kind": "full"}, "codec": {"kind": "transform", "bits": 2.1}}'),
     "--v-cache: v_cache codec 'transform': bits must be a number in (0, 8] with bits * head_dim (32) a whole"),
    (("--n-embd", "96", "--n-head", "2", "--v-cache", '{"select": {"kind": "full"}, "codec": {"kind": "rotated"}}'),
     "--v-cache: v_cache codec 'rotated': rotation 'hadamard' needs a power-of-two head_dim, got 48"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_value_is_one_line_of_one_message_and_nothing_is_written(tiny_data_dir, tmp_path, capsys,
                                                                     extra, message):
    run = tmp_path / "run"
    assert main(tiny_argv(tiny_data_dir, run, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_ra_mla.py: error: bad arguments:\n  ")
    lines = err.splitlines()[1:]
    assert any(message in line for line in lines), err
    assert not run.exists()


def test_every_problem_in_one_message_from_the_real_command_line(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train_ra_mla.py"),
                        *tiny_argv(tiny_data_dir, run, "--dropout", "1.5", "--learning-rate", "nan",
                                   "--kv-prune", "--kv-prune-recency", "0", *KV, "--kvsplice-samples", "0")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert re.findall(r"^  --[a-z-]+", r.stderr, flags=re.M) == [
        "  --dropout", "  --learning-rate", "  --kv-prune-recency", "  --kvsplice-samples"]
    assert not run.exists()


def test_a_bad_kvsplice_malloc_is_listed_with_the_flags(tiny_data_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("KVSPLICE_MALLOC", "off")
    assert main(tiny_argv(tiny_data_dir, run, "--dropout", "1.5")) == 2
    lines = capsys.readouterr().err.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["--dropout", "KVSPLICE_MALLOC='off':"]
    assert not run.exists()


def test_a_model_that_cannot_be_built_is_a_bad_argument_too(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (tmp_path / "geometry.pt").write_bytes(b"not a geometry")
    assert main(tiny_argv(tiny_data_dir, run, "--kvsplice-k", "4",
                          "--kvsplice-load", str(tmp_path / "geometry.pt"))) == 2
    assert "not a readable KVSplice geometry file" in capsys.readouterr().err
    assert not run.exists()

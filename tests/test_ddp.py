"""Two CPU processes (gloo) reproduce one process with the same global batch."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, losses_by_iter, tiny_argv


KVSPLICE = ["--kvsplice-enable", "--kvsplice-k", "8", "--kvsplice-calib-iter", "3",
            "--kvsplice-max-batches", "2", "--kvsplice-epochs", "1", "--kv-prune",
            "--kv-prune-k-min", "16", "--kv-prune-recency", "8"]


@pytest.mark.parametrize("features", [[], KVSPLICE], ids=["plain", "pruning+kvsplice"])
def test_ddp_two_processes_match_single_process(tiny_data_dir, tmp_path, features):
    """With KVSplice, rank 0 calibrates and broadcasts: the losses after
    calibration match only if every rank uses that same geometry."""
    common = ["--max-iters", "6", "--eval-interval", "6", "--grad-accum", "2", *features]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(ROOT / "train_ra_mla.py"),
                             *tiny_argv(tiny_data_dir, tmp_path / "single", *common)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(ROOT / "train_ra_mla.py"),
                          *tiny_argv(tiny_data_dir, tmp_path / "ddp", *common)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = losses_by_iter(tmp_path / "single"), losses_by_iter(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for it in a:
        assert b[it] == pytest.approx(a[it], abs=1e-4), it
    # rank 0 alone logs: one line per iteration, not two
    assert ddp.stdout.count("iter 6/6") == 1

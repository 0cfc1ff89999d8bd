"""Every entry point (train_ra_mla.py, scripts/*.py) turns a bad input into one
line on stderr naming the problem and exit status 2: no traceback, nothing
written. Each row runs the script as the user would, from the repository root."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

# (entry point, its arguments ({d}: a folder of prepared bad inputs), what the one line must say)
BAD_INPUTS = [
    ("train_ra_mla.py", ["--config", "{d}/missing.config"], "missing.config not found: run `make defconfig`"),
    ("train_ra_mla.py", ["--config", "{d}/malformed.config"], "malformed.config:2: cannot parse line"),
    ("train_ra_mla.py", ["--n-layer", "two"], "argument --n-layer: invalid int value: 'two'"),
    ("scripts/run_ablation.py", ["--config", "{d}/missing.config"], "missing.config not found"),
    ("scripts/run_ablation.py", ["--config", "{d}/tiny.config", "--seeds", "1,x"],
     "--seeds expects comma-separated integers, found '1,x'"),
    ("scripts/compare_runs.py", ["{d}/no-such-run"], "no-such-run: no such run directory"),
    ("scripts/compare_runs.py", ["{d}/broken-run"], "broken-run/summary.json: not JSON"),
    ("scripts/bench_kv.py", ["--ckpt", "{d}/missing.pt", "--out-md", "{d}/b.md", "--out-png", "{d}/b.png"],
     "checkpoint(s) not found: {d}/missing.pt"),
    ("scripts/bench_kv.py", ["--ckpt", "{d}/missing.pt", "--ks", "8,x"], "--ks expects comma-separated integers"),
    ("scripts/estimate_gpu_cost.py", ["--mfu", "40"], "--mfu must be in (0, 1], found 40.0"),
    ("scripts/gpu_check.py", ["--device", "cpu", "--steps", "V0,V99"], "--steps 'V0,V99': expected comma-separated"),
    ("scripts/kvsplice_validate.py", ["--source", "{d}/missing.pt"], "missing.pt: cannot read samples"),
    ("scripts/kvsplice_validate.py", ["--k", "8", "100"], "--k [100]: the latent sizes of synthetic must be in [1, "
                                                          "head_dim = 64]"),
    ("scripts/bench_train.py", ["--iters", "0"], "--iters must be >= 1, found 0"),
    ("scripts/profile_decode.py", ["--prompt", "1000"], "--prompt + --new must fit the context of 1024, got 1096"),
    ("scripts/profile_decode.py", ["--floors", "--model", "smollm2"], "--floors times the quick-start head shape"),
    ("scripts/bench_kvsplice.py", ["--repeats", "0"], "--repeats must be >= 1, found 0"),
    ("scripts/recovery.py", ["--matrix", "{d}/no-such-matrix"], "no-such-matrix: no such directory"),
    ("scripts/gen_kconfig.py", ["--out", "{d}/Kconfig"], "unrecognized arguments: --out"),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "malformed.config").write_text("CONFIG_N_LAYER=2\nthis is not a config line\n")
    (d / "tiny.config").write_text('CONFIG_TRACKER="none"\nCONFIG_DEVICE="cpu"\n')
    (d / "broken-run").mkdir()
    (d / "broken-run" / "summary.json").write_text("{not json")
    return d


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.parametrize("script, argv, message", BAD_INPUTS,
                         ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD_INPUTS])
def test_a_bad_input_is_one_line_and_exit_status_2(bad_inputs, script, argv, message):
    before, kconfig = listing(bad_inputs), (ROOT / "Kconfig").stat().st_mtime_ns
    env = {n: v for n, v in os.environ.items() if n != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, script, *(a.format(d=bad_inputs) for a in argv)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert message.format(d=bad_inputs) in lines[0], lines[0]
    assert listing(bad_inputs) == before and (ROOT / "Kconfig").stat().st_mtime_ns == kconfig  # nothing written

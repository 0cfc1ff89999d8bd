"""scripts/estimate_gpu_cost.py: what the GPU defconfigs cost on paper, the
figures docs/ra.md quotes (gpt2/bench/gpu_cost.py)."""

import subprocess
import sys

from conftest import ROOT
from gpt2.bench.gpu_cost import over


def test_estimate_prints_the_figures_docs_cite():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "estimate_gpu_cost.py")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "V0   N = 123,653,376" in out and "855.2 MFLOP per token" in out
    assert "12 x 1024 x 40 = 491,520 tokens/iter x 2,000 iters = 0.983B tokens per step" in out
    assert "one layer: kept for backward 0.605 GB (4.00 bytes per element" in out
    assert "per micro-batch of 12 x 1024: 90 GB" in out
    assert "all 4: H100 SXM 4.2 h (within --matrix-time), H200 3.6 h (within --matrix-time)" in out


def test_an_mfu_outside_zero_to_one_is_refused():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "estimate_gpu_cost.py"), "--mfu", "40"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "--mfu must be in (0, 1], found 40.0" in r.stderr


def test_over_names_the_cap_a_time_exceeds():
    assert over(2.0, 3600, "--max-time") == " (over --max-time)"
    assert over(0.5, 3600, "--max-time") == " (within --max-time)"
    assert over(9.0, 0, "--max-time") == ""

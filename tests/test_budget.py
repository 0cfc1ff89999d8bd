"""One iteration count for a whole matrix: the pace probe, the choice, the record,
and the runner that trains every run with it (gpt2/budget.py, scripts/run_ablation.py)."""

import json
from types import SimpleNamespace

import pytest

from conftest import tiny_args
from gpt2 import ablation_runner as run_ablation
from gpt2 import budget
from gpt2.budget import Pace, fewest_iterations, iterations_for_budget, probe_pace
from test_ablations import tiny_config


def test_iterations_for_budget_is_the_most_that_fit():
    # per run: n x iter_s + ceil(n / 10) evaluations x eval_s + calibration
    paces = [Pace(iter_s=1.0, eval_s=5.0, eval_interval=10), Pace(iter_s=2.0, eval_s=5.0, eval_interval=10,
                                                                 calib_s=20.0)]
    # n = 50: 50 + 25 + 100 + 25 + 20 = 220
    assert sum(p.run_seconds(50) for p in paces) == 220
    assert iterations_for_budget(paces, 220, cap=1000) == 50
    assert iterations_for_budget(paces, 219.9, cap=1000) == 49  # 147 + 50 + 20 = 217 at 49
    assert iterations_for_budget(paces, 1e9, cap=300) == 300  # the cap binds
    assert iterations_for_budget(paces, 20, cap=300) == 0  # not one iteration fits


def test_fewest_iterations_names_warmup_and_calibration():
    off = dict(v_cache="", kv_prune=False, kvsplice_enable=False, kvsplice_load=None)
    v0 = SimpleNamespace(warmup_iters=12, kvsplice_calib_iter=None, **off)
    v20 = SimpleNamespace(warmup_iters=12, kvsplice_calib_iter=30, **{**off, "kvsplice_enable": True},
                          kvsplice_k=16, kvsplice_knots=7)
    assert fewest_iterations({"V0": v0, "V19": v0}) == (13, "--warmup-iters 12 (V0, V19)")
    assert fewest_iterations({"V0": v0, "V20": v20}) == (31, "calibration at iteration 30 (V20)")


def test_the_probe_times_iterations_evaluation_and_calibration(tiny_data_dir, tmp_path):
    kv = ("--kv-prune", "--kv-prune-k-min", "16", "--kv-prune-recency", "8", "--kvsplice-enable",
          "--kvsplice-k", "4", "--kvsplice-epochs", "2")
    v0 = probe_pace(tiny_args(tiny_data_dir, tmp_path / "a"))
    assert v0.iter_s > 0 and v0.eval_s > 0 and v0.calib_s == 0 and v0.eval_interval == 10
    calibrations = {}
    v20 = probe_pace(tiny_args(tiny_data_dir, tmp_path / "b", *kv), calibrations=calibrations)
    assert v20.calib_s > 0 and len(calibrations) == 1
    v21 = probe_pace(tiny_args(tiny_data_dir, tmp_path / "c", *kv, "--rmlp"), calibrations=calibrations)
    assert v21.calib_s == v20.calib_s and len(calibrations) == 1  # the same fit, estimated once
    assert not (tmp_path / "a").exists()  # the probe writes nothing


@pytest.fixture
def fixed_pace(monkeypatch):
    """The probe says every step takes `seconds` per iteration (evaluations free)."""
    def set_pace(seconds):
        monkeypatch.setattr(budget, "probe_pace", lambda args, world=1, calibrations=None:
                            Pace(iter_s=seconds, eval_s=0.0, eval_interval=args.eval_interval))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return set_pace


def test_the_matrix_budget_decides_one_count_for_every_run_once(tiny_data_dir, tmp_path, fixed_pace, capfd):
    out = tmp_path / "runs" / "tiny"
    config = tiny_config(tmp_path / ".config", tiny_data_dir, out, ['CONFIG_MATRIX_TIME="100"', "CONFIG_MAX_ITERS=50"])
    fixed_pace(4.0)  # two runs of n iterations at 4 s: 8n <= 100 s less the probe's time, so n = 12
    assert run_ablation.main(["--config", str(config)]) == 0
    printed = capfd.readouterr().out
    assert "[budget] pace measured: V0 4,000 ms/iter, V19 4,000 ms/iter" in printed
    assert printed.count("12 iterations per run") == 1 and "3,072 tokens each" in printed
    record = json.loads((out / "budget.json").read_text())
    assert record["iters"] == 12 and record["tokens_per_run"] == 12 * 4 * 64 and record["pace"]["V0"]["iter_s"] == 4
    for step in ("V0", "V19"):
        summary = json.loads((out / step / "summary.json").read_text())
        assert summary["iters"] == 12 and summary["tokens"] == 3072
    md = (out / "summary.md").read_text()
    assert "| V0 | 1 | 12 | 3,072 |" in md and "| V19 | 1 | 12 | 3,072 |" in md and "INVALID" not in md

    fixed_pace(1000.0)  # a rerun keeps the recorded count, whatever the pace now
    assert run_ablation.main(["--config", str(config)]) == 0
    printed = capfd.readouterr().out
    assert "[budget] 12 iterations per run (3,072 tokens), as decided for this matrix in" in printed
    assert printed.count("already complete") == 2 and "pace measured" not in printed


def test_a_budget_that_cannot_reach_the_end_of_warmup_fails_before_training(tiny_data_dir, tmp_path, fixed_pace,
                                                                            capfd):
    out = tmp_path / "runs" / "tiny"
    config = tiny_config(tmp_path / ".config", tiny_data_dir, out, ['CONFIG_MATRIX_TIME="100"'])
    fixed_pace(30.0)  # 1 iteration per run fits; warmup is 2
    assert run_ablation.main(["--config", str(config)]) == 2
    err = capfd.readouterr().err
    assert "--matrix-time 100 s fits 1 iterations per run for the 2 runs of this matrix" in err
    assert "needs at least 3 (--warmup-iters 2 (V0, V19)): raise --matrix-time" in err
    assert not out.exists()  # nothing trained, nothing recorded


@pytest.mark.parametrize("line, message", [
    ('CONFIG_MAX_TIME="60"', "--max-time 60 (CONFIG_MAX_TIME) would let each of the 2 runs of this matrix cut its "
                             "own schedule"),
    ('CONFIG_MATRIX_TIME="-1"', "--matrix-time must be a finite number >= 0"),
])
def test_a_per_run_time_cut_or_a_bad_budget_is_refused(tiny_data_dir, tmp_path, capfd, line, message):
    out = tmp_path / "runs" / "tiny"
    config = tiny_config(tmp_path / ".config", tiny_data_dir, out, [line])
    assert run_ablation.main(["--config", str(config)]) == 2
    assert message in capfd.readouterr().err and not out.exists()

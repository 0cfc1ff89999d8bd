"""gpt2/bench/recovery.py: the cost of each step's method post hoc and after fine-tuning,
against V0 fine-tuned the same way, paired over the same held-out batches."""

import statistics

import pytest

from conftest import tiny_args, tiny_llama_dir
from gpt2.bench.recovery import measure, recovered_se, report
from gpt2.train import train


@pytest.fixture(scope="module")
def matrix(smollm2_tokens, tmp_path_factory):
    """V0, V19 and V20 fine-tuned for 6 steps from a random SmolLM2-shaped Llama."""
    root = tmp_path_factory.mktemp("recovery")
    source = tiny_llama_dir(root / "llama")
    for step in ("V0", "V19", "V20"):
        train(tiny_args(smollm2_tokens, root / "matrix" / step, "--init-from", str(source), "--tokenizer", "smollm2",
                        "--ablation-step", step, "--kv-prune-k-min", "8", "--kv-prune-recency", "4",
                        "--kvsplice-k", "4", "--max-iters", "6", "--kvsplice-calib-iter", "2",
                        "--kvsplice-max-batches", "2", "--kvsplice-epochs", "1"))
    return root / "matrix"


def test_costs_are_paired_against_the_pretrained_model_and_v0(matrix):
    logged = []
    result = measure(matrix, n_batches=3, log=logged.append)
    rows = result["rows"]
    assert list(rows) == ["V0", "V19", "V20"] and result["iters"] == 6
    assert rows["V0"]["cost0"] == [0.0] * 3 and rows["V0"]["costN"] == [0.0] * 3  # the control against itself
    for step in ("V19", "V20"):
        r = rows[step]
        assert r["cost0"] == [a - b for a, b in zip(r["at0"], result["base0"])]
        assert r["costN"] == [a - b for a, b in zip(r["atN"], result["baseN"])]
        assert any(c != 0 for c in r["cost0"])  # the method changes the pretrained model's loss
    assert rows["V20"]["record"]["codec"]["kind"] == "splinepca"
    fitted = "[recovery] fitted prune(keep_ratio=0.382, k_min=8, recency=4) + splinepca(k=4, knots=7)"
    assert f"{fitted} on the pretrained model" in logged
    text = report(result, "python scripts/recovery.py --matrix M")
    assert "| V20 | prune(keep_ratio=0.382, k_min=8, recency=4) + splinepca(k=4, knots=7) |" in text
    assert "- V20 - V19, post hoc: " in text and "- V20 - V19, after 6 steps: " in text
    assert "Regenerate: `python scripts/recovery.py --matrix M`" in text


def test_the_recovered_fraction_and_its_bootstrap_error():
    cost0, costN = [1.0, 1.2, 0.8, 1.0], [0.5, 0.7, 0.3, 0.5]
    assert 1 - statistics.fmean(costN) / statistics.fmean(cost0) == pytest.approx(0.5)
    assert 0 < recovered_se(cost0, costN) < 0.2
    assert recovered_se([1.0] * 4, [0.5] * 4) == 0.0


def test_a_matrix_without_its_control_is_refused(matrix, tmp_path):
    from scripts.recovery import main

    (tmp_path / "V20").mkdir()
    assert main(["--matrix", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["--matrix", str(tmp_path / "nowhere")])

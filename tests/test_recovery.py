"""gpt2/bench/recovery.py: the cost of each step's method post hoc and after fine-tuning,
against V0 fine-tuned the same way, paired over the same held-out batches."""

import statistics

import pytest

from conftest import tiny_args, tiny_llama_dir
from gpt2.bench.recovery import matrix_dirs, measure, recovered_fraction, recovered_se, report
from gpt2.train import train


def fine_tune(root, source, data_dir, seed, steps=("V0", "V19", "V20"), iters=6):
    for step in steps:
        train(tiny_args(data_dir, root / step, "--init-from", str(source), "--tokenizer", "smollm2",
                        "--ablation-step", step, "--kv-prune-k-min", "8", "--kv-prune-recency", "4",
                        "--kvsplice-k", "4", "--max-iters", str(iters), "--kvsplice-calib-iter", "2",
                        "--kvsplice-max-batches", "2", "--kvsplice-epochs", "1", "--seed", str(seed)))
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random SmolLM2-shaped Llama: the pretrained start."""
    return tiny_llama_dir(tmp_path_factory.mktemp("recovery") / "llama")


@pytest.fixture(scope="module")
def matrix(smollm2_tokens, source):
    """V0, V19 and V20 fine-tuned for 6 steps from the start."""
    return fine_tune(source.parent / "matrix", source, smollm2_tokens, seed=1337)


@pytest.fixture(scope="module")
def seeds(smollm2_tokens, source, matrix):
    """The same matrix under --seeds 1337,2 (DIR/seed<N>/<step>): seed 1337 is the matrix above."""
    root = source.parent / "seeds"
    root.mkdir()
    (root / "seed1337").symlink_to(matrix, target_is_directory=True)
    fine_tune(root / "seed2", source, smollm2_tokens, seed=2)
    return root


def test_costs_are_paired_against_the_pretrained_model_and_v0(matrix):
    logged = []
    result = measure(matrix, n_batches=3, log=logged.append)
    [m] = result["matrices"]
    rows = m["rows"]
    assert list(rows) == ["V0", "V19", "V20"] and result["iters"] == 6 and m["seed"] == 1337
    assert rows["V0"]["cost0"] == [0.0] * 3 and rows["V0"]["costN"] == [0.0] * 3  # the control against itself
    for step in ("V19", "V20"):
        r = rows[step]
        assert r["cost0"] == [a - b for a, b in zip(r["at0"], result["base0"])]
        assert r["costN"] == [a - b for a, b in zip(r["atN"], m["baseN"])]
        assert any(c != 0 for c in r["cost0"])  # the method changes the pretrained model's loss
    assert rows["V20"]["record"]["codec"]["kind"] == "splinepca"
    fitted = "[recovery] fitted prune(keep_ratio=0.382, k_min=8, recency=4) + splinepca(k=4, knots=7)"
    assert f"{fitted} on the pretrained model" in logged
    text = report(result, "python scripts/recovery.py --matrix M")
    assert "| V20 | prune(keep_ratio=0.382, k_min=8, recency=4) + splinepca(k=4, knots=7) |" in text
    assert "- V20 - V19, post hoc: " in text and "- V20 - V19, after 6 steps: " in text
    assert "Regenerate: `python scripts/recovery.py --matrix M`" in text
    assert "A single fine-tuning run per step (one seed)" in text and "Over the" not in text


def test_seeds_are_scored_on_the_same_batches_and_summarised_over_seeds(seeds, matrix):
    assert [d.name for d in matrix_dirs([seeds])] == ["seed2", "seed1337"]  # in the order of the seeds' numbers
    alone = measure(matrix, n_batches=3, log=lambda _: None)["matrices"][0]
    result = measure([seeds / "seed1337", seeds / "seed2"], n_batches=3, log=lambda _: None)
    first, second = result["matrices"]
    assert (first["seed"], second["seed"]) == (1337, 2)
    # every model is scored on the batches of the first matrix's seed: seed 1337's figures are its own
    for step in ("V19", "V20"):
        assert first["rows"][step]["at0"] == alone["rows"][step]["at0"]
        assert first["rows"][step]["atN"] == alone["rows"][step]["atN"]
    # pruning fits nothing, so V19's post-hoc loss is one measurement for both seeds; V20's geometry is
    # fitted with each run's own seed, and each seed fine-tuned on other batches
    assert second["rows"]["V19"]["at0"] == first["rows"]["V19"]["at0"]
    assert second["rows"]["V20"]["at0"] != first["rows"]["V20"]["at0"]
    assert second["rows"]["V20"]["atN"] != first["rows"]["V20"]["atN"]
    text = report(result, "python scripts/recovery.py --matrix S")
    assert "| step | seed | method |" in text and "| V20 | 2 | prune(" in text and "| V20 | 1337 | prune(" in text
    assert "Over the 2 seeds (mean +- sd of the per-seed figures):" in text
    assert "- V20 - V19, after 6 steps (seed 2): " in text
    assert "- V20 - V19, after 6 steps, over the 2 seeds: " in text
    assert "2 fine-tuning runs per step (seeds 1337, 2)" in text and "(one seed)" not in text


def test_matrices_of_different_setups_are_refused(smollm2_tokens, source, matrix):
    other = fine_tune(source.parent / "short", source, smollm2_tokens, seed=3, steps=("V0", "V19"), iters=4)
    with pytest.raises(ValueError) as e:
        measure([matrix, other], n_batches=3, log=lambda _: None)
    assert f"{other} trained 4 iterations, {matrix} 6" in str(e.value)
    assert f"{other} has steps V0, V19, {matrix} V0, V19, V20" in str(e.value)


def test_the_recovered_fraction_and_its_bootstrap_error():
    cost0, costN = [1.0, 1.2, 0.8, 1.0], [0.5, 0.7, 0.3, 0.5]
    assert 1 - statistics.fmean(costN) / statistics.fmean(cost0) == pytest.approx(0.5)
    assert 0 < recovered_se(cost0, costN) < 0.2
    assert recovered_se([1.0] * 4, [0.5] * 4) == 0.0
    row = {"cost0": cost0, "costN": costN}
    assert recovered_fraction(row) == (f"0.50 +- {recovered_se(cost0, costN):.2f}", pytest.approx(0.5))
    assert recovered_fraction({"cost0": [-c for c in cost0], "costN": costN})[1] is None  # a gain is not a cost
    noise = {"cost0": [0.1, -0.1, 0.1, -0.1], "costN": costN}
    assert recovered_fraction(noise) == ("not resolved: cost(0) within noise", None)


def test_a_matrix_without_its_control_is_refused(matrix, tmp_path):
    from gpt2.bench.recovery_cli import main

    (tmp_path / "V20").mkdir()
    assert main(["--matrix", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["--matrix", str(tmp_path / "nowhere")])


def test_several_matrices_need_an_out_path_and_every_problem_is_named(matrix, tmp_path, capsys):
    from gpt2.bench.recovery_cli import main

    with pytest.raises(SystemExit) as e:
        main(["--matrix", str(matrix), str(tmp_path / "nowhere"), "--batches", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--batches must be >= 2" in err and f"--matrix {tmp_path / 'nowhere'}: no such directory" in err
    assert "several --matrix directories need --out" in err

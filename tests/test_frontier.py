"""gpt2/bench/frontier.py: the V-cache frontier's grid (every row within its
budget, every byte counted), and the command end to end on a tiny stand-in for
SmolLM2 (tests/test_bench_kv.py's), with bad input refused before anything runs."""

import json

import pytest
import torch

from gpt2.bench import frontier
from lib.vcache import build_method
from test_bench_kv import tiny_smollm2  # noqa: F401  (a fixture)


def by_name(rows):
    return {(r.context, r.bits, r.name): r.record["codec"] for r in rows}


@pytest.mark.parametrize("hd", [64, 32])
def test_every_planned_row_fits_its_budget_and_builds(hd):
    rows = frontier.plan([512, 2048], hd, 2048)
    assert rows[0].family == "full V"
    samples = torch.randn(600, hd, generator=torch.Generator().manual_seed(0))
    for row in rows:
        method = build_method(row.record, 2048, hd)
        if row.family == "full V":
            continue
        if method.needs_fit:  # bytes are a fitted codec's
            method.codec.fit(samples, epochs=0)
        bytes_per_vector = method.v_bytes(row.context, torch.bfloat16) / row.context
        assert bytes_per_vector <= row.bits * hd / 8, row.name
        if row.family not in frontier.CONTROLS:  # within one byte of it, or a coarse family's nearest
            assert bytes_per_vector > row.bits * hd / 8 - (hd // 8 + 1), row.name
    families = {(r.context, r.bits, r.name) for r in rows}
    assert (512, 2, "int") not in families  # int2 in groups of 64 is 20 bytes: 2 bits holds no int
    if hd == 64:
        assert {(512, 2.5, "int"), (512, 2.5, "turbo + sinks + window"), (512, 4, "PCA k=16"),
                (2048, 2, "kvtc + sinks + window"), (512, 2.5, "window 80 tok")} <= families
    chosen = frontier.plan([256], hd, 2048, families=["kvtc"], budgets=[2.5])
    assert [r.name for r in chosen] == ["full V", f"window {int(2.5 * hd / 8 * 256 // (2 * hd))} tok",
                                        f"random {int(2.5 * hd / 8 * 256 // (2 * hd))} tok",
                                        "kvtc", "kvtc + sinks", "kvtc + sinks + window"]
    if hd == 64:  # of two int codecs at 32 bytes, int3 in groups of 32 (not int2 in groups of 16)
        assert by_name(rows)[512, 4, "int"] == {"kind": "int", "bits": 3, "group_size": 32}
    # exact tokens are paid for: the same budget, fewer bits for the codec
    by = by_name(frontier.plan([512], hd, 2048, grid="wide"))
    bits = [by[512, 3, name]["bits"] for name in ("turbo", "turbo + sinks", "turbo + sinks + window")]
    assert bits == sorted(bits, reverse=True) and len(set(bits)) == 3


def test_the_default_grid_asks_every_geometry_question_at_the_goal_budget_and_samples_the_rest():
    rows = frontier.plan([512, 2048], 64, 2048)
    names = {(r.context, r.bits, r.name) for r in rows}
    for a, b, _ in frontier.GEOMETRY_PAIRS:  # each pair runs at 2.5 bits, context 512
        assert {(512, 2.5, a), (512, 2.5, b)} <= names, (a, b)
    for T, bits in ((512, 2), (512, 2.5), (512, 3), (512, 4), (2048, 2), (2048, 2.5)):  # contenders, a control
        assert {(T, bits, "turbo + sinks + window"), (T, bits, "kvtc + sinks + window")} <= names
        assert any(r.family == "window" for r in rows if (r.context, r.bits) == (T, bits))
    assert not any(r.family == "random" for r in rows if r.context == 2048)
    wide = {(r.context, r.bits, r.name) for r in frontier.plan([512, 2048], 64, 2048, grid="wide")}
    assert names < wide and len(rows) < 0.6 * len(wide)
    assert {(512, 3, "pca basis"), (2048, 2, "random 256 tok")} <= wide - names
    # a budget the grid does not list runs every family and variant its context lists
    odd = {r.name for r in frontier.plan([512], 64, 2048, budgets=[3.5])}
    assert {"turbo", "kvtc + sinks", "spline turbo", "rotated int + sinks + window", "random 112 tok"} <= odd


def test_the_frontier_runs_end_to_end_and_names_the_best_row_at_each_budget(tiny_smollm2, tiny_data_dir,  # noqa: F811
                                                                            tmp_path, monkeypatch):
    import gpt2.bench.kv_source as source
    monkeypatch.setattr(frontier, "load_pretrained", source.load_pretrained)  # the fixture's tiny Llama
    out, png = tmp_path / "out", tmp_path / "frontier.png"
    results = frontier.main(["--contexts", "32,64", "--unit", "32", "--eval-tokens", "128", "--calib-batches", "4",
                             "--induction-batches", "2", "--fit-epochs", "1", "--data-dir", str(tiny_data_dir),
                             "--out-dir", str(out), "--plot", str(png)])
    assert png.is_file() and (out / "frontier.md").is_file()
    saved = json.loads((out / "frontier.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results))
    for T, units in ((32, 4), (64, 4)):  # 128 tokens: 4 sequences of 32, 2 of 64 in halves
        rows = [r for r in results if r["context"] == T]
        ref = next(r for r in rows if r["family"] == "full V")
        assert ref["ppl_change_pct"] == 0 and len(ref["units"]) == units and len(ref["induction_per_batch"]) == 2
        for bits in {r["bits"] for r in rows if r is not ref}:
            group = [r for r in rows if r["bits"] == bits and r is not ref]
            best = [r for r in group if r["vs_best_verdict"] == "best"]
            assert len(best) == 1 and best[0]["loss"] == min(r["loss"] for r in group)
            assert all(r["vs_best"] >= 0 and r["bytes"] <= bits * 32 / 8 for r in group)
    text = (out / "frontier.md").read_text()
    assert "Best at each budget" in text and "Goal (<= 20 bytes" in text and "### Context 64" in text
    redrawn = tmp_path / "again.png"
    assert frontier.main(["--replot", str(out / "frontier.json"), "--plot", str(redrawn)]) == saved["rows"]
    assert redrawn.is_file()
    # a grid with no fitted codec collects no V
    ints = frontier.main(["--contexts", "32", "--unit", "32", "--eval-tokens", "64", "--families", "int", "--budgets",
                          "4", "--data-dir", str(tiny_data_dir), "--out-dir", str(out), "--plot", str(png)])
    assert [r["method"] for r in ints] == ["full V", "window 8 tok", "random 8 tok", "int"]


@pytest.mark.parametrize("argv, message", [
    (["--contexts", "500"], "--contexts: each must be a multiple of --unit 512 up to 8192, got [500]"),
    (["--contexts", "a,b"], "--contexts must be comma-separated ints, got 'a,b'"),
    (["--eval-tokens", "1"], "--eval-tokens must be >= 2"),
    (["--contexts", "1024", "--eval-tokens", "512"], "--eval-tokens 512 is shorter than a context"),
    (["--families", "kvtc,zip"], "--families: unknown ['zip']; known: int, rotated int, turbo"),
    (["--budgets", "2,x"], "--budgets must be comma-separated numbers, got '2,x'"),
    (["--budgets", "0"], "--budgets: each must be in (0, 16) bits per dimension, got [0.0]"),
    (["--grid", "all"], "argument --grid: invalid choice: 'all'"),
])
def test_bad_input_is_one_clear_error_before_anything_runs(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        frontier.main(argv + ["--out-dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_goal_line_says_met_only_for_a_method_within_both_limits():
    def row(method, family, nbytes, pct):
        return {"method": method, "family": family, "context": 512, "bytes": nbytes, "ppl_change_pct": pct,
                "ppl_change_se_pct": 0.1}
    ref = row("full V", "full V", 128, 0.0)
    control = row("window 80 tok", "window", 20, 0.5)  # a control never meets it
    assert "**met** post hoc by kvtc at context 512 (19.4 bytes, +0.90 ± 0.10%)" in frontier.goal_line(
        [ref, control, row("kvtc", "kvtc", 19.4, 0.9), row("int", "int", 20, 0.95)])
    assert "**not met** post hoc; the closest is kvtc at context 512 (19.4 bytes, +2.97 ± 0.10%)" in \
        frontier.goal_line([ref, control, row("kvtc", "kvtc", 19.4, 2.97), row("int4", "int", 40, 0.5)])
    assert "no method holds so few bytes" in frontier.goal_line([ref, control, row("int4", "int", 40, 0.5)])

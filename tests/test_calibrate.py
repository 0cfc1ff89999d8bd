import json
import math

import pytest
import torch

import toy_methods  # noqa: F401  (registers centred_int8, a codec with a fit step that is not a geometry)
from conftest import fail_at, importance_scores, losses_by_iter, tiny_args, tiny_argv
from gpt2.calibrate import KVSpliceCalibrator, fit_codecs
from gpt2.geometry import load_fitted
from gpt2.model import GPT, GPTConfig
from gpt2.train import train, v_cache_footprint
from lib.kv_pruning import keep_mask


def calibrate(model, batches=3, T=32):
    """Calibrate the model's codecs in place; returns the fit statistics."""
    return fit_codecs(model, (torch.randint(0, model.config.vocab_size, (2, T)) for _ in range(batches)),
                      max_samples=4000, epochs=2)[1]


def v_cache(prune=False, k_min=8, recency=4, codec="splinepca", k=4):
    select = {"kind": "prune", "k_min": k_min, "recency": recency} if prune else {"kind": "full"}
    return {"select": select, "codec": {"kind": codec, "k": k, "knots": 5} if codec != "none" else {"kind": codec}}


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50, v_cache=v_cache())
    return GPT(GPTConfig(**{**cfg, **kw}))


def test_hooks_are_removed_and_samples_bounded_on_cpu():
    model = tiny_model()
    cal = KVSpliceCalibrator(model, max_samples=10_000)
    assert cal.cap == 8000  # min(--kvsplice-samples, 2000 * k): what the codec's fit wants
    cal.register()
    assert all(len(b.attn.c_attn._forward_hooks) == 1 for b in model.transformer.h)
    cal.remove()
    assert all(len(b.attn.c_attn._forward_hooks) == 0 for b in model.transformer.h)
    cal.collect(torch.randint(0, 50, (4, 64)) for _ in range(20))  # 20 * 4 * 64 * 2 heads = 10,240 per layer
    assert all(len(b.attn.c_attn._forward_hooks) == 0 for b in model.transformer.h)
    for i, s in enumerate(cal.samples):
        assert s.shape == (8000, 16) and s.dtype == torch.float32 and s.device.type == "cpu"
        assert cal.seen[i] == 10_240


def test_collected_vectors_are_the_v_third_of_c_attn():
    model = tiny_model(n_layer=1)
    cal = KVSpliceCalibrator(model, max_samples=10_000)
    x = torch.randint(0, 50, (1, 8))
    cal.collect([x])
    with torch.no_grad():
        h = model.transformer.wte(x) + model.transformer.wpe(torch.arange(8))
        v = model.transformer.h[0].attn.c_attn(model.transformer.h[0].ln_1(h))[..., 64:]
    expected = v.reshape(-1, 16)
    got = cal.samples[0]
    assert got.shape == expected.shape
    # same set of rows (the subsample is a permutation when nothing is dropped)
    assert torch.allclose(got[got[:, 0].argsort()], expected[expected[:, 0].argsort()])


@pytest.mark.parametrize("max_samples", [0, 4])
def test_a_sample_cap_below_k_plus_one_is_refused_naming_it(max_samples):
    with pytest.raises(ValueError, match=f"max_samples {max_samples} keeps fewer V vectors per layer than "
                                         r"the fit of splinepca needs \(5\); raise --kvsplice-samples"):
        KVSpliceCalibrator(tiny_model(), max_samples=max_samples)


def test_nonfinite_vectors_are_dropped_and_all_nonfinite_is_an_error(capsys):
    model = tiny_model(n_layer=1)
    cal = KVSpliceCalibrator(model)
    v = torch.randn(10, 16)
    v[3, 2] = float("nan")
    v[7, 0] = float("inf")
    cal.add(0, v)
    assert cal.samples[0].shape == (8, 16) and cal.dropped == 2
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.fill_(float("nan"))
    cal = KVSpliceCalibrator(model)
    with pytest.raises(ValueError, match="no finite V vectors"):
        cal.collect([torch.randint(0, 50, (1, 8))])
    assert "dropped 16 V vectors with NaN/inf" in capsys.readouterr().out


def test_prune_then_compress_equals_compress_then_prune():
    """Strategy A (compress only the values some query keeps) equals B (compress
    all, then select), the one the model runs: every token is kept while in its
    own recency window, so every value is read by some query."""
    model = tiny_model(v_cache=v_cache(prune=True)).eval()
    calibrate(model)
    attn = model.transformer.h[0].attn
    rule, geo = attn.vcache.selector.rule, attn.vcache.codec.geometry
    q, k, v = (torch.randn(2, 2, 64, 16) for _ in range(3))
    with torch.no_grad():
        probs = torch.softmax((q @ k.transpose(-2, -1) / 4).masked_fill(
            ~torch.ones(64, 64, dtype=torch.bool).tril(), float("-inf")), -1)
    keep = keep_mask(importance_scores(probs, rule.recency), rule.budget, rule.recency)
    used = keep.any(dim=-2)  # (B, nh, T): values some query reads
    assert used.all()
    strategy_a = rule(q, k, torch.where(used[..., None], geo.roundtrip(v), v))
    assert torch.allclose(strategy_a, attn.vcache.attend(q, k, v), atol=1e-6)


def test_geometry_is_frozen_and_gradients_reach_the_model():
    model = tiny_model()
    calibrate(model)
    geo = model.transformer.h[0].attn.vcache.codec.geometry
    assert all(not p.requires_grad for p in geo.parameters())
    _, loss = model(torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16)))
    loss.backward()
    w = model.transformer.h[0].attn.c_attn.weight.grad
    assert w[64:].abs().sum() > 0  # the V rows of c_attn learn through the geometry
    assert all(p.grad is None for p in geo.parameters())


def test_v_cache_memory_table():
    """T=1024, head_dim 64, k=16, 391 kept: 65,536 / 25,024 / 6,256 V elements per head per layer."""
    def footprint(prune, k):
        model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=64, block_size=1024, vocab_size=16,
                              v_cache=v_cache(prune, k_min=64, recency=64, codec="splinepca" if k else "none",
                                              k=k)))
        if k:
            cal = KVSpliceCalibrator(model)
            cal.add(0, torch.randn(2000, 64))
            cal.fit(epochs=1)
        return v_cache_footprint(model)["elements_per_head"]

    assert footprint(False, None) == 65_536
    assert footprint(True, None) == 25_024
    assert footprint(True, 16) == 6_256


def test_calibrated_training_run_end_to_end(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    dump = tmp_path / "v_samples.pt"
    train(tiny_args(tiny_data_dir, run, "--max-iters", "20", "--kvsplice-enable", "--kvsplice-k", "16",
                    "--kvsplice-max-batches", "4", "--kvsplice-calib-iter", "10", "--kvsplice-epochs", "2",
                    "--kvsplice-dump-samples", str(dump), "--kv-prune", "--kv-prune-k-min", "16",
                    "--kv-prune-recency", "8"))
    out = capsys.readouterr().out
    assert "[KVSplice] calibrating at iteration 10" in out
    assert "[KVSplice] batch 4, collected" in out and f"[KVSplice] Saved to {run / 'kvsplice.pt'}" in out
    assert out.index("iter 10/20") < out.index("[KVSplice] calibrating") < out.index("iter 11/20")
    model = GPT.from_checkpoint(run / "last.pt")  # the fitted codec comes with the checkpoint's weights
    assert model.transformer.h[0].attn.vcache.codec.fitted and not model.needs_fit()
    saved = torch.load(run / "kvsplice.pt")
    assert {"Hd", "k", "knots", "state_dict"} <= set(saved) and (saved["Hd"], saved["k"], saved["knots"]) == (32, 16, 7)
    live = model.transformer.h[0].attn.vcache.codec.geometry.state_dict()  # the seed's SplinePCA state per layer
    saved = saved["state_dict"][0]
    assert saved.keys() == live.keys() and all(torch.equal(saved[n], live[n]) for n in saved)  # frozen
    out = model.eval().generate(torch.zeros(1, 1, dtype=torch.long), 30)
    assert out.shape == (1, 31)
    assert torch.load(dump)[0].shape[1] == 32


def test_resume_after_calibration_keeps_the_geometry(tiny_data_dir, tmp_path, capsys):
    extra = ("--max-iters", "20", "--kvsplice-enable", "--kvsplice-k", "8", "--kvsplice-max-batches", "2",
             "--kvsplice-calib-iter", "5", "--kvsplice-epochs", "1")
    train(tiny_args(tiny_data_dir, tmp_path / "straight", *extra))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_args(tiny_data_dir, tmp_path / "killed", *extra), on_iter=fail_at(10))
    capsys.readouterr()
    train(tiny_args(tiny_data_dir, tmp_path / "killed", *extra, "--resume"))
    assert "[KVSplice] calibrating" not in capsys.readouterr().out
    a, b = losses_by_iter(tmp_path / "straight"), losses_by_iter(tmp_path / "killed")
    assert all(b[i] == pytest.approx(a[i], abs=1e-6) for i in range(11, 21))


def test_kvsplice_load_checks_the_model(tmp_path):
    from gpt2.geometry import save_fitted

    model = tiny_model()
    calibrate(model)
    path = tmp_path / "kvsplice.pt"
    save_fitted(model, path)
    with pytest.raises(ValueError, match="head_dim is 16, but the model needs head_dim = 32"):
        load_fitted(path, tiny_model(n_head=1))
    with pytest.raises(ValueError, match="n_layer is 2, but the model needs n_layer = 3"):
        load_fitted(path, tiny_model(n_layer=3))
    with pytest.raises(ValueError, match="k is 4, but the model needs k = 8"):
        load_fitted(path, tiny_model(v_cache=v_cache(k=8)))
    with pytest.raises(ValueError, match="holds a KVSplice geometry, but the model's V codec is full \\+ int4"):
        load_fitted(path, tiny_model(v_cache={"select": {"kind": "full"}, "codec": {"kind": "int4", "group_size": 8}}))
    fresh = tiny_model()
    load_fitted(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable KVSplice geometry"):
        load_fitted(path, model)
    torch.save({"model": 1}, path)
    with pytest.raises(ValueError, match="is not a fitted V codec file: format_version None"):
        load_fitted(path, model)


def _codec_states(model):
    return [{n: t.clone() for n, t in codec.state_dict().items()} for codec in model.v_codecs()]


def test_the_seeds_geometry_file_and_every_earlier_format_load(tmp_path):
    """kvsplice.pt in the seed's shape ({Hd, k, knots, state_dict}: one SplinePCA for
    every layer), format 1 (a SplinePCA per layer, `shared`) and format 2 (the codecs'
    own state_dicts) load into a splinepca codec as the file saved today does."""
    from lib.kvsplice import SplinePCA

    model = tiny_model()
    calibrate(model)
    geometries = [codec.geometry.state_dict() for codec in model.v_codecs()]
    seed = SplinePCA(16, 4, 5)
    seed.load_state_dict(geometries[1])
    files = {
        "seed": ({"Hd": 16, "k": 4, "knots": 5, "state_dict": seed.state_dict(), "format_version": 1},
                 [geometries[1]] * 2),
        "format1": ({"format_version": 1, "Hd": 16, "k": 4, "knots": 5, "n_layer": 2, "shared": False,
                     "state_dict": geometries}, geometries),
        "format1-shared": ({"format_version": 1, "Hd": 16, "k": 4, "knots": 5, "n_layer": 2, "shared": True,
                            "state_dict": geometries[:1]}, [geometries[0]] * 2),
        "format2": ({"format_version": 2, "codec": model.config.v_cache["codec"], "head_dim": 16, "n_layer": 2,
                     "fit_stats": None, "state_dict": _codec_states(model)}, geometries),
    }
    for name, (saved, expected) in files.items():
        torch.save(saved, tmp_path / f"{name}.pt")
        fresh = tiny_model()
        assert fresh.needs_fit()
        load_fitted(tmp_path / f"{name}.pt", fresh)
        assert not fresh.needs_fit(), name
        for codec, want in zip(fresh.v_codecs(), expected):
            got = codec.geometry.state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), name
    with pytest.raises(ValueError, match="k is 4, but the model needs k = 8"):
        load_fitted(tmp_path / "seed.pt", tiny_model(v_cache=v_cache(k=8)))


def test_a_non_geometry_codec_file_has_the_record_and_the_codec_states(tmp_path):
    from gpt2.geometry import save_fitted

    record = {"select": {"kind": "full"}, "codec": {"kind": "centred_int8"}}
    model = tiny_model(v_cache=record)
    calibrate(model)
    save_fitted(model, tmp_path / "kvsplice.pt")
    saved = torch.load(tmp_path / "kvsplice.pt")
    assert saved["codec"] == {"kind": "centred_int8"} and "Hd" not in saved
    fresh = tiny_model(v_cache=record)
    load_fitted(tmp_path / "kvsplice.pt", fresh)
    assert not fresh.needs_fit()
    assert all(torch.equal(a[n], b[n]) for a, b in zip(_codec_states(fresh), _codec_states(model)) for n in a)


def test_dump_samples_of_a_trained_checkpoint_feeds_the_validation_script(tiny_data_dir, tmp_path):
    from gpt2.calibrate import main
    from gpt2.bench.kvsplice_validate import validate_tensor

    train(tiny_args(tiny_data_dir, tmp_path / "run", "--max-iters", "4"))
    out = tmp_path / "v.pt"
    assert main(["--ckpt", str(tmp_path / "run" / "best.pt"), "--out", str(out), "--batches", "2"]) == 0
    samples = torch.load(out)
    assert sorted(samples) == [0, 1] and samples[0].shape == (2 * 4 * 64 * 2, 32)
    rows = validate_tensor(samples[1], [4], epochs=1)
    assert rows[0]["spline_mse"] <= rows[0]["pca_mse"] * 1.02


def test_kvsplice_load_replaces_calibration(tiny_data_dir, tmp_path, capsys):
    first = tmp_path / "first"
    train(tiny_args(tiny_data_dir, first, "--max-iters", "6", "--kvsplice-enable", "--kvsplice-k", "8",
                    "--kvsplice-max-batches", "2", "--kvsplice-calib-iter", "2", "--kvsplice-epochs", "1"))
    capsys.readouterr()
    geometry = first / "kvsplice.pt"
    train(tiny_args(tiny_data_dir, tmp_path / "second", "--max-iters", "4", "--kvsplice-enable",
                    "--kvsplice-k", "8", "--kvsplice-load", str(geometry)))
    assert "[KVSplice] calibrating" not in capsys.readouterr().out
    model = GPT.from_checkpoint(tmp_path / "second" / "last.pt")
    saved = torch.load(geometry)
    assert all(torch.equal(a[n], t) for a, codec in zip(saved["state_dict"], model.v_codecs())
               for n, t in codec.geometry.state_dict().items())
    with pytest.raises(ValueError, match="k is 8, but the model needs k = 16"):
        train(tiny_args(tiny_data_dir, tmp_path / "third", "--kvsplice-k", "16", "--kvsplice-load", str(geometry)))
    assert not (tmp_path / "third" / "last.pt").exists()


def test_a_v20_run_whose_calibration_never_ran_is_incomplete_and_not_counted(tiny_data_dir, tmp_path, capsys):
    """--max-time can end a V20 run before its calibration iteration: the model
    trained without KVSplice. It exits non-zero, says why, and its summary.json
    is marked incomplete, so comparisons, the benchmark and the ablation runner
    do not count it as V20."""
    from gpt2.bench.kv_bench import trained_in_changes
    from gpt2.compare import write_comparison
    from gpt2.ablation_runner import completed
    from gpt2.cli import main

    matrix = tmp_path / "matrix"
    train(tiny_args(tiny_data_dir, matrix / "V0", "--max-iters", "4", "--ablation-step", "V0"))
    v20 = matrix / "V20"
    assert main(tiny_argv(tiny_data_dir, v20, "--ablation-step", "V20", "--kv-prune-k-min", "16",
                          "--kv-prune-recency", "8", "--kvsplice-k", "8", "--kvsplice-calib-iter", "20",
                          "--max-time", "0.001")) == 1
    err = capsys.readouterr().err
    reason = ("calibration (its codec's fit) was due at iteration 20, but training ended at iteration 1 under "
              "--max-time 0.001s")
    assert ("train_ra_mla.py: error: the run is incomplete: prune(keep_ratio=0.382, k_min=16, recency=8) + "
            f"splinepca(k=8, knots=7): {reason}") in err
    summary = json.loads((v20 / "summary.json").read_text())
    assert summary["complete"] is False and reason in summary["incomplete_reason"] and summary["step"] == "V20"
    assert GPT.from_checkpoint(v20 / "last.pt").needs_fit()
    assert json.loads((matrix / "V0" / "summary.json").read_text())["complete"] is True

    assert completed(matrix / "V0") and not completed(v20)  # the ablation runner runs it again
    assert trained_in_changes(matrix) == ({"V19": None, "V20": None}, {"V0": 1})
    text = write_comparison([matrix / "V0", v20], tmp_path / "compare")
    assert "| V0 | 1 |" in text and "V20" not in text.split("Regenerate")[0]
    assert f"left out {v20}: incomplete" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no complete run"):
        write_comparison([v20], tmp_path / "compare")


def test_a_v20_run_under_bf16_autocast_on_cpu(tiny_data_dir, tmp_path):
    """The autocast path of a GPU run, as far as the CPU exercises it: a V20
    run of 30 iterations under --dtype bfloat16 has finite losses, fits its
    geometry in fp32, and decoding through its cache matches the full forward
    to bf16 precision."""
    from gpt2.data import TokenData

    run = tmp_path / "run"
    summary = train(tiny_args(tiny_data_dir, run, "--dtype", "bfloat16", "--ablation-step", "V20",
                              "--kv-prune-k-min", "16", "--kv-prune-recency", "8", "--kvsplice-k", "8",
                              "--kvsplice-max-batches", "2", "--kvsplice-epochs", "2"))
    losses = losses_by_iter(run)
    assert sorted(losses) == list(range(1, 31)) and all(math.isfinite(v) for v in losses.values())
    assert summary["complete"] and math.isfinite(summary["final_val_loss"])
    geometry = torch.load(run / "kvsplice.pt")
    assert all(t.dtype == torch.float32 for sd in geometry["state_dict"] for t in sd.values() if t.is_floating_point())
    assert all(math.isfinite(s["spline_val_mse"]) for s in geometry["fit_stats"]["layers"])

    model = GPT.from_checkpoint(run / "last.pt").eval()
    idx = TokenData(tiny_data_dir, "shakespeare").get_batch("val", 2, 64, 3, 0, 0)[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = model(idx)
        cache = model.make_cache()
        parts = [model(idx[:, :8], caches=cache)[0]] + [model(idx[:, t:t + 1], caches=cache)[0]
                                                       for t in range(8, 64)]
    decoded = torch.cat(parts, 1)
    assert full.dtype == decoded.dtype == torch.bfloat16
    assert cache.layers[0].v.shape[-1] == 8 and cache.layers[0].v.shape[-2] == 24  # latent V of kept tokens
    assert torch.allclose(decoded.float(), full.float(), rtol=2 ** -5, atol=2 ** -5)  # a few bf16 ulps


def test_cropping_the_context_keeps_the_geometry_and_rescales_the_budget():
    model = tiny_model(v_cache=v_cache(prune=True, k_min=8, recency=4))
    calibrate(model)
    geometry = model.transformer.h[0].attn.vcache.codec.state_dict()
    assert model.transformer.h[0].attn.vcache.selector.rule.budget == 24  # int(64 x 0.382)
    model.crop_block_size(32)
    attn = model.transformer.h[0].attn.vcache
    assert attn.selector.rule.budget == 12 and attn.codec.fitted
    assert all(torch.equal(geometry[n], t) for n, t in attn.codec.state_dict().items())

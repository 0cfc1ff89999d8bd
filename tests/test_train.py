import json

import pytest
import torch

from conftest import fail_at, losses_by_iter, tiny_args
from gpt2.model import GPT, GPTConfig
from gpt2.tracking import read_metrics
from gpt2.train import peak_flops, train
from gpt2.validation import BadArguments


def test_tiny_training_lowers_the_loss(tiny_data_dir, tmp_path):
    summary = train(tiny_args(tiny_data_dir, tmp_path / "run"))
    evals = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert [e["iter"] for e in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert summary["final_val_loss"] < summary["unigram_entropy"] + 1.0
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["final_val_loss"] == pytest.approx(summary["final_val_loss"])
    assert on_disk["iters"] == 30 and on_disk["tokens"] == 30 * 4 * 64
    for name in ("best.pt", "last.pt"):
        assert (tmp_path / "run" / name).exists()
    assert not list((tmp_path / "run").glob("*tmp*"))  # no temp file left behind


def test_checkpoint_rebuilds_model_and_generates(tiny_data_dir, tmp_path):
    train(tiny_args(tiny_data_dir, tmp_path / "run", "--max-iters", "10", "--kv-prune",
                    "--kv-prune-k-min", "16", "--kv-prune-recency", "8"))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ckpt["iter"] == 10 and ckpt["args"]["kv_prune"] is True
    assert {"model", "optimizer", "rng", "model_config"} <= set(ckpt)
    model = GPT.from_checkpoint(tmp_path / "run" / "last.pt")
    assert model.config.v_cache["select"]["kind"] == "prune" and model.config.n_layer == 2
    out = model.eval().generate(torch.zeros(1, 1, dtype=torch.long), 20)
    assert out.shape == (1, 21)


def test_the_sample_continues_the_prompt_and_its_draws_follow_the_seed(tiny_data_dir, tmp_path, capsys):
    from gpt2.data import TokenData
    from gpt2.train import print_sample

    args = tiny_args(tiny_data_dir, tmp_path / "run", "--sample-tokens", "12", "--sample-prompt", "THESEUS:",
                     "--sample-temperature", "0.5", "--sample-top-k", "20")
    data = TokenData(tiny_data_dir, "shakespeare")
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=data.vocab_size))
    samples = []
    for _ in range(2):
        torch.manual_seed(99 + len(samples))  # whatever the generator's state, the seed decides the draws
        print_sample(model, data, args, "cpu")
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[1]
    assert "== sample (temperature 0.5, top-k 20, seed 1337) ==\nTHESEUS:" in samples[0]


def test_resume_reproduces_the_uninterrupted_run(tiny_data_dir, tmp_path):
    extra = ("--max-iters", "40", "--dropout", "0.1")  # dropout: RNG state must be restored too
    train(tiny_args(tiny_data_dir, tmp_path / "straight", *extra))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_args(tiny_data_dir, tmp_path / "killed", *extra), on_iter=fail_at(20))
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=False)["iter"] == 20
    assert not (tmp_path / "killed" / "summary.json").exists()  # interrupted is not finished
    train(tiny_args(tiny_data_dir, tmp_path / "killed", *extra, "--resume"))

    straight, resumed = losses_by_iter(tmp_path / "straight"), losses_by_iter(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 41))
    for it in range(21, 41):
        assert resumed[it] == pytest.approx(straight[it], abs=1e-6), it


def test_missing_data_names_the_prepare_command(tmp_path):
    with pytest.raises(ValueError, match="make data"):
        train(tiny_args(tmp_path / "nowhere", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_bad_arguments_fail_before_training(tiny_data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--kvsplice-k must be an int in \[1, head_dim = 32\], got 33"):
        train(tiny_args(tiny_data_dir, tmp_path / "run", "--kvsplice-enable", "--kvsplice-k", "33"))
    assert not (tmp_path / "run").exists()


def test_time_budget_ends_the_schedule_at_min_lr(tiny_data_dir, tmp_path):
    from gpt2.train import learning_rate, schedule_iters_for_budget, schedule_progress

    args = tiny_args(tiny_data_dir, tmp_path / "run", "--max-iters", "100000", "--max-time", "60")
    # 5 warmup iterations took 3 s: 100 iterations fit the 60 s budget, and the schedule ends there
    n = schedule_iters_for_budget(5, 3.0, args)
    assert n == 100
    lr_end = learning_rate(n, schedule_progress(n, n, args), args)
    assert lr_end == pytest.approx(args.learning_rate * args.min_lr_ratio)
    assert learning_rate(50, schedule_progress(50, n, args), args) > lr_end
    # a budget that does not bind leaves the schedule to --max-iters, whatever the pace
    fast = tiny_args(tiny_data_dir, tmp_path / "run", "--max-iters", "100", "--max-time", "60")
    assert schedule_iters_for_budget(5, 0.5, fast) == schedule_iters_for_budget(5, 2.9, fast) == 100


def test_time_budget_run_stops_at_the_scheduled_iteration(tiny_data_dir, tmp_path, capsys):
    summary = train(tiny_args(tiny_data_dir, tmp_path / "run", "--max-iters", "100000", "--max-time", "4",
                              "--eval-interval", "100000"))
    out = capsys.readouterr().out
    assert "time budget: 4s fits" in out
    assert 5 < summary["iters"] < 100000
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ckpt["schedule_iters"] >= summary["iters"]


def test_resume_after_a_crash_logs_each_iteration_once(tiny_data_dir, tmp_path):
    """A crash at 25 loses iterations 21-25 (last.pt is from 20): the resumed
    run redoes them, and metrics.jsonl holds each iteration once."""
    extra = ("--max-iters", "30")
    train(tiny_args(tiny_data_dir, tmp_path / "straight", *extra))
    with pytest.raises(RuntimeError):
        train(tiny_args(tiny_data_dir, tmp_path / "crashed", *extra), on_iter=fail_at(25, RuntimeError))
    train(tiny_args(tiny_data_dir, tmp_path / "crashed", *extra, "--resume"))
    iters = [r["iter"] for r in read_metrics(tmp_path / "crashed") if "loss" in r]
    assert iters == list(range(1, 31))
    straight = losses_by_iter(tmp_path / "straight")
    resumed = losses_by_iter(tmp_path / "crashed")
    assert all(resumed[i] == pytest.approx(straight[i], abs=1e-6) for i in range(21, 31))


def test_resume_with_another_max_iters_is_refused_and_changes_nothing(tiny_data_dir, tmp_path):
    """The LR schedule spans --max-iters: resuming a 10-iteration run with
    --max-iters 20 trained 0 iterations and exited 0; now it is refused."""
    run = tmp_path / "run"
    train(tiny_args(tiny_data_dir, run, "--max-iters", "10"))
    before = {name: (run / name).read_bytes() for name in ("last.pt", "metrics.jsonl", "summary.json")}
    for max_iters in ("20", "5"):
        with pytest.raises(BadArguments, match=rf"--resume: .*last.pt belongs to a run of --max-iters 10, "
                                               rf"but --max-iters is {max_iters}"):
            train(tiny_args(tiny_data_dir, run, "--max-iters", max_iters, "--resume"))
    assert before == {name: (run / name).read_bytes() for name in before}
    assert train(tiny_args(tiny_data_dir, run, "--max-iters", "10", "--resume"))["iters"] == 10


def test_resume_without_a_checkpoint_is_a_bad_argument(tiny_data_dir, tmp_path):
    with pytest.raises(BadArguments, match="--resume: .*last.pt not found"):
        train(tiny_args(tiny_data_dir, tmp_path / "run", "--resume"))
    assert not (tmp_path / "run").exists()


def test_mfu_is_against_the_flag_or_the_gpus_datasheet_peak_and_never_a_guess(monkeypatch):
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA GH200 480GB": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
             "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA GeForce RTX 4090": None}
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops("cuda:0") == peak, name
        assert peak_flops("cuda:0", 123e12) == 123e12  # --peak-flops wins
    assert peak_flops("cpu") is None

import json
import sys

import pytest

from gpt2.tracking import Tracker, read_metrics, wandb_mode


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No API key, no netrc, wandb's own folders inside tmp_path: nothing can go online."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


def test_wandb_mode_follows_credentials(tmp_path, monkeypatch, no_wandb_login):
    assert wandb_mode() == "offline"
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert wandb_mode() == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_wandb_offline_run(tmp_path, monkeypatch, no_wandb_login):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, {"lr": 6e-4, "n_layer": 4}, kind="wandb",
                      project="test", run_name="offline")
    assert tracker.wandb_run is not None
    for step in range(3):
        tracker.log({"train/loss": 3.0 - step}, step=step)
    tracker.finish({"best_val_loss": 1.5})

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [r["train/loss"] for r in records] == [3.0, 2.0, 1.0]
    assert all("time" in r for r in records)
    assert json.loads((run_dir / "summary.json").read_text()) == {"best_val_loss": 1.5}
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_local_only_and_scalars(tmp_path):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    tracker = Tracker(tmp_path, {"x": 1}, kind="none")
    tracker.log({"a": np.float32(0.5), "b": torch.tensor(2.0)}, step=7)
    tracker.summary({"first": 1})
    tracker.finish({"second": 2})
    assert read_metrics(tmp_path)[0]["a"] == 0.5
    assert read_metrics(tmp_path)[0]["b"] == 2.0
    assert json.loads((tmp_path / "summary.json").read_text()) == {"first": 1, "second": 2}
    assert not (tmp_path / "wandb").exists()


def test_auto_falls_back_when_wandb_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.warns(UserWarning, match="wandb unavailable"):
        tracker = Tracker(tmp_path, {}, kind="auto")
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    [record] = read_metrics(tmp_path)
    assert (record["step"], record["loss"]) == (1, 1.0)
    with pytest.raises(RuntimeError, match="wandb could not start"):
        Tracker(tmp_path / "explicit", {}, kind="wandb")


def test_nonzero_rank_writes_nothing(tmp_path):
    tracker = Tracker(tmp_path / "run", {}, kind="auto", rank=1)
    tracker.log({"loss": 1.0}, step=0)
    tracker.finish({"x": 1})
    assert not (tmp_path / "run").exists()


def test_truncated_last_line_after_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
    assert read_metrics(tmp_path) == [{"step": 0, "loss": 1.0}]
    # A resumed run drops the partial line instead of gluing onto it.
    tracker = Tracker(tmp_path, {}, kind="none")
    tracker.log({"loss": 0.5}, step=1)
    tracker.finish()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]


def test_corrupt_middle_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(tmp_path)

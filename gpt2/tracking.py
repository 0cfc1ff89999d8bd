"""Experiment tracking: a local metrics.jsonl always, wandb when available.

wandb runs online only when the user is logged in (WANDB_API_KEY or a ~/.netrc
entry for the wandb host), else offline under <run_dir>/wandb/offline-run-*
(`wandb sync` uploads it later). wandb cannot read offline runs back, so
metrics.jsonl and summary.json are the record that tests and compare_runs read.

    tracker = Tracker("out/V19", vars(args), project="kvsplice", run_name="V19")
    tracker.log({"train/loss": 3.1, "lr": 6e-4}, step=100)
    tracker.finish({"best_val_loss": 3.05})
"""

import json
import netrc
import os
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from gpt2.atomic import atomic_write_text

_DEFAULT_WANDB_HOST = "https://api.wandb.ai"


def _to_json(value):
    """json.dumps fallback for numpy / torch scalars."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot log a {type(value).__name__} as a metric: {value!r}")


def wandb_logged_in() -> bool:
    """True when wandb has an API key, found without touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", _DEFAULT_WANDB_HOST)).hostname
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        entry = netrc.netrc(netrc_path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_mode() -> str:
    """WANDB_MODE if the user set it, else online when logged in, else offline."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")


def _drop_partial_last_line(path: Path):
    """A crash can leave half a JSON line; cut it so appended lines stay whole."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class Tracker:
    """Logs metrics to <run_dir>/metrics.jsonl (and wandb); only rank 0 does anything.

    kind: "auto"  wandb if it imports and starts, else local files only (one warning)
          "wandb" wandb or an exception
          "none"  local files only
    """

    def __init__(self, run_dir, args: dict, kind="auto", project="kvsplice",
                 run_name=None, group=None, rank=0):
        if kind not in ("auto", "wandb", "none"):
            raise ValueError(f"expected tracker kind auto, wandb or none, found {kind!r}")
        self.run_dir = Path(run_dir)
        self.active = rank == 0
        self.wandb_run = None
        self._summary = {}
        self._finished = False
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / "metrics.jsonl"
        _drop_partial_last_line(metrics_path)
        # Appending keeps the history of a resumed run; line buffering flushes every record.
        self._metrics_file = open(metrics_path, "a", buffering=1, encoding="utf-8")
        self._t0 = time.time()
        if kind != "none":
            self.wandb_run = self._start_wandb(args, kind, project, run_name, group)

    def _start_wandb(self, args, kind, project, run_name, group):
        try:
            import wandb
            return wandb.init(
                project=project, name=run_name, group=group, config=dict(args),
                dir=str(self.run_dir), mode=wandb_mode(),
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:
            if kind == "wandb":
                raise RuntimeError(f"wandb could not start ({type(e).__name__}: {e}); "
                                   "use kind='none' to track locally only") from e
            warnings.warn(f"wandb unavailable ({type(e).__name__}: {e}); "
                          f"logging to {self.run_dir / 'metrics.jsonl'} only")
            return None

    def log(self, metrics: dict, step: int):
        """One line of metrics.jsonl: {"step", "time" (s since start), **metrics}."""
        if not self.active:
            return
        record = {"step": int(step), "time": round(time.time() - self._t0, 3), **metrics}
        self._metrics_file.write(json.dumps(record, default=_to_json) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=int(step))

    def summary(self, values: dict):
        """Update the final-numbers record written to summary.json by finish()."""
        if not self.active:
            return
        self._summary.update(values)
        if self.wandb_run is not None:
            self.wandb_run.summary.update(dict(values))

    def truncate_after(self, step: int):
        """Drop records past `step`: a run resumed from an earlier checkpoint
        logs those iterations again, and must not log them twice."""
        if not self.active:
            return
        path = self.run_dir / "metrics.jsonl"
        self._metrics_file.close()
        kept = [json.dumps(r) for r in read_metrics(self.run_dir) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self._metrics_file = open(path, "a", buffering=1, encoding="utf-8")

    def finish(self, summary=None, exit_code=0):
        """Write summary.json (atomically), close metrics.jsonl and the wandb run
        (marked failed for a non-zero exit_code)."""
        if not self.active or self._finished:
            return
        if summary:
            self.summary(summary)
        atomic_write_text(self.run_dir / "summary.json",
                          json.dumps(self._summary, indent=1, default=_to_json) + "\n")
        self.close(exit_code)

    def close(self, exit_code=0):
        """Close without a summary.json: an interrupted run is not a finished one."""
        if not self.active or self._finished:
            return
        self._finished = True
        self._metrics_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)


def summary_complete(summary: dict) -> bool:
    """False for a summary.json the training loop marked incomplete (a feature
    the run asked for never engaged): comparisons must not count it.
    Summaries written before the mark existed count as complete."""
    return summary.get("complete", True) is not False


def read_metrics(run_dir) -> list[dict]:
    """The records of <run_dir>/metrics.jsonl; a truncated last line (crash) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not valid JSON ({e})") from e
    return records

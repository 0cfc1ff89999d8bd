#!/usr/bin/env python3
"""Compare ablation runs: a markdown table and a val-loss plot (gpt2/compare_cli.py).

    python scripts/compare_runs.py RUN_DIR... [--out DIR]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.compare_cli import main  # noqa: E402
from gpt2.entry import run  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run(main))

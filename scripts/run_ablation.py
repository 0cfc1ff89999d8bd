#!/usr/bin/env python3
"""Run the ablation steps a .config lists, what `make train` does (gpt2/ablation_runner.py).

    python scripts/run_ablation.py --config .config [--force] [--steps V0,V20] [--seeds 1,2] [extra train flags...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.ablation_runner import main  # noqa: E402
from gpt2.entry import run  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run(main))

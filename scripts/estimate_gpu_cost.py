#!/usr/bin/env python3
"""What the GPU defconfigs cost, on paper; needs no GPU (gpt2/bench/gpu_cost_cli.py).

    python scripts/estimate_gpu_cost.py [--mfu 0.40]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.bench.gpu_cost_cli import main  # noqa: E402
from gpt2.entry import run  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run(main))

#!/usr/bin/env python3
"""Held-out reconstruction MSE: PCA vs Spline->PCA (gpt2/bench/kvsplice_validate.py).

    python scripts/kvsplice_validate.py --source synthetic
    python scripts/kvsplice_validate.py --source warped --k 8 16
    python scripts/kvsplice_validate.py --source runs/x/v_samples.pt
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.bench.kvsplice_validate import main  # noqa: E402
from gpt2.entry import run  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run(main))

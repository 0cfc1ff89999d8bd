#!/usr/bin/env python3
"""How much of each V-cache method's cost fine-tuning through it recovers (gpt2/bench/recovery_cli.py).

    python scripts/recovery.py --matrix runs/cpu-smollm2
    python scripts/recovery.py --matrix runs/cpu-smollm2 runs/cpu-smollm2-seed2 --out runs/recovery-seeds.md
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.bench.recovery_cli import main  # noqa: E402
from gpt2.entry import run  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run(main))

#!/usr/bin/env python3
"""The V-cache frontier on SmolLM2, post hoc: every codec family at 2-4 bits per dimension (gpt2/bench/frontier.py).

    python scripts/frontier.py                    # contexts 512 and 2048; runs/frontier/, docs/kv_frontier_smollm2.png
    python scripts/frontier.py --contexts 512 --eval-tokens 8192
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.bench.frontier import main  # noqa: E402
from gpt2.entry import run  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run(main))

#!/usr/bin/env python3
"""Where an eager decode step's time goes, V0 against V20 and V22 at the quick-start shape (gpt2/bench/decode_profile.py).

    python scripts/profile_decode.py [--batches 1,16] [--prompt 896] [--new 96] [--steps 16] [--top 12]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.bench.decode_profile import main  # noqa: E402
from gpt2.entry import run  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run(main))

#!/usr/bin/env python3
"""Write Kconfig from train_ra_mla.py's flags (run by `make kconfig`; gpt2/kconfig_gen.py).

    python scripts/gen_kconfig.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.entry import run  # noqa: E402
from gpt2.kconfig_gen import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run(main))

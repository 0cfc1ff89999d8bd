#!/usr/bin/env python3
"""KVSplice fit time and compress/decompress throughput beside plain PCA (gpt2/bench/kvsplice_bench.py).

    python scripts/bench_kvsplice.py [--samples 120000] [--vectors 1000000] [--repeats 3]   (or: make bench-kvsplice)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.bench.kvsplice_bench import main  # noqa: E402
from gpt2.entry import run  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run(main))

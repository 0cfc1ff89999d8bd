#!/usr/bin/env python3
"""Training throughput of the CPU quick-start model, what `make bench-train` prints (gpt2/bench/train_bench.py).

    python scripts/bench_train.py [--iters 8] [--steps V0,V19] [--vocab 19083] [--no-compile] [--threads N]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.bench.train_bench import main  # noqa: E402
from gpt2.entry import run  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run(main))

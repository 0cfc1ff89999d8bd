#!/usr/bin/env python3
"""A CUDA machine's first run: V0, V19 and V20 at GPT-2 124M shapes, checked (gpt2/bench/gpu_check.py).

    bash scripts/gpu_check.sh                  # this script with its defaults, on cuda
    python scripts/gpu_check.py --device cpu --n-layer 2 --n-head 2 --n-embd 64 --block-size 64 \\
        --vocab 96 --batch-size 2 --kv-prune-k-min 16 --kv-prune-recency 8 --no-compile   # the tests

Exit status 0 when every check passed; 1 with a FAIL line per failed check;
2 when the device cannot run the check at all (no CUDA, no bf16) or a flag is bad.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.bench.gpu_check import main  # noqa: E402
from gpt2.entry import run  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run(main))

#!/usr/bin/env python3
"""Post-hoc V-cache methods on a trained checkpoint: quality, memory, speed (gpt2/bench/kv_bench.py).

    python scripts/bench_kv.py --ckpt runs/cpu-quickstart/V0/best.pt
    python scripts/bench_kv.py --ckpt smollm2      # the pretrained SmolLM2-135M on held-out plays
    python scripts/bench_kv.py --decode-only --config defconfigs/gpt2-124m-finewebedu --device cuda \\
        --decode-batches 1,16,64 --decode-contexts 1024     # the decode-speed table alone, on a GPU
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.bench.kv_bench import main  # noqa: E402
from gpt2.entry import run  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run(main))

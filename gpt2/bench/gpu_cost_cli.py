"""What the GPU defconfigs cost, on paper; needs no GPU (docs/ra.md, "On a GPU").

    python scripts/estimate_gpu_cost.py [--mfu 0.40]

Prints FLOPs per token of each ablation step, the memory of the pruned
attention and of a whole training micro-step at the GPT-2 124M defconfig's
shapes (measured on fake tensors of full size, so no compute), the HBM
traffic pruning adds, and the hours each GPU defconfig takes at the stated
MFU (gpt2/bench/gpu_cost.py).
"""

import argparse

from gpt2.bench.gpu_cost import estimate
from gpt2.entry import ArgumentParser


def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mfu", type=float, default=0.40, help="the model FLOPs utilization assumed")
    a = ap.parse_args(argv)
    if not 0 < a.mfu <= 1:
        ap.error(f"--mfu must be in (0, 1], found {a.mfu}")
    estimate(a.mfu)
    return 0

#!/usr/bin/env python3
"""How much of each V-cache method's cost fine-tuning through it recovers
(gpt2/bench/recovery.py), for a matrix fine-tuned from a pretrained model:

    python scripts/recovery.py --matrix runs/cpu-smollm2
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2.atomic import atomic_write_text  # noqa: E402
from gpt2.bench.recovery import measure, report  # noqa: E402
from gpt2.cpu import configure_cpu  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", required=True, help="the matrix's OUT_DIR: OUT_DIR/V0, OUT_DIR/<step>, ...")
    ap.add_argument("--batches", type=int, default=16, help="held-out val batches, the same for every model")
    ap.add_argument("--out", default=None, help="where the table goes (default: MATRIX/recovery.md)")
    a = ap.parse_args(argv)
    if a.batches < 2:
        ap.error(f"--batches must be >= 2 (a standard error needs two), got {a.batches}")
    if not Path(a.matrix).is_dir():
        ap.error(f"--matrix {a.matrix}: no such directory")
    configure_cpu()
    t0 = time.time()
    try:
        result = measure(a.matrix, a.batches)
    except (OSError, ValueError) as e:
        print(f"recovery.py: error: {e}", file=sys.stderr)
        return 2
    command = "python scripts/recovery.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = report(result, command)
    out = Path(a.out) if a.out else Path(a.matrix) / "recovery.md"
    atomic_write_text(out, text)
    print(text + f"\nwrote {out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

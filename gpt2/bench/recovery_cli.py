"""How much of each V-cache method's cost fine-tuning through it recovers
(gpt2/bench/recovery.py), for a matrix fine-tuned from a pretrained model:

    python scripts/recovery.py --matrix runs/cpu-smollm2

Several matrices of the same setup (one per seed), or one that ran --seeds,
give each seed's rows and the mean +- sd over seeds:

    python scripts/recovery.py --matrix runs/cpu-smollm2 runs/cpu-smollm2-seed2 --out runs/recovery-seeds.md
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

from gpt2.atomic import atomic_write_text
from gpt2.bench.recovery import matrix_dirs, measure, report
from gpt2.cpu import configure_cpu
from gpt2.entry import ArgumentParser, error_message


def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", required=True, nargs="+",
                    help="the matrix's OUT_DIR (OUT_DIR/V0, OUT_DIR/<step>, ...; OUT_DIR/seed<N>/<step> after "
                         "--seeds), or several, one per seed")
    ap.add_argument("--batches", type=int, default=16, help="held-out val batches, the same for every model")
    ap.add_argument("--out", default=None, help="where the table goes (default: MATRIX/recovery.md for one --matrix)")
    a = ap.parse_args(argv)
    problems = [f"--batches must be >= 2 (a standard error needs two), got {a.batches}"] if a.batches < 2 else []
    problems += [f"--matrix {m}: no such directory" for m in a.matrix if not Path(m).is_dir()]
    if len(a.matrix) > 1 and a.out is None:
        problems.append("several --matrix directories need --out: no one of them holds the combined table")
    if problems:
        ap.error("; ".join(problems))
    configure_cpu()
    t0 = time.time()
    try:
        result = measure(matrix_dirs(a.matrix), a.batches)
    except (OSError, ValueError) as e:
        print(f"recovery.py: error: {error_message(e)}", file=sys.stderr)
        return 2
    command = "python scripts/recovery.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = report(result, command)
    out = Path(a.out) if a.out else Path(a.matrix[0]) / "recovery.md"
    atomic_write_text(out, text)
    print(text + f"\nwrote {out} in {time.time() - t0:.0f} s")
    return 0

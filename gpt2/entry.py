"""What every entry point shares (train_ra_mla.py, scripts/*.py): bad input
is one line on stderr and exit status 2, never a traceback.

    ArgumentParser   argparse's parser, its usage errors one line:
                     `prog: error: MESSAGE`, exit status 2
    run(main)        calls main(); a bad input it raises (a missing file, a
                     value that cannot be used: FileNotFoundError, ValueError)
                     becomes `prog: error: MESSAGE`, exit status 2

A command checks what it can before it writes anything, so that the one
line is all that happens.
"""

import argparse
import sys
from pathlib import Path

BAD_INPUT = (FileNotFoundError, NotADirectoryError, ValueError)


def prog():
    """The entry point's name as the user ran it: `bench_kv.py`."""
    return Path(sys.argv[0]).name


def one_line(text):
    """A message on one line: its first line, the others after it joined by '; '."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ".join(lines[:1] + ["; ".join(lines[1:])] if lines[1:] else lines)


def error_message(e):
    """What went wrong, in one line: a file error names its file."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return one_line(e.args[0] if isinstance(e, KeyError) and e.args else e)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line (no usage block): `prog: error: MESSAGE`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def run(main, bad_input=BAD_INPUT):
    """main()'s exit status (0 for a main that returns no int); a bad input it
    raises is one line on stderr and exit status 2."""
    try:
        status = main()
    except bad_input as e:
        print(f"{prog()}: error: {error_message(e)}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0

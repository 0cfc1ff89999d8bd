"""Process-wide CPU settings, applied by every entry point that computes on
the CPU (training, the pace probe, benchmarks, gpu_check's CPU mode, tests).

- Denormal floats are flushed to zero: a backward pass that produces them
  runs an order of magnitude slower on x86 CPUs (microcode assists).
- glibc's malloc is told to keep freed blocks for reuse. By default it serves every
  block above its mmap threshold (128 KiB, adapting up to 32 MiB) with a
  fresh mmap and unmaps it on free, and trims the heap's top whenever
  128 KiB are free there; every such block is faulted back in page by page
  when it is used again. A prefill's (B, nh, T, T) attention scores are tens
  to hundreds of MB per layer, so a prefill paid for millions of page
  faults (docs/kvsplice.md, "Freed memory on the CPU", measures it). Freed
  memory stays with the process instead of going back to the system: its
  resident size is about the peak of what it used, not what it holds now.

KVSPLICE_MALLOC=system leaves malloc as it is (KVSPLICE_MALLOC=keep, the
default, keeps freed memory); glibc's own MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ variables, when set, also win.
"""

import ctypes
import os

import torch

# blocks below this come from the heap and are reused: above a prefill's
# scores at batch 16, context 1024 (268 MB per layer); a glibc that refuses
# it (mallopt returns 0) is left as it was
MMAP_THRESHOLD = 1 << 30
# free memory at the heap's top is given back only beyond this (mallopt takes an int)
TRIM_THRESHOLD = (1 << 31) - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
MALLOC_CHOICES = ("keep", "system")


def malloc_problems():
    """[] or the one problem with KVSPLICE_MALLOC (gpt2/validation.py lists it with the flags')."""
    choice = os.environ.get("KVSPLICE_MALLOC", "keep")
    if choice in MALLOC_CHOICES:
        return []
    return [f"KVSPLICE_MALLOC={choice!r}: expected one of {', '.join(MALLOC_CHOICES)} (keep, the default, "
            f"keeps freed memory for reuse; system leaves malloc as it is)"]


def keep_freed_memory():
    """Raise glibc's mmap and trim thresholds for this process. True when
    they were raised; False under another C library, with
    KVSPLICE_MALLOC=system, or when glibc's MALLOC_*_THRESHOLD_ are set."""
    problems = malloc_problems()
    if problems:
        raise ValueError(problems[0])
    if os.environ.get("KVSPLICE_MALLOC") == "system" or any(name in os.environ for name in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):  # not glibc (macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # the mmap threshold first: a trim threshold alone would switch off
    # glibc's adaptive mmap threshold and send every large block to mmap
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return False
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def configure_cpu():
    """Flush denormals and keep freed memory (above); returns keep_freed_memory()'s result."""
    torch.set_flush_denormal(True)
    return keep_freed_memory()

"""Write a file so that a crash leaves the old version or the new one, never half of either.

The data goes to a temp file beside the target (same filesystem), is flushed
to disk, and is renamed over the target.
"""

import os
from pathlib import Path


def atomic_write(path, write):
    """Call write(f) on a binary temp file next to path, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj, path):
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))

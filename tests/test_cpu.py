"""gpt2/cpu.py: the process-wide CPU settings every entry point applies."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
MB = 48  # above glibc's largest adaptive mmap threshold (32 MiB): by default always a fresh mmap

# in a fresh process: page faults per malloc / write / free of a 48 MB block, after a first one
PROBE = textwrap.dedent(f"""
    import ctypes, resource, sys
    sys.path.insert(0, {str(ROOT)!r})
    from gpt2.cpu import configure_cpu
    applied = configure_cpu() if sys.argv[1] == "configure" else None
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    def block():
        p = libc.malloc({MB} << 20)
        libc.memset(p, 1, {MB} << 20)
        libc.free(p)
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block()
    f0 = faults()
    for _ in range(5):
        block()
    print(applied, (faults() - f0) // 5)
""")


def probe(mode, **env):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "KVSPLICE_MALLOC"}, **env}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    applied, faults = out.stdout.split()
    return applied, int(faults)


PAGES = (MB << 20) // os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not GLIBC, reason="the malloc thresholds are glibc's")
def test_a_configured_process_reuses_a_freed_block_instead_of_faulting_it_back_in():
    applied, configured = probe("configure")
    _, default = probe("default")
    assert applied == "True"
    assert default > PAGES // 2, f"glibc's default should map every {MB} MB block afresh, saw {default} faults"
    assert configured < PAGES // 20, f"a configured process faulted {configured} of {PAGES} pages per block"


@pytest.mark.skipif(not GLIBC, reason="the malloc thresholds are glibc's")
@pytest.mark.parametrize("env", [{"KVSPLICE_MALLOC": "system"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}])
def test_malloc_is_left_alone_when_the_user_says_so(env):
    applied, faults = probe("configure", **env)
    assert applied == "False"
    assert faults > PAGES // 2


def test_an_unknown_kvsplice_malloc_value_is_refused(monkeypatch):
    from gpt2.cpu import keep_freed_memory

    monkeypatch.setenv("KVSPLICE_MALLOC", "sytem")
    with pytest.raises(ValueError, match="KVSPLICE_MALLOC='sytem'.*keep, system"):
        keep_freed_memory()


def test_configure_cpu_flushes_denormals():
    import torch

    from gpt2.cpu import configure_cpu

    configure_cpu()
    assert torch.tensor(1e-39, dtype=torch.float32).item() == 0.0

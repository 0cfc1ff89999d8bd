#!/usr/bin/env bash
# The first thing to run on a CUDA machine (it aims at 5 minutes):
# V0, V19 and V20 at GPT-2 124M shapes (12 layers, 12 heads, 768 dims, block
# 1024, vocab 50257, batch 12, random tokens) in bf16 autocast with
# torch.compile and fused AdamW. Per step it prints ms/iter, tokens/s, MFU
# (against the GPU's dense bf16 datasheet peak, looked up by its name;
# --peak-flops to set it), peak memory, compile time, cached decode against the full forward,
# and the V-cache bytes. Exits non-zero with a FAIL line per problem: no CUDA,
# a non-finite loss, a graph break, decode != forward, V bytes not what the
# method implies.
#
#     bash scripts/gpu_check.sh [flags of scripts/gpu_check.py, e.g. --steps V0,V20 --iters 50]
#
# Then make bench's decode-speed table on the same GPU (V20 against the plain
# cache through model.generate, GPT-2 124M shapes, context 1024):
#
#     .venv/bin/python scripts/bench_kv.py --decode-only --config defconfigs/gpt2-124m-finewebedu \
#         --device cuda --decode-batches 1,16,64 --decode-contexts 1024 --out-md runs/decode-gpu.md
#
# Sets up .venv with `make venv` first unless PYTHON names an interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    make --no-print-directory venv >/dev/null
    PYTHON=.venv/bin/python
fi
exec "$PYTHON" scripts/gpu_check.py "$@"

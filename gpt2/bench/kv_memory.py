"""KV-cache memory per V-cache method on SmolLM2: what a user saves.

    python scripts/bench_kv.py --memory        # the section "KV memory" of docs/benchmarks.md

For each method, the cache's bytes at contexts 2k, 8k and 32k at batch 1 in
bf16 (as a GPU holds them), keys, V and the selection's index apart, and the
longest context whose cache fits 1 GiB. They come from the bytes a real
cache holds, not from a formula alone: each method generates through its
real cache from a prompt of about 2k held-out tokens, in fp32 on the CPU,
and the keys and V the cache's tensors hold (KVCache.nbytes) must equal the
count below for that many tokens in fp32, or the run stops. The count, at
any context T and dtype:
    keys   n_layer x n_kv_head x head_dim x T x itemsize
    V      n_layer x n_kv_head x method.v_bytes(T, dtype) (the selector's held
           tokens through the codec: exact tokens at dtype, the rest coded)
    index  per held token of a selection (pruning, random keep) its position
           and score, measured per held token in the 2k generation
A context T is a model run at block_size T: pruning keeps its ratio of T.
The methods' fits are PCA-only from a few batches (bytes do not depend on
the fit: a codec's width is fixed by its settings).
"""

import time
from dataclasses import dataclass

import torch

from gpt2.bench.kv_measure import v_heads
from gpt2.bench.kv_methods import step_record
from gpt2.calibrate import calibration_batches, fit_codecs, quiet
from lib.vcache import FULL, build_method, describe

CONTEXTS = (2048, 8192, 32768)
BUDGET_BYTES = 2 ** 30  # 1 GiB of KV at batch 1
PROMPT = 2000           # the confirming generation: prompt tokens, then NEW_TOKENS drawn
NEW_TOKENS = 16
ROWS_DTYPE = torch.bfloat16

# (name, record or ablation step); frontier rows take the frontier's settings at context 2048
FRONTIER_BEST = {"select": {"kind": "sinks", "sinks": 4, "window": 64},
                 "codec": {"kind": "transform", "bits": 1.75, "basis": "pca", "allocate": "variance"}}
METHODS = (
    ("full (V0)", FULL),
    ("int8 g32", {"select": FULL["select"], "codec": {"kind": "int8", "group_size": 32}}),
    ("int4 g32", {"select": FULL["select"], "codec": {"kind": "int4", "group_size": 32}}),
    ("V19 prune", "V19"),
    ("V20 prune + SplinePCA k=16", "V20"),
    ("V22 prune + int4", "V22"),
    ("V23 int2 g32", "V23"),
    ("V24 sinks 4 + window 8, kvtc 1.5 bits", "V24"),
    ("kvtc + sinks 4 + window 64, 1.75 bits (frontier's best at 2.5 bits/dim, context 2048)", FRONTIER_BEST),
)


@dataclass
class Row:
    name: str
    record: dict
    per_token: dict     # bf16 bytes per token at each context: {T: {"k", "v", "index", "total"}}
    measured: dict      # the 2k generation's cache.nbytes() (fp32), and its tokens
    longest: int        # the longest context whose cache fits BUDGET_BYTES


def records(prune):
    """[(name, record)] of METHODS, ablation steps built by their flags with `prune`'s settings."""
    return [(name, step_record(r, prune) if isinstance(r, str) else r) for name, r in METHODS]


def count(cfg, record, codec, T, dtype, index_per_held, block_size=None):
    """{"k", "v", "index", "total"} bytes of the method's cache after T tokens at batch 1, its
    selector built at block_size (default T), its V through `codec` (a fitted one's width)."""
    heads = cfg.n_layer * v_heads(cfg)
    selector = build_method(record, block_size or T, cfg.head_dim).selector
    out = {"k": heads * cfg.head_dim * T * dtype.itemsize, "v": heads * selector.v_bytes(T, codec, dtype),
           "index": round(heads * selector.held_tokens(T) * index_per_held)}
    out["total"] = out["k"] + out["v"] + out["index"]
    return out


def longest_context(cfg, record, codec, index_per_held, budget=BUDGET_BYTES):
    """The largest T whose bf16 count fits `budget`; bytes grow with T, so a binary search."""
    fits = lambda T: count(cfg, record, codec, T, ROWS_DTYPE, index_per_held)["total"] <= budget  # noqa: E731
    lo, hi = 1, 1 << 24
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def measure(model, data, record, seed, log):
    """The 2k generation through the method's real cache: (cache.nbytes(), tokens held, index
    bytes per held token, layer 0's fitted codec), after checking keys and V against the count."""
    model.set_v_cache(record)
    if model.needs_fit():
        with quiet():
            fit_codecs(model, calibration_batches(data, 2, 1, min(256, model.config.block_size), seed), seed=seed,
                       epochs=0)
    cfg, codec = model.config, model.v_codecs()[0]
    x = data.get_batch("val", 1, PROMPT, seed, 0, 0)[0]
    cache = model.make_cache()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model.generate(x, NEW_TOKENS, top_k=50, cache=cache)
    held, T = cache.nbytes(), cache.length
    per_held = held["index"] / count(cfg, record, codec, T, torch.float32, 1, block_size=cfg.block_size)["index"]
    expected = count(cfg, record, codec, T, torch.float32, per_held, block_size=cfg.block_size)
    if (held["k"], held["v"]) != (expected["k"], expected["v"]):
        raise RuntimeError(f"{describe(record)}: the real cache holds {held} after {T} tokens; the count says "
                           f"{expected}")
    log(f"[memory] {describe(record)}: {T:,} tokens, the cache holds {held['total'] / 2 ** 20:.2f} MB (fp32), "
        f"as counted ({time.perf_counter() - t0:.1f} s)")
    return held, T, per_held, codec


def memory_rows(model, data, prune, seed=1337, log=print):
    """[Row] per method: the bf16 count at CONTEXTS and the longest context in 1 GiB, each
    method's count first confirmed by a real generation at about 2k tokens."""
    rows = []
    for name, record in records(prune):
        held, T, per_held, codec = measure(model, data, record, seed, log)
        cfg = model.config
        per_token = {c: count(cfg, record, codec, c, ROWS_DTYPE, per_held) for c in CONTEXTS}
        rows.append(Row(name, record, per_token, {**held, "tokens": T},
                        longest_context(cfg, record, codec, per_held)))
    model.set_v_cache(FULL)
    return rows


def format_memory(rows, model_name, cfg):
    mb = lambda n: f"{n / 2 ** 20:,.1f}"  # noqa: E731
    head = " | ".join(f"MB at {c // 1024}k (keys / V / index)" for c in CONTEXTS)
    lines = [f"| method | {head} | longest context in 1 GiB | 2k generation (fp32): tokens, MB held = counted |",
             "|---|" + "---:|" * len(CONTEXTS) + "---:|---:|"]
    for r in rows:
        cells = " | ".join(f"**{mb(r.per_token[c]['total'])}** ({mb(r.per_token[c]['k'])} / {mb(r.per_token[c]['v'])}"
                           f" / {mb(r.per_token[c]['index'])})" for c in CONTEXTS)
        lines.append(f"| {r.name} | {cells} | {r.longest:,} | {r.measured['tokens']:,}, "
                     f"{mb(r.measured['total'])} |")
    return (f"The KV cache of `{model_name}` ({cfg.n_layer} layers, {v_heads(cfg)} KV heads of {cfg.head_dim}) at batch 1, "
            f"keys and V in bf16 as a GPU holds them: keys are kept in full by every method, so they bound "
            f"what any V method saves. Each method first generated {NEW_TOKENS} tokens after a prompt of "
            f"{PROMPT} held-out tokens through its real cache (fp32 on this CPU); the bytes its tensors held "
            f"equal the count (gpt2/bench/kv_memory.py) for that many tokens, keys and V exactly, and the "
            f"index bytes per held token come from it. A context is a model run at that block size, so "
            f"pruning keeps its ratio of it; the frontier row keeps its 64-token window at every context. "
            f"32k is past the context SmolLM2 was trained for (8k): the count gives it for scale. A selection's "
            f"index (each held token's position, int64, and score, fp32, per KV head) is bytes the V count "
            f"leaves out.\n\n"
            + "\n".join(lines))

"""The ablation steps: ONE table, step id -> (description, flag overrides).

A step states every feature switch, so it means the same whatever .config
says; sizes, budgets and seeds come from the .config and the command line.
Adding a step is adding one row.
"""

import shlex

# Every step starts from all features off, then switches on its own.
_OFF = {"v_cache": "", "kv_prune": False, "kvsplice_enable": False, "rmlp": False}

STEPS = {
    "V0": ("baseline GPT-2 attention (reference)", {}),
    "V19": ("V0 + V-only pruning: V kept for 391 of 1024 tokens, keys in full "
            "(the pruning effect alone)",
            {"kv_prune": True}),
    "V20": ("V19 + KVSplice 64->16 dims per head: V cache 391 x 16 = 6,256 of 65,536 "
            "elements per head, 90% less (does geometric compression hurt quality?)",
            {"kv_prune": True, "kvsplice_enable": True, "kvsplice_k": 16}),
    "V21": ("R-MLP + V19 + KVSplice 64->16 (do R-MLP and the geometry synergise?)",
            {"kv_prune": True, "kvsplice_enable": True, "kvsplice_k": 16, "rmlp": True}),
    "V22": ("V19 + int4 V in groups of 32: 40 bytes per kept V vector against V20's 64-byte fp32 "
            "latent (does quantization beat the geometry at fewer bytes?)",
            {"v_cache": '{"select": {"kind": "prune"}, "codec": {"kind": "int4"}}'}),
    "V23": ("int2 V in groups of 32 on every token: 24 bytes per 64-dim V vector, no exact token "
            "(the 2-bit control: how much of plain int2's cost does training recover?)",
            {"v_cache": '{"select": {"kind": "full"}, "codec": {"kind": "int", "bits": 2, "group_size": 32}}'}),
    "V24": ("the frontier's best at <= 20 bytes: the first 4 tokens and each query's last 8 exact, the rest "
            "through the fitted PCA basis with 1.5 bits a coordinate allocated by variance and an fp16 scale "
            "(19.3 bytes per 64-dim V vector at context 256)",
            {"v_cache": '{"select": {"kind": "sinks", "sinks": 4, "window": 8}, "codec": {"kind": "transform", '
                        '"basis": "pca", "allocate": "variance", "bits": 1.5}}'}),
}


def step_overrides(step, known_dests=None):
    """The flag overrides (argparse dests) of one step; KeyError names the known steps."""
    if step not in STEPS:
        raise KeyError(f"unknown ablation step {step!r}; known steps: {', '.join(STEPS)}")
    overrides = {**_OFF, **STEPS[step][1]}
    if known_dests is not None:
        bad = [d for d in overrides if d not in known_dests]
        assert not bad, f"ablation step {step} overrides undeclared flags {bad}"
    return overrides


def format_steps(method_of=None):
    """The table as text; method_of(step) -> a description of the V-cache
    method the step trains (train_ra_mla.py derives it from the flags)."""
    lines = [f"{'step':<6} description", f"{'-' * 6} {'-' * 60}"]
    for step, (desc, _) in STEPS.items():
        overrides = {k: v for k, v in step_overrides(step).items() if v}
        flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {shlex.quote(str(v))}")
                         for k, v in overrides.items())
        lines.append(f"{step:<6} {desc}\n{'':<6}   flags: {flags or '(none)'}")
        if method_of is not None:
            lines.append(f"{'':<6}   V cache: {method_of(step)}")
    return "\n".join(lines)

"""The methods scripts/bench_kv.py compares: lib.vcache records, with their
settings read from the checkpoint, and the KVSplice geometries fitted for them.

    none                   the reference: fp32 V for every token
    PCA k / SplinePCA k    geometries fitted on V collected from the TRAINING
                           split (never the evaluated tokens), on the model
                           with its own V-cache method removed
    prune                  V-only pruning with the checkpoint's keep ratio,
                           k_min and recency (lib/kv_pruning.py)
    prune + SplinePCA k    the V20 configuration, applied post hoc
    int8 / int4 V          KIVI-style per-token quantization, groups of 32
    H2O K+V                heavy-hitter eviction of K and V, token budget chosen
                           so its V cache holds as many values as V20's
"""

import contextlib
import io
import statistics
import time
from dataclasses import dataclass, field

from lib.vcache import FULL
from lib.kv_pruning import KEEP_RATIO, keep_budget

V20_K = 16  # the V20 configuration's latent dims per head
QUANT_GROUP = 32


@dataclass
class BenchMethod:
    name: str
    record: dict
    geometry: dict = None      # the KVSplice geometry dict, for pca / splinepca codecs
    calib_s: float = 0.0       # V collection + fit (geometry methods)
    v_mse_ratio: float = None  # held-out V MSE, SplinePCA / PCA (mean over layers)
    layers: list = field(default_factory=list)  # one VCacheMethod per layer, once built

    @property
    def family(self):
        """'none', 'pca', 'prune+splinepca', 'h2o', ...: select kind, then codec kind."""
        select, codec = self.record["select"]["kind"], self.record["codec"]["kind"]
        if select == "full":
            return codec
        return select if codec == "none" else f"{select}+{codec}"

    @property
    def k(self):
        return self.record["codec"].get("k")

    def build(self, model):
        """The per-layer methods, built in the model once (install puts them back)."""
        model.set_v_cache(self.record, self.geometry)
        self.layers = [b.attn.vcache for b in model.transformer.h]
        return self


def prune_settings(ckpt):
    """Keep ratio, k_min and recency of the checkpoint's run (its flags or its own method)."""
    args = ckpt.get("args") or {}
    select = ckpt["model_config"].get("v_cache", FULL)["select"]
    if select["kind"] == "prune":
        return {n: select[n] for n in ("keep_ratio", "k_min", "recency")}
    return {"keep_ratio": float(args.get("kv_prune_keep_ratio", KEEP_RATIO)),
            "k_min": int(args.get("kv_prune_k_min", 64)), "recency": int(args.get("kv_prune_recency", 64))}


def check_preconditions(ks, head_dim, block_size, prune, calib_vectors, knots):
    """Every method's needs, before the first row runs: one message listing all problems.
    calib_vectors: the V vectors per layer the geometries will be fitted on."""
    problems = []
    bad = [k for k in ks if not 1 <= k <= head_dim]
    if bad:
        problems.append(f"--ks: every k must be in [1, head_dim = {head_dim}], found {bad}")
    if V20_K > head_dim:
        problems.append(f"the V20 row needs k = {V20_K} <= head_dim, but head_dim is {head_dim}")
    if head_dim % QUANT_GROUP:
        problems.append(f"the int8/int4 rows quantize groups of {QUANT_GROUP} channels: head_dim {head_dim} "
                        f"is not a multiple")
    need = max(ks + [V20_K]) + 1
    if calib_vectors < need:
        problems.append(f"the PCA / SplinePCA fits need at least k + 1 = {need} V vectors per layer, but "
                        f"{calib_vectors} are collected (--calib-batches x --batch-size x block_size x n_head, "
                        f"at most the checkpoint's --kvsplice-samples)")
    if knots < 1:
        problems.append(f"the SplinePCA rows need at least 1 knot; the checkpoint's --kvsplice-knots is {knots}")
    budget = keep_budget(prune["keep_ratio"], block_size, prune["k_min"])
    if budget < prune["recency"]:
        problems.append(f"pruning budget {budget} is smaller than its recency window {prune['recency']}")
    if problems:
        raise ValueError("; ".join(problems))


def fit_geometry(cal, k, spline, knots, epochs, lr, seed):
    """Fit one geometry per layer from the calibrator's samples; (geometry, seconds, mse ratio, layer stats).

    PCA is `fit(..., epochs=0)`: SplinePCA.fit places the knots and resets the
    spline to the identity, runs no Adam epoch, and with the identity's
    held-out MSE equal to PCA's it keeps the identity (it keeps a learned
    spline only if it beats PCA by MIN_RELATIVE_GAIN), then fits the PCA on
    spline(X) = X. So the result is exactly plain PCA.
    """
    cal.k = k  # every (method, k) is fitted from the same collected samples
    with contextlib.redirect_stdout(io.StringIO()):  # one progress line per fit, not per layer
        geometry = cal.fit(knots=knots, epochs=epochs if spline else 0, lr=lr, seed=seed)
    layers = geometry["fit_stats"]["layers"]
    # a learned spline that did not beat PCA was replaced by the identity: ratio 1 there
    ratio = statistics.mean(s["spline_val_mse"] / max(s["pca_val_mse"], 1e-30) if s["kept_spline"] else 1.0
                            for s in layers)
    return geometry, geometry["fit_stats"]["seconds"], ratio, layers


def fitted_codecs(cal, ks, knots, epochs, lr, seed, log):
    """{(label, k): (codec record, geometry, calib seconds, mse ratio)} for PCA and SplinePCA at
    every k of ks and at V20_K, all fitted from the same collected samples."""
    out = {}
    for spline in (False, True):
        kind, label = ("splinepca", "SplinePCA") if spline else ("pca", "PCA")
        for k in sorted(set(ks) | {V20_K}):
            geometry, fit_s, ratio, layers = fit_geometry(cal, k, spline, knots, epochs, lr, seed)
            kept = sum(s["kept_spline"] for s in layers)
            log(f"[bench] fit {label} k={k}: {fit_s:.1f}s, held-out V MSE SplinePCA/PCA {ratio:.3f}"
                + (f", learned spline kept in {kept}/{len(layers)} layers" if spline else ""))
            out[label, k] = ({"kind": kind, "k": k, "knots": knots}, geometry, fit_s, ratio if spline else None)
    return out


def bench_methods(model, cal, collect_s, ks, prune, knots, epochs, lr, seed, log):
    """The benchmark's rows as BenchMethods, geometries fitted from cal's samples.

    Codecs alone; every token selector (pruning, and its random-keep control
    at the same budget) with every codec; a sliding window holding the same V
    bytes as each of those; a short window for the context-use line; H2O at
    V20's bytes.
    """
    fits = fitted_codecs(cal, ks, knots, epochs, lr, seed, log)
    full_select, none = FULL["select"], FULL["codec"]

    def method(name, select, fit=None, codec=None):
        if fit is None:
            return BenchMethod(name, {"select": select, "codec": codec or none})
        record, geometry, fit_s, ratio = fits[fit]
        return BenchMethod(name, {"select": select, "codec": record}, geometry, collect_s + fit_s, ratio)

    quant = {f"int{b}": {"kind": f"int{b}", "group_size": QUANT_GROUP} for b in (8, 4)}
    methods = [method("none", full_select)]
    methods += [method(f"{label} k={k}", full_select, (label, k)) for label in ("PCA", "SplinePCA") for k in ks]
    methods += [method(f"{q} V (g{QUANT_GROUP})", full_select, codec=c) for q, c in quant.items()]
    bs, hd = model.config.block_size, model.config.head_dim
    budget = keep_budget(prune["keep_ratio"], bs, prune["k_min"])
    for kind in ("prune", "random"):
        select = {"kind": kind, **prune, **({"seed": seed} if kind == "random" else {})}
        label = f"{kind} {budget}/{bs}"
        methods.append(method(label, select))
        methods += [method(f"{label} + {name} k={V20_K}", select, (name, V20_K)) for name in ("PCA", "SplinePCA")]
        methods += [method(f"{label} + {q}", select, codec=c) for q, c in quant.items()]
    # equal V budget: V20 holds budget x 16 latent values per head, H2O full head_dim V
    h2o_budget = max(1, budget * V20_K // hd)
    methods.append(method(f"H2O K+V ({h2o_budget} tok)",
                          {"kind": "h2o", "budget": h2o_budget, "recency": max(1, h2o_budget // 2)}))
    t0 = time.perf_counter()
    for m in methods:
        m.build(model)
    # sliding windows holding as many fp32 V bytes as each pruned row, and the short context-use window
    windows = {prune["recency"]} | {max(1, m.layers[0].v_bytes(bs, hd) // (hd * 4))
                                    for m in methods if m.record["select"]["kind"] == "prune"}
    methods += [method(f"window {w}", {"kind": "window", "window": w}).build(model) for w in sorted(windows)]
    log(f"[bench] {len(methods)} methods built in {time.perf_counter() - t0:.1f}s")
    return methods

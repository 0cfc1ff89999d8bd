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

from lib.kv_pruning import keep_budget
from lib.settings import BadSettings
from lib.vcache import FULL, SELECTORS, build_method, describe, settings_of

V20_K = 16  # the V20 configuration's latent dims per head
QUANT_GROUP = 32


@dataclass
class BenchMethod:
    name: str
    record: dict
    fitted: list = None        # one fitted codec state_dict per layer, for codecs with a fit step
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
        model.set_v_cache(self.record)
        for codec, state in zip(model.v_codecs(), self.fitted or []):
            codec.load_state_dict(state)
        self.layers = [a.vcache for a in model.attentions()]
        return self


def prune_settings(ckpt):
    """Keep ratio, k_min and recency of the checkpoint's run (its flags or its own method)."""
    args = ckpt.get("args") or {}
    select = ckpt["model_config"].get("v_cache", FULL)["select"]
    if select["kind"] == "prune":
        return {n: select[n] for n in ("keep_ratio", "k_min", "recency")}
    defaults = settings_of(SELECTORS["prune"])
    return {"keep_ratio": float(args.get("kv_prune_keep_ratio", defaults["keep_ratio"])),
            "k_min": int(args.get("kv_prune_k_min", defaults["k_min"])),
            "recency": int(args.get("kv_prune_recency", defaults["recency"]))}


def geometry_record(k, spline, knots):
    return {"kind": "splinepca" if spline else "pca", "k": k, "knots": knots}


def check_preconditions(ks, head_dim, block_size, prune, calib_vectors, knots):
    """Every method's needs, before the first row runs: one message listing all problems.
    Each method checks its own settings (build_method); calib_vectors: the V vectors
    per layer the geometries will be fitted on."""
    full = FULL["select"]
    records = [{"select": full, "codec": geometry_record(k, True, knots)} for k in sorted(set(ks) | {V20_K})]
    records += [{"select": full, "codec": {"kind": f"int{b}", "group_size": QUANT_GROUP}} for b in (8, 4)]
    records += [{"select": {"kind": "prune", **prune}, "codec": FULL["codec"]}]
    rows = {}  # each problem once, with the rows it stops
    for record in records:
        try:
            build_method(record, block_size, head_dim)
        except BadSettings as e:
            for p in e.problems:
                rows.setdefault(p, []).append(describe(record))
    problems = [f"{p} (rows: {', '.join(labels)})" for p, labels in rows.items()]
    need = max(ks + [V20_K]) + 1
    if calib_vectors < need:
        problems.append(f"the PCA / SplinePCA fits need at least k + 1 = {need} V vectors per layer, but "
                        f"{calib_vectors} are collected (--calib-batches x --batch-size x block_size x n_head, "
                        f"at most the checkpoint's --kvsplice-samples)")
    if problems:
        raise ValueError("; ".join(problems))


def fit_geometry(cal, k, spline, knots, epochs, lr, seed):
    """Fit every layer's pca / splinepca codec from the calibrator's samples:
    (per-layer codec states, seconds, mse ratio, layer stats). PCA is the same
    fit with no epoch, which keeps the identity spline: exactly plain PCA."""
    model = cal.model
    model.set_v_cache({"select": FULL["select"], "codec": geometry_record(k, spline, knots)})
    with contextlib.redirect_stdout(io.StringIO()):  # one progress line per fit, not per layer
        stats = cal.fit(epochs=epochs, lr=lr, seed=seed)
    states = [{n: t.clone() for n, t in codec.state_dict().items()} for codec in model.v_codecs()]
    layers = stats["layers"]
    # a learned spline that did not beat PCA was replaced by the identity: ratio 1 there
    ratio = statistics.mean(s["spline_val_mse"] / max(s["pca_val_mse"], 1e-30) if s["kept_spline"] else 1.0
                            for s in layers)
    return states, stats["seconds"], ratio, layers


def fitted_codecs(cal, ks, knots, epochs, lr, seed, log):
    """{(label, k): (codec record, fitted states, calib seconds, mse ratio)} for PCA and SplinePCA at
    every k of ks and at V20_K, all fitted from the same collected samples."""
    out = {}
    for spline in (False, True):
        label = "SplinePCA" if spline else "PCA"
        for k in sorted(set(ks) | {V20_K}):
            states, fit_s, ratio, layers = fit_geometry(cal, k, spline, knots, epochs, lr, seed)
            kept = sum(s["kept_spline"] for s in layers)
            log(f"[bench] fit {label} k={k}: {fit_s:.1f}s, held-out V MSE SplinePCA/PCA {ratio:.3f}"
                + (f", learned spline kept in {kept}/{len(layers)} layers" if spline else ""))
            out[label, k] = (geometry_record(k, spline, knots), states, fit_s, ratio if spline else None)
    return out


def bench_methods(model, cal, collect_s, ks, prune, knots, epochs, lr, seed, log, h2o=True):
    """The benchmark's rows as BenchMethods, geometries fitted from cal's samples.

    Codecs alone; every token selector (pruning, and its random-keep control
    at the same budget) with every codec; a sliding window holding the same V
    bytes as each of those; a short window for the context-use line; with
    h2o, H2O at V20's bytes.
    """
    fits = fitted_codecs(cal, ks, knots, epochs, lr, seed, log)
    full_select, none = FULL["select"], FULL["codec"]

    def method(name, select, fit=None, codec=None):
        if fit is None:
            return BenchMethod(name, {"select": select, "codec": codec or none})
        record, states, fit_s, ratio = fits[fit]
        return BenchMethod(name, {"select": select, "codec": record}, states, collect_s + fit_s, ratio)

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
    if h2o:
        methods.append(method(f"H2O K+V ({h2o_budget} tok)",
                              {"kind": "h2o", "budget": h2o_budget, "recency": max(1, h2o_budget // 2)}))
    t0 = time.perf_counter()
    for m in methods:
        m.build(model)
    # sliding windows holding as many fp32 V bytes as each pruned row, and the short context-use window
    windows = {prune["recency"]} | {max(1, m.layers[0].v_bytes(bs) // (hd * 4))
                                    for m in methods if m.record["select"]["kind"] == "prune"}
    methods += [method(f"window {w}", {"kind": "window", "window": w}).build(model) for w in sorted(windows)]
    log(f"[bench] {len(methods)} methods built in {time.perf_counter() - t0:.1f}s")
    return methods

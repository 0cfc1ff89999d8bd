"""The methods scripts/bench_kv.py compares: lib.vcache records built from the
registry, each class's own bench settings and the checkpoint's settings, and
the codecs fitted for them. A registered codec or selector is benchmarked
without an edit here; its class says how:

    codec.bench_sweep            {setting: values} swept for the codec alone
                                 (pca, splinepca: k, whose values --ks sets)
    codec.bench_with_selectors   its settings beside a token selector, and
                                 alone when it sweeps nothing; None: alone only
    selector.bench_role          "method": alone and with every codec, at the
                                 checkpoint's settings (prune); "control": at
                                 the method's budget when it takes the method's
                                 settings (random), else sized by its one
                                 setting to the V bytes of each method row
                                 (window); "equal_bytes": at V20's V bytes
                                 (H2O); None: no row

The rows, in order:
    none                   the reference: fp32 V for every token
    PCA k / SplinePCA k    geometries fitted on V collected from the TRAINING
                           split (never the evaluated tokens), on the model
                           with its own V-cache method removed; each codec
                           that sweeps a setting, by name
    int8 / int4 V (g32)    KIVI-style per-token quantization, groups of 32;
                           each other codec alone, in registry order
    prune, random          V-only pruning with the checkpoint's keep ratio,
                           k_min and recency (lib/kv_pruning.py), and its
                           random-keep control at the same budget, each alone
                           and with every codec; prune + SplinePCA k is the
                           V20 configuration, applied post hoc
    H2O K+V                heavy-hitter eviction of K and V, token budget chosen
                           so its V cache holds as many values as V20's
    window w               the last w tokens' V: as many fp32 V bytes as each
                           prune row, and the prune recency (context use)
"""

import itertools
import statistics
import time
from dataclasses import dataclass, field

from gpt2.ablations import step_overrides
from gpt2.calibrate import quiet
from lib.kv_pruning import keep_budget
from lib.settings import BadSettings
from lib.vcache import CODECS, FULL, SELECTORS, build_method, describe, describe_part, settings_of

V20_K = step_overrides("V20")["kvsplice_k"]  # the V20 configuration's latent dims per head
QUANT_GROUP = CODECS["int8"].bench_with_selectors["group_size"]  # what the report's notes state
LABELS = {"pca": "PCA", "splinepca": "SplinePCA", "h2o": "H2O K+V"}  # a row's name for a kind
SHORT = {"group_size": "g"}  # a setting as a codec's name shows it: int8 V (g32)


@dataclass
class BenchMethod:
    name: str
    record: dict
    fitted: list = None        # one fitted codec state_dict per layer, for codecs with a fit step
    calib_s: float = 0.0       # V collection + fit (fitted codecs)
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


# ---- the rows, from the registry ------------------------------------------------------

def bench_codecs():
    """The codecs after the reference (none): those that sweep a setting, by
    their rows' name (PCA, SplinePCA, then the lower-case kinds), then the
    others in the order they registered."""
    order = list(CODECS)
    codecs = [cls for kind, cls in CODECS.items() if kind != FULL["codec"]["kind"]]
    return sorted(codecs, key=lambda cls: (0, LABELS.get(cls.kind, cls.kind), 0) if cls.bench_sweep
                  else (1, "", order.index(cls.kind)))


def codec_record(cls, settings, fixed):
    """A codec's record: its kind, the bench's settings, then the settings of
    `fixed` (the checkpoint's: knots) that it takes and the bench leaves out."""
    takes = settings_of(cls)
    return {"kind": cls.kind, **settings, **{n: v for n, v in fixed.items() if n in takes and n not in settings}}


def alone_settings(cls, ks):
    """[settings] of a codec's rows alone: its bench_sweep (k's values are ks),
    or, sweeping nothing, its settings beside a selector (or its defaults)."""
    sweep = {n: ks if n == "k" else values for n, values in cls.bench_sweep.items()}
    if not sweep:
        return [dict(cls.bench_with_selectors or {})]
    return [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())]


def codec_label(cls, settings, alone):
    """'PCA k=8' or 'int8 V (g32)' alone, 'PCA k=16' or 'int8' beside a
    selector: the swept settings always, the others alone only."""
    name = LABELS.get(cls.kind, cls.kind)
    swept = [f"{n}={describe_part(settings[n]) if isinstance(settings[n], dict) else settings[n]}"
             for n in cls.bench_sweep if n in settings]
    if swept:
        return " ".join([name, *swept])
    if not alone:
        return name
    shown = ", ".join(f"{SHORT[n]}{v}" if n in SHORT else f"{n}={v}" for n, v in settings.items())
    return f"{name} V" + (f" ({shown})" if shown else "")


def with_selectors(fixed):
    """[(label, codec record)] of the codecs beside a token selector, the reference (none) first."""
    codecs = [CODECS[FULL["codec"]["kind"]]] + bench_codecs()
    return [(codec_label(cls, cls.bench_with_selectors, False), codec_record(cls, cls.bench_with_selectors, fixed))
            for cls in codecs if cls.bench_with_selectors is not None]


def role(kind):
    return SELECTORS[kind].bench_role


def budget_selectors(prune, seed):
    """The selector records at the method's budget: each "method" selector, then
    each "control" that takes the method's settings (with the run's seed where
    it takes one)."""
    out = []
    for want in ("method", "control"):
        for cls in SELECTORS.values():
            takes = settings_of(cls)
            if cls.bench_role == want and set(prune) <= set(takes):
                out.append({"kind": cls.kind, **prune, **({"seed": seed} if "seed" in takes else {})})
    return out


def planned_rows(ks, prune, knots, seed, block_size, head_dim, h2o=True):
    """[(row name, record)] of the benchmark before its equal-bytes windows
    (whose sizes follow from the built rows' bytes: window_rows)."""
    full, fixed = FULL["select"], {"knots": knots}
    rows = [("none", FULL)]
    rows += [(codec_label(cls, s, True), {"select": full, "codec": codec_record(cls, s, fixed)})
             for cls in bench_codecs() for s in alone_settings(cls, ks)]
    budget = keep_budget(prune["keep_ratio"], block_size, prune["k_min"])
    for select in budget_selectors(prune, seed):
        label = f"{select['kind']} {budget}/{block_size}"
        rows += [(label if codec["kind"] == FULL["codec"]["kind"] else f"{label} + {name}",
                  {"select": select, "codec": codec}) for name, codec in with_selectors(fixed)]
    # equal V budget: V20 holds budget x V20_K latent values per head, H2O full head_dim V
    equal = max(1, budget * V20_K // head_dim)
    rows += [(f"{LABELS.get(kind, kind)} ({equal} tok)",
              {"select": {"kind": kind, "budget": equal, "recency": max(1, equal // 2)}, "codec": FULL["codec"]})
             for kind in SELECTORS if h2o and role(kind) == "equal_bytes"]
    return rows


def window_rows(methods, prune, block_size, head_dim):
    """[(row name, record)] of each "control" selector sized by its one setting (a
    sliding window): holding as many fp32 V bytes as each built method row, and
    the method's recency (the short context-use window)."""
    sizes = {prune["recency"]} | {max(1, m.layers[0].v_bytes(block_size) // (head_dim * 4))
                                  for m in methods if role(m.record["select"]["kind"]) == "method"}
    rows = []
    for kind, cls in SELECTORS.items():
        setting = list(settings_of(cls))
        if role(kind) == "control" and len(setting) == 1:  # not the method's settings: a budget control takes those
            rows += [(f"{kind} {w}", {"select": {"kind": kind, setting[0]: w}, "codec": FULL["codec"]})
                     for w in sorted(sizes)]
    return rows


def fit_records(rows):
    """The distinct codec records with a fit step among the rows, each codec's by its settings."""
    out = []
    for _, record in rows:
        codec = record["codec"]
        if CODECS[codec["kind"]].needs_fit and codec not in out:
            out.append(codec)
    order = [cls.kind for cls in bench_codecs()]
    return sorted(out, key=lambda c: (order.index(c["kind"]), [v for n, v in c.items() if n != "kind"]))


def fit_rows_of(codec, head_dim):
    """(fewest, most) V vectors per layer the fit of a codec record needs and
    wants; at the bench's settings alone when the checkpoint's (knots) cannot
    build it, None when neither can (the setting's problem is reported)."""
    cls = CODECS[codec["kind"]]
    bench = {"kind", *cls.bench_sweep, *(cls.bench_with_selectors or {})}
    for record in (codec, {n: v for n, v in codec.items() if n in bench}):
        try:
            return cls(head_dim, **{n: v for n, v in record.items() if n != "kind"}).fit_rows()
        except (ValueError, TypeError):
            pass
    return None


def widest_fit(ks, prune, knots, block_size, head_dim):
    """The codec record whose fit wants the most V vectors per layer: the
    collection keeps as many for every fit (none: no codec is fitted)."""
    def want(codec):
        rows = fit_rows_of(codec, head_dim)
        return -1 if rows is None else float("inf") if rows[1] is None else rows[1]
    records = fit_records(planned_rows(ks, prune, knots, 0, block_size, head_dim, h2o=False))
    return max(records, key=want) if records else FULL["codec"]


def check_preconditions(ks, head_dim, block_size, prune, calib_vectors, knots):
    """Every method's needs, before the first row runs: one message listing all problems.
    Each method checks its own settings (build_method): every codec alone, every
    "method" selector alone; calib_vectors: the V vectors per layer the fits get."""
    rows = planned_rows(ks, prune, knots, 0, block_size, head_dim, h2o=False)
    records = []
    for _, record in rows:
        alone = {"select": FULL["select"], "codec": record["codec"]}
        if record["codec"]["kind"] != FULL["codec"]["kind"] and alone not in records:
            records.append(alone)
    records += [r for _, r in rows if role(r["select"]["kind"]) == "method" and r["codec"] == FULL["codec"]]
    problems = {}  # each problem once, with the rows it stops
    for record in records:
        try:
            build_method(record, block_size, head_dim)
        except BadSettings as e:
            for p in e.problems:
                problems.setdefault(p, []).append(describe(record))
    messages = [f"{p} (rows: {', '.join(labels)})" for p, labels in problems.items()]
    needs = {}
    for codec in fit_records(rows):
        fit_rows = fit_rows_of(codec, head_dim)
        if fit_rows is not None:
            needs.setdefault(fit_rows[0], []).append(LABELS.get(codec["kind"], codec["kind"]))
    if needs and calib_vectors < max(needs):
        need = max(needs)
        messages.append(f"the {' / '.join(dict.fromkeys(needs[need]))} fits need at least {need} V vectors per "
                        f"layer, but {calib_vectors} are collected (--calib-batches x --batch-size x block_size x "
                        f"n_head, at most the checkpoint's --kvsplice-samples)")
    if messages:
        raise ValueError("; ".join(messages))


# ---- fits and the methods --------------------------------------------------------------

def fit_codec(cal, record, epochs, lr, seed):
    """Fit every layer's codec of this codec record from the calibrator's samples:
    (per-layer codec states, seconds, layer stats). PCA is the same fit as
    SplinePCA with no epoch, which keeps the identity spline: exactly plain PCA."""
    model = cal.model
    model.set_v_cache({"select": FULL["select"], "codec": record})
    with quiet():  # one progress line per fit, not per layer
        stats = cal.fit(seed=seed, epochs=epochs, lr=lr)
    states = [{n: t.clone() for n, t in codec.state_dict().items()} for codec in model.v_codecs()]
    return states, stats["seconds"], stats["layers"]


def fitted_codecs(cal, records, epochs, lr, seed, log):
    """{codec label (describe_part): (fitted states, calib seconds, mse ratio)}
    for every codec record with a fit step, all fitted from the same collected
    samples; the ratio (held-out V MSE, SplinePCA / PCA) for a spline geometry only."""
    out = {}
    for codec in records:
        cls = CODECS[codec["kind"]]
        states, fit_s, layers = fit_codec(cal, codec, epochs, lr, seed)
        settings = {n: v for n, v in codec.items() if n != "kind"}
        line, ratio = f"[bench] fit {codec_label(cls, settings, True)}: {fit_s:.1f}s", None
        if all("spline_val_mse" in s and "pca_val_mse" in s for s in layers):
            # a learned spline that did not beat PCA was replaced by the identity: ratio 1 there
            ratio = statistics.mean(s["spline_val_mse"] / max(s["pca_val_mse"], 1e-30) if s["kept_spline"] else 1.0
                                    for s in layers)
            line += f", held-out V MSE SplinePCA/PCA {ratio:.3f}"
        spline = getattr(cls, "spline", False)
        if spline:
            line += f", learned spline kept in {sum(s['kept_spline'] for s in layers)}/{len(layers)} layers"
        log(line)
        out[describe_part(codec)] = (states, fit_s, ratio if spline else None)
    return out


def bench_methods(model, cal, collect_s, ks, prune, knots, epochs, lr, seed, log, h2o=True):
    """The benchmark's rows as BenchMethods, codecs with a fit step fitted from cal's samples."""
    bs, hd = model.config.block_size, model.config.head_dim
    rows = planned_rows(ks, prune, knots, seed, bs, hd, h2o)
    fits = fitted_codecs(cal, fit_records(rows), epochs, lr, seed, log)

    def method(name, record):
        if describe_part(record["codec"]) not in fits:
            return BenchMethod(name, record)
        states, fit_s, ratio = fits[describe_part(record["codec"])]
        return BenchMethod(name, record, states, collect_s + fit_s, ratio)

    methods = [method(name, record) for name, record in rows]
    t0 = time.perf_counter()
    for m in methods:
        m.build(model)
    methods += [method(name, record).build(model) for name, record in window_rows(methods, prune, bs, hd)]
    log(f"[bench] {len(methods)} methods built in {time.perf_counter() - t0:.1f}s")
    return methods


def step_record(step, prune):
    """The V-cache record an ablation step trains (gpt2/ablations.py), built by
    its flags as a run of it would be, with the given pruning settings."""
    from gpt2.cli import parse_args  # the trainer's flags, imported where a step's record is wanted
    from gpt2.method_flags import FLAG_SETTINGS, flag, method_record

    argv = ["--ablation-step", step]
    for setting, dest in FLAG_SETTINGS["prune"].items():
        argv += [flag(dest), str(prune[setting])]
    return method_record(parse_args(argv))

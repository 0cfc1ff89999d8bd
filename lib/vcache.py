"""V-cache methods: one object per method, with four faces.

A method is a token selector (which tokens' V a query may read) composed
with a V codec (how each kept V vector is stored):

    method.attend(q, k, v, dropout_p)   full-sequence causal attention, for
                                        training and evaluation; q at nh
                                        heads, k and v at nkv (grouped-query
                                        attention when nkv < nh)
    method.make_cache()                 its decode cache for one layer
                                        (lib/kv_cache.py's LayerCache protocol);
                                        fed the same tokens, it returns attend's outputs
    method.v_bytes(T, dtype)            V bytes its cache holds per (batch,
                                        head of V) after T tokens: what a real
                                        cache measures (tests check it)
    method.record()                     a plain dict that rebuilds it:
                                        build_method(record, block_size, head_dim)

A record:

    {"select": {"kind": "prune", "keep_ratio": 0.382, "k_min": 64, "recency": 64},
     "codec": {"kind": "splinepca", "k": 16, "knots": 7}}

This file holds the registry, the two contracts (TokenSelector, VCodec) and
their composition; the methods themselves are one file each in
lib/selectors/ and lib/codecs/, registered with @register_selector or
@register_codec and found by `import lib` (docs/vcache.md, "Adding a method").
Nothing here knows about models: an attention calls method.attend on its
q, k, v, whatever the model.
"""

import math
import time

import torch
import torch.nn as nn

from lib.kv_cache import KeepRuleLayerCache, VStore
from lib.settings import BadSettings, check

SELECTORS = {}  # kind -> TokenSelector subclass
CODECS = {}     # kind -> VCodec subclass
FULL = {"select": {"kind": "full"}, "codec": {"kind": "none"}}


def full_record():
    """A fresh copy of FULL, the full cache's record (a config's default, safe to change)."""
    return {part: dict(settings) for part, settings in FULL.items()}


def _registrar(registry):
    """A class decorator factory: @register(kind) files the class under kind."""
    def register(kind):
        def add(cls):
            cls.kind = kind
            registry[kind] = cls
            return cls
        return add
    return register


register_selector = _registrar(SELECTORS)
register_codec = _registrar(CODECS)


def _take_settings(part, settings):
    """The settings of a selector or codec (`defaults` filled in) as attributes
    of `part`; BadSettings for a name it does not take or a problem it finds."""
    unknown = sorted(set(settings) - set(part.defaults))
    check([f"unknown settings {unknown}; it takes {list(part.defaults)}"] if unknown else [])
    for name, default in part.defaults.items():
        setattr(part, name, settings.get(name, default))
    check(part.problems())


# ---- token selectors -------------------------------------------------------------

class TokenSelector:
    """Which tokens' V each query reads: the contract of lib/selectors/.

    Settings are stated once, in `defaults` ({name: default}: the record's
    fields). __init__(block_size, **settings) rejects unknown names, sets
    each setting as an attribute, checks problems() (BadSettings lists
    them) and calls setup(), where the selector builds what it needs.

    A subclass implements attend, make_cache and held_tokens (or inherits
    them from KeepRule); one that reads some tokens' V exact and the rest
    through the codec also overrides attend_through and v_bytes (sinks.py).
    It sets `exact = False` when decoding only
    approximates `attend` (say why). `example` holds small settings for the
    tests; `bench_role` says how the benchmark uses it: "method" (alone and
    with every codec, with the controls), "control" (a control at the
    methods' budgets), "equal_bytes" (at the V bytes of a method), None (not
    benchmarked, or the reference itself).
    """

    kind = None
    defaults = {}
    example = {}
    exact = True  # decode through make_cache equals attend up to float rounding
    bench_role = None

    def __init__(self, block_size, **settings):
        self.block_size = block_size
        _take_settings(self, settings)
        self.setup()

    def problems(self):
        """One line per problem of the settings; [] when they are fine."""
        return []

    def setup(self):
        """Build what the selector needs from its settings (a keep rule, ...)."""

    def params(self):
        """The record's fields besides "kind"."""
        return {name: getattr(self, name) for name in self.defaults}

    def record(self):
        return {"kind": self.kind, **self.params()}

    def attend(self, q, k, v, dropout_p=0.0):
        """q (B, nh, T, hs), k and v (B, nkv, T, hs), v already through the
        codec -> y (B, nh, T, hs). Query head h reads KV head h // (nh // nkv)
        (lib/kv_pruning.py, grouped-query attention)."""
        raise NotImplementedError

    def make_cache(self, codec):
        """The layer's decode cache (a lib.kv_cache.LayerCache), storing V through `codec`."""
        raise NotImplementedError

    def held_tokens(self, T):
        """Tokens whose V the cache holds per (batch, head of V) after T tokens."""
        raise NotImplementedError

    def attend_through(self, codec, q, k, v, dropout_p=0.0):
        """attend on V as the codec stores it: attend(q, k, codec.roundtrip(v)). A
        selector that reads some tokens' V exact (sinks.py) reads both."""
        return self.attend(q, k, codec.roundtrip(v), dropout_p)

    def v_bytes(self, T, codec, dtype):
        """V bytes its cache holds per (batch, head of V) after T tokens: held_tokens(T) vectors through the codec."""
        return self.held_tokens(T) * codec.stored_bytes(dtype)


class KeepRule(TokenSelector):
    """A selector that is a lib.kv_pruning.TokenKeep rule (recency window + top
    older tokens by a final score), made in setup() as `self.rule`: training
    masks and the cache evicts by the same rule."""

    def attend(self, q, k, v, dropout_p=0.0):
        return self.rule(q, k, v, dropout_p=dropout_p)

    def make_cache(self, codec):
        return KeepRuleLayerCache(self.rule, codec, capacity=self.block_size)

    def held_tokens(self, T):
        return min(T, self.rule.budget)


# ---- V codecs ------------------------------------------------------------------

def straight_through(v, stored):
    """`stored` (V as a codec gives it back) in the forward pass, exactly; in the
    backward pass the gradient reaches v as if the codec were the identity (the
    straight-through estimator), so a codec that rounds still trains what makes V."""
    return stored.detach() + (v - v.detach())


class VCodec(VStore, nn.Module):
    """How one V vector (head_dim wide) is stored: the contract of lib/codecs/.

    Settings are stated once, in `defaults` ({name: default}: the record's
    fields). __init__(head_dim, **settings) rejects unknown names, sets each
    setting as an attribute, checks problems() (BadSettings lists them) and
    calls setup(), where the codec makes its buffers. params() and record()
    follow from `defaults`.

    A subclass writes:
        encode(v)              v (..., head_dim) -> ONE tensor (..., width),
                               the width fixed by the settings
        decode(stored)         -> (..., head_dim) float
        bytes_per_vector(dtype)  bytes of one encoded vector when V arrives in dtype
    and, with a fit step (`needs_fit = True`):
        fit_state(samples, seed, **options)  fit the buffers to samples
                               (N, head_dim) fp32 of its layer's V; returns a
                               dict of statistics. `options` are those of
                               `fit_defaults` ({"epochs": 8, "lr": 2e-3}: the
                               calibrator passes epochs and lr) that it uses
        fit_rows()             (fewest, most) V vectors the fit needs and wants
        fit_summary(stats)     one line about a fit
    Optional hooks: weigh(weights, stored), the codec's own read of stored
    rows; reconstruct(v), what training sees once fitted, with
    `straight_through_grad = False` when that reconstruction is
    differentiable and its true gradient should reach V.

    Written once here, for every codec:
        write(v)               what the cache stores: encode(v) once fitted, else v
        read(weights, stored)  weights (..., T, n) fp32 over stored rows
                               (..., n, width) -> fp32 (..., T, head_dim):
                               weigh(...) once fitted, else weights @ stored
        values(stored)         the rows' values, fp32 (..., n, head_dim): decode(...)
                               once fitted, else stored (a prefill's fused attention
                               reads them)
        stored_bytes(dtype)    bytes_per_vector(dtype) once fitted, else V's own
        roundtrip(v)           what training sees: v until fitted; then
                               straight_through(v, reconstruct(v)) (the
                               gradient passes as through the identity), or
                               reconstruct(v) itself
        fit(samples, seed, **options)  fit_state with fit_defaults filled in
                               (options it does not use ignored), marks it
                               fitted; its statistics plus rows and seconds

    A Module: fitted state lives in buffers of fixed shape made in setup()
    (the calibrator fits a deep copy and copies back only the state_dict),
    so it moves, saves and loads with the model's weights. A codec with a fit
    step has a `fit_done` buffer; `fitted` follows it, also after
    load_state_dict.

    `example` holds small settings for the tests. The benchmark reads
    `bench_sweep` ({setting: values} it sweeps for the codec alone) and
    `bench_with_selectors` (the settings it uses composed with a token
    selector, None to skip that).
    """

    kind = None
    defaults = {}
    example = {}
    needs_fit = False
    fit_defaults = {}
    straight_through_grad = True
    bench_sweep = {}
    bench_with_selectors = None

    def __init__(self, head_dim, **settings):
        super().__init__()
        self.head_dim = head_dim
        _take_settings(self, settings)
        self._fitted = not self.needs_fit  # read on the hot path: no device sync
        if self.needs_fit:
            self.register_buffer("fit_done", torch.zeros((), dtype=torch.bool))
            self.register_load_state_dict_post_hook(_read_fit_flag)
        self.setup()

    @property
    def fitted(self):
        return self._fitted

    def problems(self):
        """One line per problem of the settings; [] when they are fine."""
        return []

    def setup(self):
        """Make the buffers (fixed shapes, from the settings and head_dim)."""

    def params(self):
        return {name: getattr(self, name) for name in self.defaults}

    def record(self):
        return {"kind": self.kind, **self.params()}

    # ---- the codec's own ----

    def encode(self, v):
        raise NotImplementedError

    def decode(self, stored):
        raise NotImplementedError

    def bytes_per_vector(self, dtype):
        raise NotImplementedError

    def weigh(self, weights, stored):
        """weights (..., T, n) fp32 @ the decoded stored rows -> fp32 (..., T, head_dim)."""
        return weights @ self.decode(stored).float()

    def reconstruct(self, v):
        """decode(encode(v)) in v's dtype: the V that attention reads."""
        return self.decode(self.encode(v)).to(v.dtype)

    def fit_state(self, samples, seed, **options):
        """Fit the buffers to samples; a dict of statistics. A codec without a fit step has nothing to fit."""
        if self.needs_fit:
            raise NotImplementedError(f"{self.kind} needs a fit but has no fit_state")
        return {}

    def fit_rows(self):
        """(fewest, most) V vectors per layer the fit needs and wants."""
        return 1, None

    def fit_summary(self, stats):
        """One line about a fit, from fit()'s statistics."""
        return ", ".join(f"{n} {v:.4g}" if isinstance(v, float) else f"{n} {v}" for n, v in stats.items())

    # ---- written once, for every codec ----

    def write(self, v):
        return self.encode(v) if self.fitted else super().write(v)

    def read(self, weights, stored):
        return self.weigh(weights, stored) if self.fitted else super().read(weights, stored)

    def values(self, stored):
        return self.decode(stored).float() if self.fitted else super().values(stored)

    def stored_bytes(self, dtype):
        """Bytes of one stored vector when V arrives in `dtype`."""
        return self.bytes_per_vector(dtype) if self.fitted else self.head_dim * dtype.itemsize

    def roundtrip(self, v):
        if not self.fitted:
            return v
        if self.straight_through_grad:
            return straight_through(v, self.reconstruct(v))
        return self.reconstruct(v)

    def fit(self, samples, seed=0, **options):
        """Fit to samples (N, head_dim) fp32 of this layer's V; returns fit_state's
        statistics plus "rows" and "seconds"."""
        if not torch.is_tensor(samples) or samples.dim() != 2 or samples.size(1) != self.head_dim:
            found = list(samples.shape) if torch.is_tensor(samples) else type(samples).__name__
            raise ValueError(f"{self.kind} fit: expected samples (N, {self.head_dim}), found {found}")
        fewest = self.fit_rows()[0]
        if samples.size(0) < fewest:
            raise ValueError(f"{self.kind} fit: needs at least {fewest} V vectors, got {samples.size(0)}")
        t0 = time.perf_counter()
        stats = self.fit_state(samples, seed, **{n: options.get(n, d) for n, d in self.fit_defaults.items()})
        if self.needs_fit:
            self.fit_done.fill_(True)
            self._fitted = True
        return {**stats, "rows": samples.size(0), "seconds": time.perf_counter() - t0}


def _read_fit_flag(codec, incompatible_keys):
    codec._fitted = bool(codec.fit_done)


# ---- the method ------------------------------------------------------------------

class VCacheMethod(nn.Module):
    """A token selector composed with a V codec: itself a method."""

    def __init__(self, selector, codec):
        super().__init__()
        self.selector, self.codec = selector, codec

    @property
    def exact(self):
        return self.selector.exact

    def extra_repr(self):
        return describe(self.record())

    def record(self):
        return {"select": self.selector.record(), "codec": self.codec.record()}

    def attend(self, q, k, v, dropout_p=0.0):
        """Full-sequence causal attention: q (B, nh, T, hs), k, v (B, nkv, T, hs) -> (B, nh, T, hs)."""
        return self.selector.attend_through(self.codec, q, k, v, dropout_p)

    def make_cache(self):
        """The decode cache of one layer: cache(q, k, v) on the new tokens -> y."""
        return self.selector.make_cache(self.codec)

    @property
    def needs_fit(self):
        """True while its codec waits for the fit it needs (the calibrator's)."""
        return self.codec.needs_fit and not self.codec.fitted

    def v_bytes(self, T, dtype=torch.float32):
        """V bytes the cache holds per (batch, head of V) after T tokens of V in `dtype`."""
        return self.selector.v_bytes(T, self.codec, dtype)


def settings_of(cls):
    """{setting: default} of a registered selector or codec: its record's fields."""
    return dict(cls.defaults)


def _build(registry, what, spec, *args):
    if not isinstance(spec, dict) or "kind" not in spec:
        raise BadSettings([f"v_cache {what}: expected a dict with a 'kind', found {spec!r}"])
    kind = spec["kind"]
    if kind not in registry:
        raise BadSettings([f"v_cache {what}: unknown kind {kind!r}; known: {', '.join(registry)}"])
    cls = registry[kind]
    allowed = list(settings_of(cls))
    unknown = sorted(set(spec) - {"kind"} - set(allowed))
    if unknown:
        raise BadSettings([f"v_cache {what} {kind!r}: unknown settings {unknown}; it takes {allowed}"])
    settings = {n: v for n, v in spec.items() if n != "kind"}
    try:
        return cls(*args, **settings)
    except BadSettings as e:
        raise BadSettings([f"v_cache {what} {kind!r}: {p}" for p in e.problems]) from None
    except (ValueError, TypeError) as e:
        raise BadSettings([f"v_cache {what} {kind!r}: {e}"]) from None


def build_method(record, block_size, head_dim):
    """A VCacheMethod from its record; BadSettings (a ValueError) lists every problem."""
    if not isinstance(record, dict) or set(record) != {"select", "codec"}:
        raise BadSettings([f"v_cache record: expected {{'select': ..., 'codec': ...}}, found {record!r}"])
    problems, parts = [], []
    for what, registry, arg in (("select", SELECTORS, block_size), ("codec", CODECS, head_dim)):
        try:
            parts.append(_build(registry, what, record[what], arg))
        except BadSettings as e:
            problems += e.problems
    check(problems)
    return VCacheMethod(*parts)


def describe(record):
    """A short label: 'prune(keep_ratio=0.382, k_min=64, recency=64) + splinepca(k=16, knots=7)'."""
    parts = [describe_part(record["select"])]
    if record["codec"]["kind"] != "none":
        parts.append(describe_part(record["codec"]))
    return " + ".join(parts)


def describe_part(spec):
    """A selector's or a codec's label: 'splinepca(k=16, knots=7)'."""
    settings = ", ".join(f"{n}={_fmt(v)}" for n, v in spec.items() if n != "kind")
    return spec["kind"] + (f"({settings})" if settings else "")


def _fmt(v):
    if isinstance(v, dict) and "kind" in v:  # a part inside a part: a rotation's inner codec
        return describe_part(v)
    return f"{v:.3f}" if isinstance(v, float) and not math.isinf(v) else str(v)

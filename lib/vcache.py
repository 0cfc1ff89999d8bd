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

A codec that is fitted (PCA, SplinePCA) owns its fit step and its fitted
state (its state_dict): method.needs_fit says it still waits for the fit,
which the calibrator runs on V samples of its layer.

Nothing here knows about models: an attention calls method.attend on its
q, k, v, whatever the model (a GPT-2 block: gpt2/model.py). A record:

    {"select": {"kind": "prune", "keep_ratio": 0.382, "k_min": 64, "recency": 64},
     "codec": {"kind": "splinepca", "k": 16, "knots": 7}}

Adding a method is one class registered with @register_selector or
@register_codec; tests/test_vcache.py then runs it through causality,
decode == attend, real bytes, the fit and bad input (docs/vcache.md,
"Adding a method").
"""

import inspect
import math

import torch
import torch.nn as nn

from lib.kv_cache import H2OLayerCache, LayerKVCache
from lib.kv_pruning import K_MIN, KEEP_RATIO, RECENCY, RandomKeep, SlidingWindow, VOnlyPruner, causal_attention
from lib.kvsplice import SplinePCA, check_values
from lib.quantize import VQuantizer
from lib.settings import BadSettings, check

SAMPLES_PER_LATENT_DIM = 2000  # V vectors per latent dim a geometry's fit wants per layer

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


# ---- token selectors -------------------------------------------------------------

class TokenSelector:
    """Which tokens' V each query reads. Subclasses take their settings as
    keyword arguments (the record's fields) after block_size, and set
    `exact = False` when decoding only approximates `attend` (say why)."""

    kind = None
    exact = True  # decode through make_cache equals attend up to float rounding
    example = {}  # small settings the method tests use

    def __init__(self, block_size):
        self.block_size = block_size

    def params(self):
        """The record's fields besides "kind"."""
        return {}

    def record(self):
        return {"kind": self.kind, **self.params()}

    def attend(self, q, k, v, dropout_p=0.0):
        """q (B, nh, T, hs), k and v (B, nkv, T, hs), v already through the
        codec -> y (B, nh, T, hs). Query head h reads KV head h // (nh // nkv)
        (lib/kv_pruning.py, grouped-query attention)."""
        raise NotImplementedError

    def make_cache(self, **storage):
        """The layer's decode cache, storing V as the codec's storage() says."""
        raise NotImplementedError

    def held_tokens(self, T):
        """Tokens whose V the cache holds per (batch, head of V) after T tokens."""
        raise NotImplementedError


@register_selector("full")
class Full(TokenSelector):
    """Every token's V (V0)."""

    def attend(self, q, k, v, dropout_p=0.0):
        return causal_attention(q, k, v, dropout_p)

    def make_cache(self, **storage):
        return LayerKVCache(None, capacity=self.block_size, **storage)

    def held_tokens(self, T):
        return T


class KeepRule(TokenSelector):
    """A lib.kv_pruning.TokenKeep rule: recency window + top older tokens by a
    final score; training masks and the cache evicts by the same rule."""

    def __init__(self, block_size, rule):
        super().__init__(block_size)
        self.rule = rule

    def attend(self, q, k, v, dropout_p=0.0):
        return self.rule(q, k, v, dropout_p=dropout_p)

    def make_cache(self, **storage):
        return LayerKVCache(self.rule, capacity=self.block_size, **storage)

    def held_tokens(self, T):
        return min(T, self.rule.budget)


@register_selector("prune")
class Prune(KeepRule):
    """V-only pruning (V19): the window plus the older tokens that received the most attention."""

    example = {"keep_ratio": 0.25, "k_min": 8, "recency": 4}

    def __init__(self, block_size, keep_ratio=KEEP_RATIO, k_min=K_MIN, recency=RECENCY):
        super().__init__(block_size, VOnlyPruner(keep_ratio, k_min, recency, block_size))

    def params(self):
        r = self.rule
        return {"keep_ratio": r.keep_ratio, "k_min": r.k_min, "recency": r.recency}


@register_selector("window")
class Window(KeepRule):
    """Control: only the last `window` tokens' V (keys in full)."""

    example = {"window": 6}

    def __init__(self, block_size, window=RECENCY):
        super().__init__(block_size, SlidingWindow(window, block_size))

    def params(self):
        return {"window": self.rule.recency}


@register_selector("random")
class Random(KeepRule):
    """Control for pruning: its budget and window, older tokens kept at random."""

    example = {"keep_ratio": 0.25, "k_min": 8, "recency": 4, "seed": 3}

    def __init__(self, block_size, keep_ratio=KEEP_RATIO, k_min=K_MIN, recency=RECENCY, seed=0):
        super().__init__(block_size, RandomKeep(keep_ratio, k_min, recency, block_size, seed))

    def params(self):
        r = self.rule
        return {"keep_ratio": r.keep_ratio, "k_min": r.k_min, "recency": r.recency, "seed": r.seed}


@register_selector("h2o")
class H2O(TokenSelector):
    """Heavy-hitter eviction of K and V (lib.kv_cache.H2OLayerCache).

    H2O has no full-sequence form: its scores keep changing, so which tokens
    a query sees depends on every eviction before it. `attend` therefore
    runs its cache over the sequence token by token (slow, no dropout), and
    decoding equals it only in that sense: exact = False.
    """

    exact = False
    example = {"budget": 10, "recency": 4}

    def __init__(self, block_size, budget=256, recency=128):
        super().__init__(block_size)
        H2OLayerCache(budget, recency)  # checks the settings
        self.budget, self.recency = budget, recency

    def params(self):
        return {"budget": self.budget, "recency": self.recency}

    def attend(self, q, k, v, dropout_p=0.0):
        return self.make_cache()(q, k, v)

    def make_cache(self, **storage):
        return H2OLayerCache(self.budget, self.recency, **storage)

    def held_tokens(self, T):
        return min(T, self.budget)


# ---- V codecs ------------------------------------------------------------------

class VCodec(nn.Module):
    """How one V vector (head_dim wide) is stored. Subclasses take head_dim,
    then their settings as keyword arguments (the record's fields), and
    check them in __init__ (raise BadSettings / ValueError).

    encode/decode are what the cache calls; roundtrip(v) == decode(encode(v))
    in v's dtype is what training sees. A Module: fitted state is its own
    state_dict, so it moves, saves and loads with the model's weights.

    A codec with `needs_fit = True` is fitted from V samples of its layer
    (fit, called by the calibrator); until then `fitted` is False and it
    stores V as it is. Its state_dict says whether it was fitted.
    """

    kind = None
    example = {}
    needs_fit = False

    def __init__(self, head_dim):
        super().__init__()
        self.head_dim = head_dim

    @property
    def fitted(self):
        return True

    def fit(self, samples, seed=0, **options):
        """Fit to samples (N, head_dim) fp32 of this layer's V; returns a dict of
        fit statistics. `options` are the calibrator's (epochs, lr): take what
        you use. Only codecs with needs_fit have one."""
        raise NotImplementedError(f"{self.kind} has no fit step")

    def fit_rows(self):
        """(fewest, most) V vectors per layer the fit needs and wants."""
        return 1, None

    def fit_summary(self, stats):
        """One line about a fit, from fit()'s statistics."""
        return ", ".join(f"{n} {v:.4g}" if isinstance(v, float) else f"{n} {v}" for n, v in stats.items())

    def storage(self):
        """How the cache stores V, as keyword arguments of its constructor:
        v_encode / v_decode (a pair) and optionally v_attend(weights, stored),
        weights @ v_decode(stored) in fp32 done the codec's way. {} stores V
        as it is."""
        return {"v_encode": self.encode, "v_decode": self.decode}

    def params(self):
        return {}

    def record(self):
        return {"kind": self.kind, **self.params()}

    def roundtrip(self, v):
        return self.decode(self.encode(v))

    def stored_bytes(self, dtype):
        """Bytes of one stored vector when V arrives in `dtype`."""
        raise NotImplementedError


def straight_through(v, stored):
    """`stored` (V as a codec gives it back) in the forward pass, exactly; in the
    backward pass the gradient reaches v as if the codec were the identity (the
    straight-through estimator), so a codec that rounds still trains what makes V."""
    return stored.detach() + (v - v.detach())


class FittedCodec(VCodec):
    """A VCodec with a fit step: a `fitted` flag in its state_dict, kept in
    step with the Python attribute that the hot path reads."""

    needs_fit = True

    def __init__(self, head_dim):
        super().__init__(head_dim)
        self.register_buffer("fit_done", torch.zeros((), dtype=torch.bool))
        self._fitted = False
        self.register_load_state_dict_post_hook(_read_fit_flag)

    @property
    def fitted(self):
        return self._fitted

    def mark_fitted(self):
        self.fit_done.fill_(True)
        self._fitted = True


def _read_fit_flag(codec, incompatible_keys):
    codec._fitted = bool(codec.fit_done)


@register_codec("none")
class NoCodec(VCodec):
    """V as it is."""

    def storage(self):
        return {}

    def roundtrip(self, v):
        return v

    def stored_bytes(self, dtype):
        return self.head_dim * torch.empty((), dtype=dtype).element_size()


class _Geometry(FittedCodec):
    """A KVSplice geometry (lib/kvsplice.py): V -> spline -> PCA_k latent.

    Fitted from its layer's V (fit: SplinePCA.fit on the calibrator's
    samples) and frozen; until then it stores V as it is, so bytes and
    outputs are those of no codec.
    """

    spline = True
    example = {"k": 4, "knots": 3}

    def __init__(self, head_dim, k=16, knots=7):
        super().__init__(head_dim)
        problems = []
        if not isinstance(k, int) or not 1 <= k <= head_dim:
            problems.append(f"k must be an int in [1, head_dim = {head_dim}], got {k!r}")
        if not isinstance(knots, int) or knots < 1:
            problems.append(f"knots must be an int >= 1, got {knots!r}")
        check(problems)
        self.k, self.knots = k, knots
        self.geometry = SplinePCA(head_dim, k, knots).requires_grad_(False)
        self.register_load_state_dict_pre_hook(_check_geometry_values)

    def params(self):
        return {"k": self.k, "knots": self.knots}

    def fit(self, samples, seed=0, epochs=8, lr=2e-3, **options):
        """SplinePCA.fit; plain PCA is the same fit with no epoch, which keeps the identity spline."""
        stats = self.geometry.fit(samples, epochs=epochs if self.spline else 0, lr=lr, seed=seed)
        self.geometry.requires_grad_(False)
        self.mark_fitted()
        return stats

    def fit_rows(self):
        return self.k + 1, SAMPLES_PER_LATENT_DIM * self.k

    def set_geometry(self, splinepca):
        """Use a SplinePCA fitted elsewhere, of the codec's head_dim, k and knots, as the fit."""
        state = {"geometry." + n: t for n, t in splinepca.state_dict().items()}
        self.load_state_dict({**state, "fit_done": torch.tensor(True)})

    def fit_summary(self, s):
        ratio = s["spline_val_mse"] / max(s["pca_val_mse"], 1e-30)
        return (f"held-out MSE PCA {s['pca_val_mse']:.5f} SplinePCA {s['spline_val_mse']:.5f} (ratio {ratio:.3f}"
                f"{'' if s['kept_spline'] else ', identity spline kept'}), {s['seconds']:.1f}s")

    def storage(self):
        if not self.fitted:
            return {}
        return {"v_encode": self.encode, "v_decode": self.decode, "v_attend": self.geometry.attend}

    def encode(self, v):
        return self.geometry.compress(v)

    def decode(self, z):
        return self.geometry.decompress(z)

    def roundtrip(self, v):
        return self.geometry.roundtrip(v) if self.fitted else v

    def stored_bytes(self, dtype):
        width = self.k if self.fitted else self.head_dim
        return width * torch.empty((), dtype=dtype).element_size()


def _check_geometry_values(codec, state_dict, prefix, *args):
    """Knots, slopes and PCA that would compute NaN are refused before they load."""
    inner = prefix + "geometry."
    check_values({n[len(inner):]: t for n, t in state_dict.items() if n.startswith(inner)},
                 f"{codec.kind} codec state")


@register_codec("splinepca")
class SplinePCACodec(_Geometry):
    """KVSplice: a learned monotone spline, then PCA to k dims."""


@register_codec("pca")
class PCACodec(_Geometry):
    """Plain PCA to k dims: KVSplice's fit with the identity spline (0 epochs)."""

    spline = False


class _Quantized(VCodec):
    """KIVI-style per-token V quantization (lib.quantize.VQuantizer): codes
    plus a float16 scale and zero point per group, all in one uint8 tensor."""

    bits = None
    example = {"group_size": 8}

    def __init__(self, head_dim, group_size=32):
        super().__init__(head_dim)
        self.quant = VQuantizer(self.bits, group_size)
        check([f"head_dim {head_dim} is not divisible by group_size {group_size}"] if head_dim % group_size else [])

    def params(self):
        return {"group_size": self.quant.group_size}

    def encode(self, v):
        return self.quant.encode(v)

    def decode(self, packed):
        return self.quant.decode(packed)

    def roundtrip(self, v):
        return straight_through(v, self.quant.decode(self.quant.encode(v)).to(v.dtype))

    def stored_bytes(self, dtype):
        return self.quant.bytes_per_token(self.head_dim)


@register_codec("int8")
class Int8(_Quantized):
    bits = 8


@register_codec("int4")
class Int4(_Quantized):
    bits = 4


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
        return self.selector.attend(q, k, self.codec.roundtrip(v), dropout_p)

    def make_cache(self):
        """The decode cache of one layer: cache(q, k, v) on the new tokens -> y."""
        return self.selector.make_cache(**self.codec.storage())

    @property
    def needs_fit(self):
        """True while its codec waits for the fit it needs (the calibrator's)."""
        return self.codec.needs_fit and not self.codec.fitted

    def v_bytes(self, T, dtype=torch.float32):
        """V bytes the cache holds per (batch, head of V) after T tokens of V in `dtype`."""
        return self.selector.held_tokens(T) * self.codec.stored_bytes(dtype)


def settings_of(cls):
    """{setting: default} of a registered selector or codec: its record's fields."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if n not in ("self", "block_size", "head_dim")}


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
    return f"{v:.3f}" if isinstance(v, float) and not math.isinf(v) else str(v)

"""V-cache methods: one object per method, with three faces.

A method is a token selector (which tokens' V a query may read) composed
with a V codec (how each kept V vector is stored):

    method.attend(q, k, v, dropout_p)   full-sequence causal attention, for
                                        training and evaluation
    method.make_cache()                 its decode cache for one layer; fed the
                                        same tokens, it returns attend's outputs
    method.v_bytes(T, head_dim, dtype)  V bytes its cache holds per (batch,
                                        head) after T tokens: what a real cache
                                        measures (tests check it)
    method.record()                     a plain dict that rebuilds it:
                                        build_method(record, block_size, head_dim)

Attention holds one method (gpt2/model.py); GPTConfig.v_cache is its record,
so a checkpoint rebuilds it from one place; the ablation steps and the
benchmark are lists of records. A record:

    {"select": {"kind": "prune", "keep_ratio": 0.382, "k_min": 64, "recency": 64},
     "codec": {"kind": "splinepca", "k": 16, "knots": 7}}

Adding a method is one class registered with @register_selector or
@register_codec; tests/test_vcache.py then runs it through causality,
decode == attend, real bytes and bad input (docs/vcache.md, "Adding a method").
"""

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.kv_cache import H2OLayerCache, LayerKVCache
from lib.quantize import VQuantizer
from lib.kv_pruning import KEEP_RATIO, RandomKeep, SlidingWindow, VOnlyPruner

SELECTORS = {}  # kind -> TokenSelector subclass
CODECS = {}     # kind -> VCodec subclass
FULL = {"select": {"kind": "full"}, "codec": {"kind": "none"}}


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
        """q, k, v (B, nh, T, hs), v already through the codec -> y (B, nh, T, hs)."""
        raise NotImplementedError

    def make_cache(self, **storage):
        """The layer's decode cache, storing V as the codec's storage() says."""
        raise NotImplementedError

    def held_tokens(self, T):
        """Tokens whose V the cache holds per (batch, head) after T tokens."""
        raise NotImplementedError


@register_selector("full")
class Full(TokenSelector):
    """Every token's V (V0)."""

    def attend(self, q, k, v, dropout_p=0.0):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)

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

    def __init__(self, block_size, keep_ratio=KEEP_RATIO, k_min=64, recency=64):
        super().__init__(block_size, VOnlyPruner(keep_ratio, k_min, recency, block_size))

    def params(self):
        r = self.rule
        return {"keep_ratio": r.keep_ratio, "k_min": r.k_min, "recency": r.recency}


@register_selector("window")
class Window(KeepRule):
    """Control: only the last `window` tokens' V (keys in full)."""

    example = {"window": 6}

    def __init__(self, block_size, window=64):
        super().__init__(block_size, SlidingWindow(window, block_size))

    def params(self):
        return {"window": self.rule.recency}


@register_selector("random")
class Random(KeepRule):
    """Control for pruning: its budget and window, older tokens kept at random."""

    example = {"keep_ratio": 0.25, "k_min": 8, "recency": 4, "seed": 3}

    def __init__(self, block_size, keep_ratio=KEEP_RATIO, k_min=64, recency=64, seed=0):
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
    """How one V vector (head_dim) is stored. encode/decode are what the cache
    calls; roundtrip(v) == decode(encode(v)) in v's dtype is what training
    sees. A Module, so fitted state moves with the model."""

    kind = None
    example = {}

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

    def check(self, head_dim):
        """Raise ValueError if the codec cannot store head_dim-wide vectors."""

    def roundtrip(self, v):
        return self.decode(self.encode(v))

    def stored_bytes(self, head_dim, dtype):
        """Bytes of one stored vector when V arrives in `dtype`."""
        raise NotImplementedError


@register_codec("none")
class NoCodec(VCodec):
    """V as it is."""

    def storage(self):
        return {}

    def roundtrip(self, v):
        return v

    def stored_bytes(self, head_dim, dtype):
        return head_dim * torch.empty((), dtype=dtype).element_size()


class _Geometry(VCodec):
    """A KVSplice geometry (lib/kvsplice.py): V -> spline -> PCA_k latent.

    Fitted from V by gpt2/calibrate.py and attached frozen (attach); until
    then it stores V as it is, so bytes and outputs are those of no codec.
    """

    spline = True
    example = {"k": 4, "knots": 3}

    def __init__(self, k=16, knots=7):
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if not isinstance(knots, int) or knots < 1:
            raise ValueError(f"knots must be an int >= 1, got {knots!r}")
        self.k, self.knots = k, knots
        self.kvsplice = None  # a frozen SplinePCA, set by attach

    def params(self):
        return {"k": self.k, "knots": self.knots}

    def check(self, head_dim):
        if self.k > head_dim:
            raise ValueError(f"{self.kind}: k = {self.k} exceeds head_dim {head_dim}")

    def attach(self, splinepca):
        """Use a fitted SplinePCA, frozen; its k and knots become the record's."""
        self.k, self.knots = splinepca.k, splinepca.n_knots
        self.kvsplice = splinepca.requires_grad_(False)

    @property
    def fitted(self):
        return self.kvsplice is not None

    def storage(self):
        if not self.fitted:
            return {}
        return {"v_encode": self.encode, "v_decode": self.decode, "v_attend": self.kvsplice.attend}

    def encode(self, v):
        return self.kvsplice.compress(v)

    def decode(self, z):
        return self.kvsplice.decompress(z)

    def roundtrip(self, v):
        return v if self.kvsplice is None else self.kvsplice.roundtrip(v)

    def stored_bytes(self, head_dim, dtype):
        width = self.k if self.fitted else head_dim
        return width * torch.empty((), dtype=dtype).element_size()


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

    def __init__(self, group_size=32):
        super().__init__()
        self.quant = VQuantizer(self.bits, group_size)

    def params(self):
        return {"group_size": self.quant.group_size}

    def check(self, head_dim):
        if head_dim % self.quant.group_size:
            raise ValueError(f"{self.kind}: head_dim {head_dim} is not divisible by "
                             f"group_size {self.quant.group_size}")

    def encode(self, v):
        return self.quant.encode(v)

    def decode(self, packed):
        return self.quant.decode(packed)

    def roundtrip(self, v):
        return self.quant.decode(self.quant.encode(v)).to(v.dtype)

    def stored_bytes(self, head_dim, dtype):
        return self.quant.bytes_per_token(head_dim)


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
        """Full-sequence causal attention: q, k, v (B, nh, T, hs) -> (B, nh, T, hs)."""
        return self.selector.attend(q, k, self.codec.roundtrip(v), dropout_p)

    def make_cache(self):
        """The decode cache of one layer: cache(q, k, v) on the new tokens -> y."""
        return self.selector.make_cache(**self.codec.storage())

    def v_bytes(self, T, head_dim, dtype=torch.float32):
        """V bytes the cache holds per (batch, head) after T tokens of V in `dtype`."""
        return self.selector.held_tokens(T) * self.codec.stored_bytes(head_dim, dtype)


def _build(registry, what, spec, *args):
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"v_cache {what}: expected a dict with a 'kind', found {spec!r}")
    kind = spec["kind"]
    if kind not in registry:
        raise ValueError(f"v_cache {what}: unknown kind {kind!r}; known: {', '.join(registry)}")
    cls = registry[kind]
    allowed = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "block_size")]
    unknown = sorted(set(spec) - {"kind"} - set(allowed))
    if unknown:
        raise ValueError(f"v_cache {what} {kind!r}: unknown settings {unknown}; it takes {allowed}")
    settings = {n: v for n, v in spec.items() if n != "kind"}
    try:
        return cls(*args, **settings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"v_cache {what} {kind!r}: {e}") from None


def build_method(record, block_size, head_dim):
    """A VCacheMethod from its record; ValueError names what is wrong."""
    if not isinstance(record, dict) or set(record) != {"select", "codec"}:
        raise ValueError(f"v_cache record: expected {{'select': ..., 'codec': ...}}, found {record!r}")
    selector = _build(SELECTORS, "select", record["select"], block_size)
    codec = _build(CODECS, "codec", record["codec"])
    codec.check(head_dim)
    return VCacheMethod(selector, codec)


def describe(record):
    """A short label: 'prune(keep_ratio=0.382, k_min=64, recency=64) + splinepca(k=16, knots=7)'."""
    def part(spec):
        settings = ", ".join(f"{n}={_fmt(v)}" for n, v in spec.items() if n != "kind")
        return spec["kind"] + (f"({settings})" if settings else "")
    parts = [part(record["select"])] + ([part(record["codec"])] if record["codec"]["kind"] != "none" else [])
    return " + ".join(parts)


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) and not math.isinf(v) else str(v)

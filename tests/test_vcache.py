"""Every registered V-cache method (lib/vcache.py) through the same checks:
causality, decode through its cache == its full-sequence attention, the bytes
its real cache holds == the bytes it declares, and clear errors on bad
settings. A method registered anywhere before collection is checked too: the
two toys below are registered in this file and touch nothing else."""

import inspect

import pytest
import torch

from lib.kvsplice import SplinePCA
from gpt2.model import GPT, GPTConfig
from lib.vcache import CODECS, SELECTORS, KeepRule, VCodec, build_method, register_codec, register_selector
from lib.kv_pruning import TokenKeep

BLOCK, HS, B, NH = 40, 16, 2, 3


# ---- two toy methods: a token selector and a V codec, written here ------------------

class _EvenFirst(TokenKeep):
    """The window, plus older tokens at even positions first (latest first)."""

    def score(self, received, positions):
        return (positions % 2 == 0).to(received.dtype).expand_as(received)


@register_selector("even_first")
class EvenFirst(KeepRule):
    example = {"window": 4, "older": 6}

    def __init__(self, block_size, window=4, older=6):
        super().__init__(block_size, _EvenFirst(window + older, window, block_size))

    def params(self):
        return {"window": self.rule.recency, "older": self.rule.budget - self.rule.recency}


@register_codec("fp16")
class Float16(VCodec):
    """V stored as float16."""

    def encode(self, v):
        return v.half()

    def decode(self, h):
        return h.float()

    def roundtrip(self, v):
        return v.half().to(v.dtype)

    def stored_bytes(self, head_dim, dtype):
        return 2 * head_dim


TOYS = (_EvenFirst, EvenFirst, Float16)


def test_the_toy_methods_are_short():
    assert sum(len(inspect.getsource(cls).splitlines()) for cls in TOYS) < 40


# ---- the checks, over every registered selector x codec ---------------------------

PAIRS = [(s, c) for s in SELECTORS for c in CODECS]


def make_method(select, codec):
    record = {"select": {"kind": select, **SELECTORS[select].example},
              "codec": {"kind": codec, **CODECS[codec].example}}
    method = build_method(record, BLOCK, HS)
    if codec in ("pca", "splinepca"):  # a geometry codec needs its fitted geometry
        geometry = SplinePCA(HS, method.codec.k, method.codec.knots)
        geometry.fit(torch.randn(2000, HS, generator=torch.Generator().manual_seed(0)) ** 3,
                     epochs=1 if codec == "splinepca" else 0)
        method.codec.attach(geometry)
    return method


def qkv(T=BLOCK, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, NH, T, HS, generator=g) * 1.5 for _ in range(3)]


def decode(method, q, k, v, chunks=(5, 7)):
    """Through the method's cache: prefill chunks, then one token at a time."""
    cache, ys, t, T = method.make_cache(), [], 0, q.size(-2)
    for size in list(chunks) + [1] * T:
        if t >= T:
            break
        ys.append(cache(q[:, :, t:t + size], k[:, :, t:t + size], v[:, :, t:t + size]))
        t += size
    return torch.cat(ys, dim=-2), cache


@pytest.mark.parametrize("select, codec", PAIRS)
def test_future_tokens_do_not_change_the_past(select, codec):
    method = make_method(select, codec)
    q, k, v = qkv()
    y = method.attend(q, k, v)
    for i in (0, 9, 23, BLOCK - 2):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, i + 1:] = torch.randn(x[:, :, i + 1:].shape) * 3
        assert torch.allclose(method.attend(q2, k2, v2)[:, :, :i + 1], y[:, :, :i + 1], atol=1e-6, rtol=0), i


@pytest.mark.parametrize("select, codec", PAIRS)
def test_decode_through_the_cache_equals_attend(select, codec):
    """Exact methods: their parallel full-sequence form. Others (H2O) declare
    exact = False and are checked against their own reference, attend, which
    runs their cache over the sequence."""
    method = make_method(select, codec)
    q, k, v = qkv(seed=1)
    full = method.attend(q, k, v)
    y, cache = decode(method, q, k, v)
    assert torch.allclose(y, full, atol=1e-5, rtol=0), (y - full).abs().max()
    if select != "full" or codec != "none":  # the method changes attention: the check has teeth
        plain = build_method({"select": {"kind": "full"}, "codec": {"kind": "none"}}, BLOCK, HS).attend(q, k, v)
        assert (full - plain).abs().max() > 1e-4


@pytest.mark.parametrize("select, codec", PAIRS)
def test_real_cache_bytes_equal_declared_bytes(select, codec):
    method = make_method(select, codec)
    q, k, v = qkv(seed=2)
    for T in (3, BLOCK // 2, BLOCK):
        _, cache = decode(method, q[:, :, :T], k[:, :, :T], v[:, :, :T], chunks=(2,))
        assert cache.nbytes()["v"] == B * NH * method.v_bytes(T, HS, v.dtype), T
    rebuilt = build_method(method.record(), BLOCK, HS)
    assert rebuilt.record() == method.record()


@pytest.mark.parametrize("kind", list(SELECTORS))
def test_bad_selector_settings_are_clear_errors(kind):
    with pytest.raises(ValueError, match=rf"select '{kind}': unknown settings \['bogus'\]"):
        build_method({"select": {"kind": kind, "bogus": 1}, "codec": {"kind": "none"}}, BLOCK, HS)
    for name, value in SELECTORS[kind].example.items():
        if name != "seed":  # any integer is a seed
            with pytest.raises(ValueError, match=rf"v_cache select '{kind}': "):
                build_method({"select": {"kind": kind, **SELECTORS[kind].example, name: -1},
                              "codec": {"kind": "none"}}, BLOCK, HS)


@pytest.mark.parametrize("kind", list(CODECS))
def test_bad_codec_settings_are_clear_errors(kind):
    with pytest.raises(ValueError, match=rf"codec '{kind}': unknown settings \['bogus'\]"):
        build_method({"select": {"kind": "full"}, "codec": {"kind": kind, "bogus": 1}}, BLOCK, HS)
    for name in CODECS[kind].example:
        with pytest.raises(ValueError, match=rf"v_cache codec '{kind}': "):
            build_method({"select": {"kind": "full"}, "codec": {"kind": kind, **CODECS[kind].example, name: -1}},
                         BLOCK, HS)


def test_malformed_records_name_the_problem():
    with pytest.raises(ValueError, match="unknown kind 'nope'; known: full, prune"):
        build_method({"select": {"kind": "nope"}, "codec": {"kind": "none"}}, BLOCK, HS)
    with pytest.raises(ValueError, match="expected {'select': ..., 'codec': ...}"):
        build_method({"select": {"kind": "full"}}, BLOCK, HS)
    with pytest.raises(ValueError, match="expected a dict with a 'kind'"):
        build_method({"select": "full", "codec": {"kind": "none"}}, BLOCK, HS)
    with pytest.raises(ValueError, match="int8: head_dim 16 is not divisible by group_size 32"):
        build_method({"select": {"kind": "full"}, "codec": {"kind": "int8"}}, BLOCK, HS)
    with pytest.raises(ValueError, match="splinepca: k = 32 exceeds head_dim 16"):
        build_method({"select": {"kind": "full"}, "codec": {"kind": "splinepca", "k": 32}}, BLOCK, HS)


def test_a_toy_method_runs_in_the_model_without_touching_it():
    """Registered in this file, the toy trains (gradients flow) and generates
    through its cache exactly as its full forward computes."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=30,
                          v_cache={"select": {"kind": "even_first", "window": 3, "older": 5},
                                   "codec": {"kind": "fp16"}}))
    idx = torch.randint(0, 30, (2, 36))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.make_cache()
        parts = [model(idx[:, :6], caches=cache)[0]] + [model(idx[:, t:t + 1], caches=cache)[0]
                                                       for t in range(6, 36)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    assert cache.layers[0].v.dtype == torch.float16 and cache.layers[0].v.size(-2) == 8

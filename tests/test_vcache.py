"""Every registered V-cache method (lib/vcache.py) through the same checks:
causality, decode through its cache == its full-sequence attention, the bytes
its real cache holds == the bytes it declares, a fit that moves with the
state_dict, and clear errors on bad settings. Each check runs under
multi-head attention and under grouped-query attention (k, v at fewer heads
than q). A method registered anywhere before collection is checked too: the
toys of tests/toy_methods.py (and the example codec it imports) are
registered in the test files and touch nothing else of the project."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import toy_methods  # noqa: F401  (registers the toys)
from conftest import ROOT, importance_scores, tiny_args
from gpt2.model import GPT
from gpt2.train import train
from lib.kv_pruning import keep_mask
from lib.vcache import CODECS, SELECTORS, KeepRule, build_method, settings_of

BLOCK, HS, B = 40, 16, 2
LAYOUTS = pytest.mark.parametrize("nh, nkv", [(3, 3), (6, 2)], ids=["mha", "gqa"])  # query heads, KV heads


# ---- the checks, over every registered selector x codec ---------------------------

PAIRS = [(s, c) for s in SELECTORS for c in CODECS]


def fit_samples(seed=0):
    """Skewed V-like rows: a learned spline has something to straighten."""
    return torch.randn(2000, HS, generator=torch.Generator().manual_seed(seed)) ** 3


def make_method(select, codec):
    """The method with the registry's example settings, fitted when its codec needs a fit."""
    record = {"select": {"kind": select, **SELECTORS[select].example},
              "codec": {"kind": codec, **CODECS[codec].example}}
    method = build_method(record, BLOCK, HS)
    if method.needs_fit:
        method.codec.fit(fit_samples(), epochs=1)
    assert not method.needs_fit
    return method


def qkv(T=BLOCK, seed=0, nh=3, nkv=3):
    """q (B, nh, T, HS), k and v (B, nkv, T, HS)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, heads, T, HS, generator=g) * 1.5 for heads in (nh, nkv, nkv)]


def decode(method, q, k, v, chunks=(5, 7)):
    """Through the method's cache: prefill chunks, then one token at a time."""
    cache, ys, t, T = method.make_cache(), [], 0, q.size(-2)
    for size in list(chunks) + [1] * T:
        if t >= T:
            break
        ys.append(cache(q[:, :, t:t + size], k[:, :, t:t + size], v[:, :, t:t + size]))
        t += size
    return torch.cat(ys, dim=-2), cache


@LAYOUTS
@pytest.mark.parametrize("select, codec", PAIRS)
def test_future_tokens_do_not_change_the_past(select, codec, nh, nkv):
    method = make_method(select, codec)
    q, k, v = qkv(nh=nh, nkv=nkv)
    y = method.attend(q, k, v)
    for i in (0, 9, 23, BLOCK - 2):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, i + 1:] = torch.randn(x[:, :, i + 1:].shape) * 3
        assert torch.allclose(method.attend(q2, k2, v2)[:, :, :i + 1], y[:, :, :i + 1], atol=1e-6, rtol=0), i


@LAYOUTS
@pytest.mark.parametrize("chunks", [(5, 7), (5, 20, 1, 7), (BLOCK,)], ids=["short", "mixed", "one prefill"])
@pytest.mark.parametrize("select, codec", PAIRS)
def test_decode_through_the_cache_equals_attend(select, codec, chunks, nh, nkv):
    """Exact methods: their parallel full-sequence form. Others (H2O) declare
    exact = False and are checked against their own reference, attend, which
    runs their cache over the sequence. The sequence arrives as prefill
    chunks of the given sizes, then one token at a time."""
    method = make_method(select, codec)
    q, k, v = qkv(seed=1, nh=nh, nkv=nkv)
    full = method.attend(q, k, v)
    y, cache = decode(method, q, k, v, chunks)
    assert torch.allclose(y, full, atol=1e-5, rtol=0), (y - full).abs().max()
    # the method changes attention (it drops tokens, or stores V otherwise): the check has teeth
    if method.selector.held_tokens(BLOCK) < BLOCK or codec != "none":
        plain = build_method({"select": {"kind": "full"}, "codec": {"kind": "none"}}, BLOCK, HS).attend(q, k, v)
        assert (full - plain).abs().max() > 1e-4


@LAYOUTS
@pytest.mark.parametrize("select, codec", PAIRS)
def test_real_cache_bytes_equal_declared_bytes(select, codec, nh, nkv):
    """V bytes are per (batch, head of V): a KV head's V is held once for its query heads."""
    method = make_method(select, codec)
    q, k, v = qkv(seed=2, nh=nh, nkv=nkv)
    for T in (3, BLOCK // 2, BLOCK):
        _, cache = decode(method, q[:, :, :T], k[:, :, :T], v[:, :, :T], chunks=(2,))
        assert cache.nbytes()["v"] == B * nkv * method.v_bytes(T, v.dtype), T
    rebuilt = build_method(method.record(), BLOCK, HS)
    assert rebuilt.record() == method.record()


KEEP_RULES = [s for s in SELECTORS if issubclass(SELECTORS[s], KeepRule)]


def repeated_kv_reference(rule, q, k, v):
    """A keep rule under grouped-query attention, written with k and v repeated
    to the query heads (Hugging Face's repeat_kv): each query head's score of
    every token as multi-head attention gives it, their mean over the g query
    heads of a KV head as that head's score, its keep mask for all g of them.
    With nkv == nh this is the multi-head computation as it always was.
    Returns y (B, nh, T, hs), the keep mask (B, nkv, T, T) and the scores (B, nkv, T)."""
    B, nkv, T, hs = k.shape
    g = q.size(1) // nkv
    repeat = lambda x: x.repeat_interleave(g, dim=1)  # noqa: E731  (B, nkv, ...) -> (B, nh, ...)
    att = (q @ repeat(k).transpose(-2, -1)) * (1.0 / math.sqrt(hs))
    att = att.masked_fill_(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    received = importance_scores(F.softmax(att, dim=-1), rule.recency)  # (B, nh, T): each query head's own
    received = received.view(B, nkv, g, T).mean(2)
    scores = rule.score(received, torch.arange(T))
    keep = keep_mask(scores, rule.budget, rule.recency)  # (B, nkv, T, T)
    return F.scaled_dot_product_attention(q, repeat(k), repeat(v), attn_mask=repeat(keep)), keep, scores


@LAYOUTS
@pytest.mark.parametrize("select", KEEP_RULES)
def test_the_query_heads_of_a_group_keep_their_kv_heads_tokens(select, nh, nkv):
    """A keep rule decides per KV head, from the mean of its query heads'
    scores, and its g query heads read the values of the same tokens: the
    rule equals the repeated-k, v computation above (bit for bit with
    nkv == nh: multi-head attention computes what it always did), and the
    cache holds, per KV head, the tokens the group's last query keeps, with
    their scores."""
    method = make_method(select, "none")
    rule = method.selector.rule
    q, k, v = qkv(seed=4, nh=nh, nkv=nkv)
    want, keep, scores = repeated_kv_reference(rule, q, k, v)
    assert torch.equal(rule.keep(q, k), keep)
    y = method.attend(q, k, v)
    if nh == nkv:
        assert torch.equal(y, want)
    else:
        assert torch.allclose(y, want, atol=1e-6, rtol=0), (y - want).abs().max()
    _, cache = decode(method, q, k, v, chunks=(7,))
    held = torch.zeros_like(keep[..., -1, :]).scatter_(-1, cache.v_pos, True)  # (B, nkv, T)
    assert cache.v_pos.shape == (B, nkv, rule.budget) and torch.equal(held, keep[..., -1, :])
    old = cache.v_pos <= BLOCK - 1 - rule.recency  # scores final: out of the window
    assert torch.allclose(cache.score[old], scores.gather(-1, cache.v_pos)[old], atol=1e-6, rtol=0)


def test_under_grouped_query_attention_full_attention_is_repeated_kv_attention():
    """Full attention and a per-vector codec do not depend on the head layout:
    k and v at nkv heads give what they give repeated to the query heads."""
    q, k, v = qkv(seed=5, nh=6, nkv=2)
    for codec in ("none", "int4"):
        gqa, mha = make_method("full", codec), make_method("full", codec)
        want = mha.attend(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1))
        assert torch.allclose(gqa.attend(q, k, v), want, atol=1e-6, rtol=0)
        assert torch.allclose(decode(gqa, q, k, v)[0], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("select", list(SELECTORS))
def test_a_bad_head_layout_is_a_clear_error(select):
    """Query heads that are not a multiple of the KV heads, or k and v at
    different heads, are refused by attend and by the cache alike."""
    method = make_method(select, "none")
    q, k, v = qkv(nh=6, nkv=4)
    for run in (method.attend, method.make_cache()):
        with pytest.raises(ValueError, match="grouped-query attention needs k and v with the same number of heads, "
                                             "one that divides q's: found q 6, k 4, v 4"):
            run(q, k, v)
        with pytest.raises(ValueError, match="found q 6, k 4, v 2"):
            run(q, k, v[:, :2])


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
def test_every_codec_passes_gradients_to_v(kind):
    """Training through a codec trains what makes V: a codec that rounds (int8/int4)
    passes the gradient straight through, and its forward value is still exactly what
    its cache decodes."""
    method = make_method("full", kind)
    v = (torch.randn(2, 3, 8, HS) * 1.5).requires_grad_(True)
    codec = method.codec
    out = codec.roundtrip(v)
    out.pow(2).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert torch.equal(out.detach(), codec.decode(codec.encode(v.detach())).to(v.dtype))


@pytest.mark.parametrize("kind", list(CODECS))
def test_bad_codec_settings_are_clear_errors(kind):
    with pytest.raises(ValueError, match=rf"codec '{kind}': unknown settings \['bogus'\]"):
        build_method({"select": {"kind": "full"}, "codec": {"kind": kind, "bogus": 1}}, BLOCK, HS)
    for name in CODECS[kind].example:
        with pytest.raises(ValueError, match=rf"v_cache codec '{kind}': "):
            build_method({"select": {"kind": "full"}, "codec": {"kind": kind, **CODECS[kind].example, name: -1}},
                         BLOCK, HS)


def test_malformed_records_name_the_problem():
    with pytest.raises(ValueError, match="unknown kind 'nope'; known: full, h2o, prune"):
        build_method({"select": {"kind": "nope"}, "codec": {"kind": "none"}}, BLOCK, HS)
    with pytest.raises(ValueError, match="expected {'select': ..., 'codec': ...}"):
        build_method({"select": {"kind": "full"}}, BLOCK, HS)
    with pytest.raises(ValueError, match="expected a dict with a 'kind'"):
        build_method({"select": "full", "codec": {"kind": "none"}}, BLOCK, HS)
    with pytest.raises(ValueError, match="codec 'int8': head_dim 16 is not divisible by group_size 32"):
        build_method({"select": {"kind": "full"}, "codec": {"kind": "int8"}}, BLOCK, HS)
    with pytest.raises(ValueError, match=r"codec 'splinepca': k must be an int in \[1, head_dim = 16\], got 32"):
        build_method({"select": {"kind": "full"}, "codec": {"kind": "splinepca", "k": 32}}, BLOCK, HS)


END_TO_END = [
    {"select": {"kind": "prune", "keep_ratio": 0.382, "k_min": 8, "recency": 4}, "codec": {"kind": "int4"}},
    {"select": {"kind": "full"}, "codec": {"kind": "pca", "k": 16}},
    {"select": {"kind": "even_first", "window": 3, "older": 5}, "codec": {"kind": "centred_int8"}},
    {"select": {"kind": "sinks", "sinks": 2, "window": 6},
     "codec": {"kind": "transform", "basis": "pca", "allocate": "variance", "bits": 1.5}},
]


@pytest.mark.parametrize("record", END_TO_END, ids=lambda r: f"{r['select']['kind']}+{r['codec']['kind']}")
def test_any_method_trains_in_by_one_flag_and_generates_through_its_cache(tiny_data_dir, tmp_path, record):
    """--v-cache trains with the method in the loop (a codec that needs a fit is
    fitted at --kvsplice-calib-iter), the checkpoint rebuilds it, fitted, and
    generate decodes through its cache: greedy tokens equal the full forward's
    argmax, and the cache holds the bytes the method declares."""
    run = tmp_path / "run"
    summary = train(tiny_args(tiny_data_dir, run, "--max-iters", "8", "--kvsplice-calib-iter", "3",
                              "--kvsplice-max-batches", "2", "--kvsplice-epochs", "1",
                              "--v-cache", json.dumps(record)))
    assert summary["complete"]
    model = GPT.from_checkpoint(run / "last.pt").eval()
    expected = build_method(record, 64, 32).record()  # the record with its defaults filled in
    assert model.config.v_cache == summary["v_cache_method"] == expected
    assert not model.needs_fit()
    cache = model.make_cache()
    prompt = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, 40, top_k=1, cache=cache)
    with torch.no_grad():
        full, _ = model(out[:, :-1])
    assert torch.equal(full[:, 11:].argmax(-1), out[:, 12:])
    method = model.transformer.h[0].attn.vcache
    assert cache.nbytes()["v"] == 2 * 2 * 2 * method.v_bytes(52)  # batch x layers x heads
    assert method.v_bytes(52) < 52 * 32 * 4  # the method stores fewer V bytes than fp32 V


@pytest.mark.parametrize("kind", list(CODECS))
def test_a_codecs_fitted_state_moves_with_the_state_dict(kind):
    """Fitted, a codec's state loads into a fresh one, which then attends and
    decodes alike; a codec with a fit step that loads an unfitted state is
    unfitted again."""
    fitted = make_method("full", kind)
    record = fitted.record()
    fresh, unfitted = (build_method(record, BLOCK, HS) for _ in range(2))
    fresh.load_state_dict(fitted.state_dict())
    assert fresh.codec.fitted and not fresh.needs_fit
    q, k, v = qkv(seed=3)
    assert torch.equal(fresh.attend(q, k, v), fitted.attend(q, k, v))
    assert torch.equal(decode(fresh, q, k, v)[0], decode(fitted, q, k, v)[0])
    if CODECS[kind].needs_fit:
        assert unfitted.needs_fit and fitted.state_dict()["codec.fit_done"]
        assert not torch.equal(fresh.attend(q, k, v), unfitted.attend(q, k, v))
        fresh.load_state_dict(unfitted.state_dict())
        assert fresh.needs_fit and not fresh.codec.fitted


# ---- the contract's base behaviour, the same for every codec and selector -------

@pytest.mark.parametrize("kind", list(CODECS))
def test_every_codec_keeps_the_contract_of_its_base(kind):
    """Settings stated once (defaults -> params, record); until fitted, V is
    stored and read as it is; the fit fills in its defaults, ignores options
    it does not use and reports rows and seconds; once fitted, a write is one
    tensor of the declared bytes per vector."""
    cls = CODECS[kind]
    codec = cls(HS, **cls.example)
    assert settings_of(cls) == cls.defaults and set(cls.example) <= set(cls.defaults)
    assert codec.params() == {**cls.defaults, **cls.example}
    assert codec.record() == {"kind": kind, **codec.params()}
    assert cls(64).params() == cls.defaults  # head_dim 64: every default fits
    with pytest.raises(ValueError, match=r"unknown settings \['bogus'\]"):
        cls(HS, bogus=1)
    v = torch.randn(2, 3, 5, HS) * 1.5
    w = torch.softmax(torch.randn(2, 3, 4, 5), dim=-1)
    assert codec.fitted != cls.needs_fit
    if cls.needs_fit:  # unfitted: V as it is, in every face
        assert codec.write(v) is v and codec.roundtrip(v) is v
        assert torch.equal(codec.read(w, v), w @ v) and torch.equal(codec.values(v), v)
        assert codec.stored_bytes(torch.float32) == HS * 4 and codec.stored_bytes(torch.bfloat16) == HS * 2
        assert not codec.fit_done
    stats = codec.fit(fit_samples(), seed=1, epochs=1, lr=1e-3, unused_option=7)
    assert stats["rows"] == 2000 and isinstance(stats["seconds"], float) and stats["seconds"] >= 0
    assert codec.fitted and codec.fit_summary(stats)
    stored = codec.write(v)
    assert torch.is_tensor(stored) and stored.shape[:-1] == v.shape[:-1]
    assert stored.shape[-1] * stored.element_size() == codec.stored_bytes(v.dtype)
    assert torch.allclose(codec.read(w, stored), w @ codec.decode(stored).float(), atol=1e-5, rtol=0)
    assert torch.equal(codec.values(stored), codec.decode(stored).float())  # what a prefill's fused kernel reads
    assert set(cls.bench_sweep) <= set(cls.defaults)
    assert all(isinstance(values, tuple) for values in cls.bench_sweep.values())
    assert cls.bench_with_selectors is None or set(cls.bench_with_selectors) <= set(cls.defaults)


@pytest.mark.parametrize("kind", list(SELECTORS))
def test_every_selector_states_its_settings_once(kind):
    cls = SELECTORS[kind]
    selector = cls(BLOCK, **cls.example)
    assert settings_of(cls) == cls.defaults and set(cls.example) <= set(cls.defaults)
    assert selector.record() == {"kind": kind, **cls.defaults, **cls.example}
    assert cls.bench_role in ("method", "control", "equal_bytes", None)


def test_a_codec_without_a_fit_step_is_fitted_from_the_start():
    codec = CODECS["int8"](HS, group_size=8)
    assert codec.fitted and "fit_done" not in codec.state_dict()
    assert set(codec.fit(fit_samples())) == {"rows", "seconds"}


# ---- the documented example codec, and "a new codec is one new file" --------------

EXAMPLE = ROOT / "tests" / "example_codec.py"


def test_the_documented_example_is_the_tested_one():
    """docs/vcache.md shows tests/example_codec.py verbatim, under "Adding a method"."""
    doc = (ROOT / "docs" / "vcache.md").read_text()
    section = doc[doc.index("## Adding a method"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert block == EXAMPLE.read_text()


ONE_FILE_CHECK = """
import json
import sys

import torch

import lib.vcache
from gpt2.bench.kv_methods import planned_rows
from gpt2.cli import parse_args
from gpt2.model import GPT
from gpt2.train import train
from lib.vcache import build_method

root, data_dir = sys.argv[1:]
assert lib.vcache.__file__.startswith(root), lib.vcache.__file__
record = {"select": {"kind": "full"}, "codec": {"kind": "centred_int8"}}
summary = train(parse_args(["--data-dir", data_dir, "--dataset", "shakespeare", "--out-dir", root + "/run",
                            "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64",
                            "--batch-size", "4", "--warmup-iters", "2", "--max-iters", "6", "--eval-interval", "3",
                            "--eval-iters", "1", "--tracker", "none", "--device", "cpu",
                            "--kvsplice-calib-iter", "2", "--kvsplice-max-batches", "2",
                            "--v-cache", json.dumps(record)]))
assert summary["complete"] and summary["v_cache_method"] == record
model = GPT.from_checkpoint(root + "/run/last.pt").eval()  # the fitted state comes with the weights
assert not model.needs_fit()
prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
cache = model.make_cache()
out = model.generate(prompt, 24, top_k=1, cache=cache)
with torch.no_grad():
    full, _ = model(out[:, :-1])
assert torch.equal(full[:, 7:].argmax(-1), out[:, 8:])  # decoding through its cache equals the full forward
assert cache.nbytes()["v"] == 2 * 2 * model.transformer.h[0].attn.vcache.v_bytes(cache.length) == 2 * 2 * cache.length * 32, (cache.nbytes(), cache.length)
rows = planned_rows([8], {"keep_ratio": 0.25, "k_min": 8, "recency": 4}, 7, 1, 64, 32)
assert ("centred_int8 V", record) in rows, rows
print("ok")
"""


def test_a_new_codec_is_one_new_file(tmp_path, tiny_data_dir):
    """The documented example codec dropped into a copy of the tree's lib/codecs/,
    nothing else changed: training takes it by --v-cache (fitted at the
    calibration iteration), the checkpoint rebuilds it fitted, generate decodes
    through its cache, and the benchmark lists it."""
    for part in ("lib", "gpt2"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(EXAMPLE, tmp_path / "lib" / "codecs" / "centred_int8.py")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", ONE_FILE_CHECK, str(tmp_path), str(tiny_data_dir)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]

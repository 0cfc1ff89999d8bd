"""The compiled paths compute what the eager ones do: GPT.generate(compile=True)
runs each one-token step (every layer's cache update and attention) as one
torch.compile graph, and a SplinePCA set to compiled runs compress / decompress
as compiled kernels. Compiling takes seconds on CPU, so one small model covers
both, with a spline that is not the identity."""

import pytest
import torch
from torch._dynamo.utils import counters

from gpt2.model import GPT, GPTConfig
from lib.kvsplice import SplinePCA

V20 = {"select": {"kind": "prune", "keep_ratio": 0.25, "k_min": 8, "recency": 4},
       "codec": {"kind": "splinepca", "k": 4, "knots": 5}}


def warped_geometry(seed):
    """A fitted-looking SplinePCA whose spline is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4000, 16, generator=g) ** 3
    sp = SplinePCA(16, 4, knots=5)
    sp.spline.place_knots(X)
    with torch.no_grad():
        sp.spline.raw_slope.copy_(torch.randn(sp.spline.raw_slope.shape, generator=g) * 0.5)
    sp.spline.refresh()
    sp.pca.fit(sp.spline(X))
    assert not sp.spline.is_identity
    return sp


def pca_geometry(seed):
    """A SplinePCA with the identity spline: plain PCA."""
    sp = SplinePCA(16, 4, knots=5)
    sp.pca.fit(torch.randn(500, 16, generator=torch.Generator().manual_seed(seed)) ** 3)
    return sp


def model(record):
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=48, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()
    m.set_v_cache(record)
    geometry = {"splinepca": warped_geometry, "pca": pca_geometry}.get(record["codec"]["kind"])
    if geometry:
        for i, block in enumerate(m.transformer.h):
            block.attn.vcache.codec.set_geometry(geometry(i))
    return m


def test_compiled_kernels_equal_eager():
    sp = warped_geometry(0)
    v = torch.randn(2, 3, 10, 16) * 2
    z, back = sp.compress(v), sp.decompress(sp.compress(v))
    sp.set_compiled()
    assert torch.allclose(sp.compress(v), z, atol=1e-5, rtol=1e-5)
    assert torch.allclose(sp.decompress(z), back, atol=1e-5, rtol=1e-5)


def test_attention_weights_over_latents_equal_weights_at_the_decoded_values():
    """SplinePCA.attend(W, Z) == W @ decompress(Z), eager and compiled, for one
    query and several: with a spline, and plain PCA through the latent."""
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(2, 3, 10, 4, generator=g) * 3
    for geometry in (warped_geometry(0), pca_geometry(0)):
        compiled = torch.compile(geometry.attend, dynamic=False, fullgraph=True)
        for T in (1, 5):
            W = torch.softmax(torch.randn(2, 3, T, 10, generator=g), dim=-1)
            want = W @ geometry.decompress(Z)
            for got in (geometry.attend(W, Z), compiled(W, Z)):
                assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_compiled_decode_steps_equal_eager():
    idx = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    full_pca = {"select": {"kind": "full"}, "codec": {"kind": "pca", "k": 4, "knots": 5}}  # attend in the latent
    # exact sinks past the prefill of 6 (steps write the last two), the rest rotated int8 read through R^T once
    # (int8: a float rounding that compiled code orders otherwise moves a code by one small step, not an int2 one)
    sinks = {"select": {"kind": "sinks", "sinks": 8},
             "codec": {"kind": "rotated", "inner": {"kind": "int", "bits": 8, "group_size": 8}}}
    for record in (V20, full_pca, {"select": {"kind": "full"}, "codec": {"kind": "none"}}, sinks):
        m = model(record)
        with torch.no_grad():
            logits = {}
            for compile in (False, True):
                step = m.decode_step(compile)
                cache = m.make_cache()
                # a prefill below the budget of 12, steps that fill it, then steps that evict
                steps = [m(idx[:, :6], caches=cache)[0]]
                steps += [step(idx[:, t:t + 1], cache) for t in range(6, 40)]
                logits[compile] = torch.cat(steps, dim=1)
                assert cache.length == 40
        assert torch.allclose(logits[True], logits[False], atol=1e-4, rtol=0), record
        full, _ = m(idx)
        assert torch.allclose(logits[True], full, atol=1e-4, rtol=0)  # and the full forward
    timings = {}
    out = m.generate(idx[:, :30], 8, top_k=5, compile=True, timings=timings)
    assert out.shape == (2, 38) and timings["prefill_s"] > 0 and timings["decode_s"] > 0


def test_a_compiled_step_compiles_once_per_cache_kind():
    """Every step reuses the first step's graph: from a short prompt through a
    pruned cache that fills and then evicts, up to block_size, and after
    generate empties the cache and refills it (a recompile of GPT-2's whole
    step costs tens of seconds, and each length its own graph would defeat a
    CUDA graph). The position is a tensor and the shapes are the capacity's."""
    idx = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    for record in (V20, {"select": {"kind": "full"}, "codec": {"kind": "none"}}):
        torch._dynamo.reset()
        counters.clear()
        m = model(record)
        m.generate(idx, 70, top_k=5, compile=True)  # 48 = block_size: the cache is refilled from 24 tokens once
        assert counters["stats"]["unique_graphs"] == 1, (record, dict(counters["stats"]))


def test_compiled_step_refuses_what_it_cannot_run():
    m = model({"select": {"kind": "h2o", "budget": 10, "recency": 4}, "codec": {"kind": "none"}})
    idx = torch.randint(0, 64, (1, 8))
    with pytest.raises(ValueError, match="compile=False"):
        m.generate(idx, 2, compile=True)
    m = model({"select": {"kind": "full"}, "codec": {"kind": "none"}})
    with pytest.raises(ValueError, match="prefilled"):
        m.decode_step(compile=True)(idx[:, :1], m.make_cache())

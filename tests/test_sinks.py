"""lib/selectors/sinks.py: every token's V, the first `sinks` exact, the rest through
the codec. The registry's checks (tests/test_vcache.py) run it with every codec:
causality, decode == attend, real bytes == v_bytes, gradients."""

import pytest
import torch
import torch.nn.functional as F

from lib.kv_pruning import causal_attention
from lib.vcache import build_method

INT2 = {"kind": "int", "bits": 2, "group_size": 16}


def method(sinks, codec=INT2, block=64, head_dim=16):
    return build_method({"select": {"kind": "sinks", "sinks": sinks}, "codec": codec}, block, head_dim)


def sink_heavy_qkv(T=64, hs=16, seed=0):
    """q, k (B=1, 2 heads) whose every query puts most of its weight on position 0,
    whose V is large and far from the others: an attention sink."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, T, hs, generator=g)
    k = torch.randn(1, 2, T, hs, generator=g) * 0.3
    k[:, :, 0] = q.mean(2) * 4  # every query aligns with key 0
    v = torch.randn(1, 2, T, hs, generator=g)
    v[:, :, 0] = 6.0 * torch.randn(1, 2, hs, generator=g)
    return q, k, v


def test_the_first_tokens_are_read_exact_and_the_rest_through_the_codec():
    m = method(3)
    q, k, v = sink_heavy_qkv()
    expected_v = torch.cat([v[:, :, :3], m.codec.roundtrip(v)[:, :, 3:]], dim=-2)
    assert torch.allclose(m.attend(q, k, v), causal_attention(q, k, expected_v), atol=1e-6, rtol=0)


def test_exact_sinks_cut_the_error_of_a_sink_heavy_head():
    q, k, v = sink_heavy_qkv()
    reference = causal_attention(q, k, v)
    coded = build_method({"select": {"kind": "full"}, "codec": INT2}, 64, 16).attend(q, k, v)
    with_sinks = method(1).attend(q, k, v)
    assert F.mse_loss(with_sinks, reference) < 0.5 * F.mse_loss(coded, reference)


def test_bytes_count_the_exact_sinks_and_the_coded_rest():
    m = method(4)
    assert m.v_bytes(2) == 2 * 16 * 4  # fewer tokens than sinks: all exact, fp32
    assert m.v_bytes(64) == 4 * 16 * 4 + 60 * (16 * 2 // 8 + 4)  # 4 exact + 60 int2 (codes + scale + zero)
    assert m.v_bytes(64, torch.bfloat16) == 4 * 16 * 2 + 60 * 8
    q, k, v = sink_heavy_qkv()
    cache = m.make_cache()
    cache(q[:, :, :2], k[:, :, :2], v[:, :, :2])  # a prefill shorter than the sinks
    for t in range(2, 64):
        cache(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert cache.nbytes()["v"] == 2 * m.v_bytes(64) and cache.v_bytes_per_head() == m.v_bytes(64)
    assert torch.equal(cache.v_sinks, v[:, :, :4])  # held as they came, the steps' included


@pytest.mark.parametrize("sinks, message", [(0, "got 0"), (64, "got 64"), ("4", "got '4'")])
def test_bad_sinks_name_the_problem(sinks, message):
    with pytest.raises(ValueError, match=rf"v_cache select 'sinks': sinks must be an int in \[1, block_size = 64\), "
                                         rf"{message}"):
        method(sinks)

"""lib/selectors/sinks.py: every token's V, the first `sinks` and each query's last
`window` exact, the rest through the codec. The registry's checks (tests/test_vcache.py) run it with every codec:
causality, decode == attend, real bytes == v_bytes, gradients."""

import pytest
import torch
import torch.nn.functional as F

from lib.kv_pruning import causal_attention
from lib.vcache import build_method

INT2 = {"kind": "int", "bits": 2, "group_size": 16}


def method(sinks, codec=INT2, block=64, head_dim=16, window=0):
    return build_method({"select": {"kind": "sinks", "sinks": sinks, "window": window}, "codec": codec},
                        block, head_dim)


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


def test_a_query_reads_its_own_window_exact_and_older_tokens_through_the_codec():
    """Written out query by query: query t attends over V exact at s < sinks or
    t - s < window, coded elsewhere; the masked double attention equals it."""
    sinks, window = 2, 5
    m = method(sinks, window=window)
    q, k, v = sink_heavy_qkv(T=24)
    coded = m.codec.roundtrip(v)
    rows = []
    for t in range(24):
        exact = [s < sinks or t - s < window for s in range(t + 1)]
        vt = torch.stack([v[:, :, s] if exact[s] else coded[:, :, s] for s in range(t + 1)], dim=-2)
        att = torch.softmax(q[:, :, t:t + 1] @ k[:, :, :t + 1].transpose(-2, -1) / 4.0, dim=-1)
        rows.append(att @ vt)
    assert torch.allclose(m.attend(q, k, v), torch.cat(rows, dim=-2), atol=1e-5, rtol=0)
    assert (m.attend(q, k, v) - method(sinks).attend(q, k, v)).abs().max() > 1e-3  # the window changes it


def test_the_cache_encodes_a_token_when_it_leaves_the_window_and_holds_only_the_window_exact():
    m = method(2, window=4)
    q, k, v = sink_heavy_qkv(T=30)
    cache = m.make_cache()
    cache(q[:, :, :9], k[:, :, :9], v[:, :, :9])
    for t in range(9, 30):
        cache(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert torch.equal(cache.v_window, v[:, :, t - 3:t + 1])  # the last 4, as they came
        assert torch.equal(cache.v, m.codec.write(v[:, :, 2:t - 3]))  # the rest, coded once they left
    assert torch.equal(cache.v_sinks, v[:, :, :2])
    assert cache.v_bytes_per_head() == m.v_bytes(30) == 6 * 16 * 4 + 24 * (16 * 2 // 8 + 4)


def test_bytes_count_the_window_at_the_context():
    m = method(4, window=16)
    assert m.v_bytes(10) == 10 * 16 * 4  # every token exact
    assert m.v_bytes(64, torch.bfloat16) == 20 * 16 * 2 + 44 * 8


@pytest.mark.parametrize("sinks, window, message", [
    (-1, 0, "sinks must be an int in \\[0, block_size = 64\\), got -1"),
    (64, 0, "sinks must be an int in \\[0, block_size = 64\\), got 64"),
    ("4", 0, "sinks must be an int in \\[0, block_size = 64\\), got '4'"),
    (0, 0, "sinks \\+ window must be in \\[1, block_size = 64\\), got 0 \\+ 0 = 0"),
    (4, 60, "sinks \\+ window must be in \\[1, block_size = 64\\), got 4 \\+ 60 = 64"),
    (4, 1.5, "window must be an int in \\[0, block_size = 64\\), got 1.5"),
])
def test_bad_sinks_or_window_name_the_problem(sinks, window, message):
    with pytest.raises(ValueError, match=rf"v_cache select 'sinks': {message}"):
        method(sinks, window=window)


def test_a_compiled_fixed_shape_step_with_sinks_and_a_window_is_one_graph():
    """step(rows=None), as GPT.decode_step compiles it (fullgraph: a graph break
    fails), from a prefill shorter than the sinks through steps past the window:
    the same outputs as attend, one graph for every step. The codec is fp16:
    a compiled int codec may round a code the other way (to 1e-3, as on the
    full cache), which would hide what this checks."""
    from torch._dynamo.utils import counters
    m = method(3, window=6, codec={"kind": "fp16"})
    q, k, v = sink_heavy_qkv(T=40)
    torch._dynamo.reset()
    counters.clear()
    cache = m.make_cache()
    step = torch.compile(cache.step, dynamic=False, fullgraph=True)
    ys = [cache(q[:, :, :2], k[:, :, :2], v[:, :, :2])]
    for t in range(2, 40):
        ys.append(step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor([t])))
        cache.advance()
    assert torch.allclose(torch.cat(ys, dim=-2), m.attend(q, k, v), atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from conftest import importance_scores, qkv
from lib.kv_cache import FullLayerCache, KeepRuleLayerCache, KVCache, VStore
from lib.kv_pruning import VOnlyPruner, keep_mask
from lib.vcache import VCodec


class Projection(VCodec):
    """A fixed random orthonormal projection hs -> kdim and back (a stand-in for KVSplice)."""

    defaults = {"kdim": 6}

    def setup(self):
        g = torch.Generator().manual_seed(0)
        self.register_buffer("basis", torch.linalg.qr(torch.randn(self.head_dim, self.kdim, generator=g))[0])

    def encode(self, v):
        return v @ self.basis  # (..., kdim)

    def decode(self, stored):
        return stored @ self.basis.T

    def bytes_per_vector(self, dtype):
        return self.kdim * dtype.itemsize


def layer_cache(pruner=None, codec=None, capacity=0):
    """The keep-rule cache of `pruner`, or the full cache without one; V as it is without a codec."""
    codec = codec or VStore()
    return KeepRuleLayerCache(pruner, codec, capacity) if pruner else FullLayerCache(codec, capacity)


def buffers(cache):
    """Every tensor the cache writes in place."""
    names = ("_k_rows", "_v_rows", "_v_slots", "_pos_slots", "_score_slots")
    return [x for x in (getattr(cache, name, None) for name in names) if x is not None]


def decode(cache, q, k, v, chunks):
    """Feed the sequence in chunks of the given sizes, then one token at a time."""
    ys, t, T = [], 0, q.size(-2)
    for size in list(chunks) + [1] * T:
        if t >= T:
            break
        ys.append(cache(q[:, :, t:t + size], k[:, :, t:t + size], v[:, :, t:t + size]))
        t += size
    return torch.cat(ys, dim=-2)


def small_pruner():
    pruner = VOnlyPruner(k_min=8, recency=8, block_size=128)
    assert pruner.budget == 48
    return pruner


@pytest.mark.parametrize("capacity, buffers", [(96, 1), (0, 6)])
def test_steps_write_keys_in_place_into_one_buffer(capacity, buffers):
    """With a capacity, the first forward allocates the buffer and every step
    writes one row of it; without, it doubles when full (5, 10, 20, 40, 80, 160 rows)."""
    q, k, v = qkv(1, 2, 96, 8, seed=6)
    cache = FullLayerCache(VStore(), capacity=capacity)
    cache(q[:, :, :5], k[:, :, :5], v[:, :, :5])
    views = [cache.k]  # kept alive, so a freed buffer's address cannot come back as a new one's
    for t in range(5, 96):
        cache(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        views.append(cache.k)
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v)
    assert len({view.data_ptr() for view in views}) == buffers
    assert cache.nbytes()["k"] == cache.nbytes()["v"] == 96 * 2 * 8 * 4  # the rows held, not the buffer


@pytest.mark.parametrize("H, H_KV", [(3, 3), (6, 3)], ids=["mha", "gqa"])
@pytest.mark.parametrize("pruned", [False, True])
def test_fixed_shape_steps_equal_the_full_sequence_and_keep_their_buffers(pruned, H, H_KV):
    """step(rows=None), as a compiled decode runs it: attention over the whole
    key buffer (capacity 128 rows) with a mask, and a pruned cache over all
    its slots, free ones masked, from a prefill below the budget (48) through
    the steps that fill it and those that evict. The same outputs as the full
    sequence, written into the same memory throughout; after reset() a
    prefill refills that memory and again equals the full sequence. Under
    grouped-query attention the buffers hold the H_KV heads of k and v."""
    B, T, hs = 2, 96, 16
    q, k, v = qkv(B, H, T, hs, seed=7, scale=1.5)
    k, v = k[:, :H_KV], v[:, :H_KV]
    codec = Projection(hs)
    v_seen = codec.decode(codec.encode(v))
    pruner = small_pruner() if pruned else None
    full = pruner(q, k, v_seen) if pruned else \
        F.scaled_dot_product_attention(q, k, v_seen, is_causal=True, enable_gqa=True)
    cache = layer_cache(pruner, codec, capacity=128)
    ys = [cache(q[:, :, :5], k[:, :, :5], v[:, :, :5])]
    memory = [x.data_ptr() for x in buffers(cache)]
    assert buffers(cache)[0].shape == (B, H_KV, 128, hs)
    for t in range(5, T):
        ys.append(cache.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor([t])))
        cache.advance()
    assert torch.allclose(torch.cat(ys, dim=-2), full, atol=1e-5, rtol=0)
    assert [x.data_ptr() for x in buffers(cache)] == memory
    assert cache.length == T and cache.v_elements_per_head() == (pruner.budget if pruned else T) * 6
    cache.reset()
    assert cache.length == 0 and cache.nbytes()["total"] == 0
    assert torch.allclose(decode(cache, q, k, v, (60,)), full, atol=1e-5, rtol=0)
    assert [x.data_ptr() for x in buffers(cache)] == memory


def test_a_compiled_step_under_grouped_query_attention_is_one_graph():
    """The fixed-shape step, pruned and not, with 4 query heads on 2 KV heads,
    compiled as GPT.decode_step compiles it (fullgraph: a graph break fails),
    equals the full sequence from a prefill through the steps that evict,
    and every step reuses the first step's graph."""
    B, T, hs = 1, 64, 16
    q, k, v = qkv(B, 4, T, hs, seed=8, scale=1.5)
    k, v = k[:, :2], v[:, :2]
    for pruner in (None, small_pruner()):
        torch._dynamo.reset()
        counters.clear()
        full = pruner(q, k, v) if pruner else F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        cache = layer_cache(pruner, capacity=T)
        step = torch.compile(cache.step, dynamic=False, fullgraph=True)
        ys = [cache(q[:, :, :5], k[:, :, :5], v[:, :, :5])]
        for t in range(5, T):
            ys.append(step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor([t])))
            cache.advance()
        assert torch.allclose(torch.cat(ys, dim=-2), full, atol=1e-5, rtol=0)
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_held_tokens_are_the_full_rules_keep_set_per_head():
    """After single-token steps (slots reused in place), each head holds exactly the
    tokens the full-sequence rule keeps for the last query."""
    pruner = small_pruner()
    q, k, v = qkv(1, 4, 96, 16, seed=2, scale=1.5)
    cache = layer_cache(pruner)
    decode(cache, q[:, :, :95], k[:, :, :95], v[:, :, :95], (10,))
    att = (q[:, :, :95] @ k[:, :, :95].transpose(-2, -1) / 4).masked_fill(~torch.ones(95, 95, dtype=torch.bool).tril(), float("-inf"))
    scores = importance_scores(F.softmax(att, dim=-1), pruner.recency)
    last = keep_mask(scores, pruner.budget, pruner.recency)[0, :, -1]  # (H, 95)
    assert not cache.ordered
    for h in range(4):
        assert sorted(cache.v_pos[0, h].tolist()) == last[h].nonzero().flatten().tolist()
    assert len({tuple(sorted(p.tolist())) for p in cache.v_pos[0]}) > 1  # heads differ


def test_a_prefill_after_steps_restores_position_order():
    q, k, v = qkv(1, 4, 96, 16, seed=2, scale=1.5)
    cache = layer_cache(small_pruner())
    decode(cache, q[:, :, :90], k[:, :, :90], v[:, :, :90], (10,))
    cache(q[:, :, 90:], k[:, :, 90:], v[:, :, 90:])  # a 6-token prefill
    pos = cache.v_pos[0]
    assert cache.ordered and pos.shape == (4, 48)
    assert (pos[:, 1:] > pos[:, :-1]).all()
    assert (pos[:, -8:] == torch.arange(88, 96)).all()  # the recency window, last


def test_bf16_cache_runs_and_stays_finite():
    q, k, v = (x.bfloat16() for x in qkv(1, 2, 64, 16, seed=3))
    cache = layer_cache(small_pruner())
    y = decode(cache, q, k, v, (4,))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert cache.nbytes()["v"] == 2 * 48 * 16 * 2


@pytest.mark.parametrize("pruned, kdim, v_elements",
                         [(False, None, 65_536), (True, None, 25_024), (True, 16, 6_256)])
def test_nbytes_at_1024(pruned, kdim, v_elements):
    q, k, v = qkv(1, 1, 1024, 64, seed=4)
    cache = layer_cache(VOnlyPruner() if pruned else None, Projection(64, kdim=kdim) if kdim else None)
    cache(q[:, :, :1000], k[:, :, :1000], v[:, :, :1000])  # chunked prefill
    cache(q[:, :, 1000:], k[:, :, 1000:], v[:, :, 1000:])
    assert cache.v_elements_per_head() == v_elements
    assert cache.v_bytes_per_head() == v_elements * 4
    sizes = cache.nbytes()
    assert sizes["k"] == 1024 * 64 * 4
    assert sizes["v"] == v_elements * 4
    assert sizes["total"] == sizes["k"] + sizes["v"] + sizes["index"]
    if not pruned:
        assert sizes["index"] == 0


def test_kv_cache_container():
    cache = KVCache(2, lambda i: layer_cache(small_pruner() if i else None))
    assert len(cache) == 2 and cache.length == 0
    q, k, v = qkv(1, 2, 60, 8, seed=5)
    for layer in cache.layers:
        layer(q, k, v)
    assert cache.length == 60
    per_layer = [layer.nbytes() for layer in cache.layers]
    assert cache.nbytes()["total"] == sum(s["total"] for s in per_layer)
    assert cache[1].v_elements_per_head() == 48 * 8
    cache.reset()
    assert cache.length == 0 and cache.nbytes()["total"] == 0


def test_the_keep_rule_layers_of_a_kv_cache_share_one_book_and_decode_as_alone():
    """A KVCache keeps the bookkeeping of its keep-rule layers of one rule in
    one KeepRuleBook, run once per step after the last layer's step; each
    layer decodes exactly as a cache of its own (the same outputs, held
    positions and scores), through prefills and the steps that evict. A
    rule of other settings keeps a book of its own."""
    from lib.kv_pruning import RandomKeep

    T = 90
    cache = KVCache(4, lambda i: layer_cache(RandomKeep(k_min=48, recency=8, block_size=128) if i == 3
                                             else small_pruner()))
    alone = [layer_cache(small_pruner()) for _ in range(3)]
    assert cache[0].book is cache[2].book and len(cache[0].book.layers) == 3
    assert cache[3].book is not cache[0].book and cache[3].book.layers == [cache[3]]
    inputs = [qkv(2, 4, T, 8, seed=20 + i, scale=1.5) for i in range(4)]
    inputs = [(q, k[:, :2], v[:, :2]) for q, k, v in inputs]  # grouped-query attention: 2 KV heads
    for start, end in [(0, 10)] + [(t, t + 1) for t in range(10, 60)] + [(60, 64)] + \
            [(t, t + 1) for t in range(64, T)]:
        for i, layer in enumerate(cache.layers):
            q, k, v = (x[:, :, start:end] for x in inputs[i])
            y = layer(q, k, v)
            if i < 3:
                assert torch.equal(y, alone[i](q, k, v))
        for i in range(3):
            assert torch.equal(cache[i].v_pos, alone[i].v_pos) and torch.equal(cache[i].score, alone[i].score)
    assert cache.length == T and not cache[0].ordered


def test_the_default_layer_holds_every_tokens_v_as_it_is():
    cache = KVCache(1)
    q, k, v = qkv(1, 2, 10, 8, seed=5)
    y = cache[0](q, k, v)
    assert torch.equal(cache[0].v, v) and cache[0].v_bytes_per_head() == 10 * 8 * 4
    assert torch.allclose(y, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6, rtol=0)

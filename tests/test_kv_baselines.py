import pytest
import torch
import torch.nn.functional as F

from conftest import qkv
from lib.codecs.int import Int4, Int8
from lib.kv_cache import FullLayerCache, H2OLayerCache, KeepRuleLayerCache, VStore
from lib.kv_pruning import VOnlyPruner
from lib.quantize import BITS, VQuantizer, codes_per_block, pack_codes, unpack_codes



def sample(kind, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g)
    if kind == "offset":  # small spread far from 0: float16 rounding of the zero point matters
        return 100 + 0.1 * torch.randn(shape, generator=g)
    # heavy tails: Student-t with 2 degrees of freedom, plus a few huge outliers
    x = torch.randn(shape, generator=g) / torch.randn(shape, generator=g).abs().clamp_min(0.05)
    x.view(-1)[::97] *= 50
    return x


def stored_scale(quant, packed, hs):
    """The float16 scale of every group, broadcast to its channels: (..., hs)."""
    n_code, G = hs * quant.bits // 8, hs // quant.group_size
    scale = packed[..., n_code:n_code + 2 * G].contiguous().view(torch.float16).float()
    return scale.repeat_interleave(quant.group_size, dim=-1)


@pytest.mark.parametrize("bits", BITS)
def test_codes_pack_into_bits_per_code_and_unpack_exactly(bits):
    codes = torch.randint(0, 2 ** bits, (3, 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)
    assert 8 % codes_per_block(bits) == 0 and codes_per_block(bits) * bits % 8 == 0


def test_codes_keep_their_layout_in_planes_or_bit_strings():
    """4 bits: the first half of the codes in the low nibbles, the second in the
    high ones; 2 bits: four planes of a quarter each; 3 bits: blocks of 8 codes
    as 24-bit little-endian strings."""
    codes = torch.randint(0, 16, (4, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_codes(codes, 4), codes[..., :32] | (codes[..., 32:] << 4))
    two = codes & 3
    assert torch.equal(pack_codes(two, 2), two[..., :16] | two[..., 16:32] << 2 | two[..., 32:48] << 4 | two[..., 48:] << 6)
    assert torch.equal(pack_codes(torch.tensor([[5, 6, 7, 1, 2, 3, 4, 0]], dtype=torch.uint8), 3),
                       torch.tensor([[5 | 6 << 3 | (7 & 3) << 6, 7 >> 2 | 1 << 1 | 2 << 4 | (3 & 1) << 7,
                                      3 >> 1 | 4 << 2 | 0 << 5]], dtype=torch.uint8))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", ["normal", "heavy", "offset"])
def test_round_trip_error_is_at_most_half_a_step(bits, kind):
    quant = VQuantizer(bits, 32)
    v = sample(kind, (2, 3, 50, 64), seed=bits)
    packed = quant.encode(v)
    err = (quant.decode(packed) - v).abs()
    bound = stored_scale(quant, packed, 64) / 2 + 1e-6 * v.abs().amax(-1, keepdim=True)
    assert torch.isfinite(err).all()
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("bits,max_rel_mse", [(8, 1e-4), (4, 1e-2), (3, 4e-2), (2, 0.2)])
def test_relative_mse_on_normal_data(bits, max_rel_mse):
    v = sample("normal", (4, 12, 64, 64), seed=1)
    quant = VQuantizer(bits, 32)
    rel_mse = ((quant.decode(quant.encode(v)) - v) ** 2).mean() / (v ** 2).mean()
    assert rel_mse < max_rel_mse


@pytest.mark.parametrize("bits", BITS)
def test_constant_input_is_exact(bits):
    quant = VQuantizer(bits, 32)
    v = torch.tensor([0.0, 1.5, -3.25, 1024.0]).repeat_interleave(32).view(2, 64)
    out = quant.decode(quant.encode(v))
    assert not torch.isnan(out).any()
    assert torch.equal(out, v)
    v = torch.full((3, 64), 0.1)  # not a float16 value: exact to within the stored step
    assert (quant.decode(quant.encode(v)) - v).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_and_output(dtype):
    v = sample("normal", (2, 5, 64), seed=2).to(dtype)
    quant = VQuantizer(8, 32, out_dtype=dtype)
    packed = quant.encode(v)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 5, 72)
    out = quant.decode(packed)
    assert out.dtype == dtype and out.shape == v.shape
    assert (out.float() - v.float()).abs().max() < 0.03


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size, head_dim", [(8, 32), (32, 32), (8, 8)])
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("kind", ["normal", "offset", "heavy"])
def test_weigh_reads_the_codes_as_decoding_each_token_does(bits, group_size, head_dim, rows, kind):
    """weigh, the cache's read (scale and zero point applied to the weights for
    a few query rows, decoded first for many), equals the weights times the
    decoded values to 1e-5 of their scale (1e-5 absolute for unit-scale V);
    also where the codes take an odd number of bytes (3 bits, head_dim 8)."""
    quant = VQuantizer(bits, group_size)
    packed = quant.encode(sample(kind, (2, 3, 50, head_dim), seed=bits))
    weights = F.softmax(torch.randn(2, 3, rows, 50, generator=torch.Generator().manual_seed(rows)), dim=-1)
    decoded = quant.decode(packed)
    scale = max(1.0, decoded.abs().max().item())
    assert torch.allclose(quant.weigh(weights, packed), weights @ decoded, atol=1e-5 * scale, rtol=0)


def test_bad_arguments_fail_loudly():
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 8, got 5"):
        VQuantizer(5, 32)
    with pytest.raises(ValueError, match="a multiple of 8 for 3 bits"):
        VQuantizer(3, 12)
    with pytest.raises(ValueError, match="divisible"):
        VQuantizer(8, 32).encode(torch.randn(2, 48))
    with pytest.raises(ValueError, match="divisible"):
        VQuantizer(4, group_size=32).bytes_per_token(40)
    with pytest.raises(ValueError, match="uint8"):
        VQuantizer(8, 32).decode(torch.randn(2, 72))
    with pytest.raises(ValueError, match="packed last dim"):
        VQuantizer(8, 32).decode(torch.zeros(2, 71, dtype=torch.uint8))


@pytest.mark.parametrize("bits,nbytes", [(8, 72), (4, 40), (3, 32), (2, 24)])
def test_bytes_include_scale_and_zero_point(bits, nbytes):
    quant = VQuantizer(bits, 32)
    assert quant.bytes_per_token(64) == nbytes
    assert quant.encode(torch.randn(1, 2, 3, 64)).shape == (1, 2, 3, nbytes)
    assert VQuantizer(bits, group_size=64).bytes_per_token(64) == 64 * bits // 8 + 4


def test_cache_counts_quantized_bytes():
    q, k, v = qkv(1, 1, 1024, 64, seed=3)
    cache = FullLayerCache(Int8(64))
    cache(q, k, v)
    assert cache.nbytes()["v"] == 1024 * 72
    assert cache.nbytes()["k"] == 1024 * 64 * 4
    pruner = VOnlyPruner(block_size=1024)
    assert pruner.budget == 391
    cache = KeepRuleLayerCache(pruner, Int4(64))
    cache(q[:, :, :1000], k[:, :, :1000], v[:, :, :1000])
    for t in range(1000, 1024):  # decode steps evict through the uint8 tensor
        cache(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert cache.nbytes()["v"] == 391 * 40
    assert cache.v_elements_per_head() == 391 * 40


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_is_close_to_the_plain_cache(bits):
    q, k, v = qkv(2, 3, 96, 64, seed=4)
    quant = VQuantizer(bits, 32)
    # outputs are convex combinations of values, each off by at most its scale / 2
    tol = 0.01 if bits == 8 else stored_scale(quant, quant.encode(v), 64).max().item() / 2 + 1e-5
    plain = FullLayerCache(VStore())(q, k, v)
    cache = FullLayerCache({8: Int8, 4: Int4}[bits](64))
    ys = [cache(q[:, :, :40], k[:, :, :40], v[:, :, :40])]
    ys += [cache(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]) for t in range(40, 96)]
    y = torch.cat(ys, dim=-2)
    assert (y - plain).abs().max() < tol
    # and it is exactly attention over the dequantized values
    v_seen = quant.decode(quant.encode(v))
    full = F.scaled_dot_product_attention(q, k, v_seen, is_causal=True)
    assert torch.allclose(y, full, atol=1e-5, rtol=0)


# ---- H2O -------------------------------------------------------------------

@pytest.mark.parametrize("chunks", [(1,), (7, 1), (64,)])
def test_h2o_with_enough_budget_is_plain_attention(chunks):
    q, k, v = qkv(2, 3, 64, 16, seed=5, scale=1.5)
    cache = H2OLayerCache(budget=64, recency=8, codec=VStore())
    ys, t = [], 0
    for size in list(chunks) + [1] * 64:
        if t >= 64:
            break
        ys.append(cache(q[:, :, t:t + size], k[:, :, t:t + size], v[:, :, t:t + size]))
        t += size
    y = torch.cat(ys, dim=-2)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(y, full, atol=1e-5, rtol=0)
    assert cache.length == 64 and cache.v_pos.size(-1) == 64


@pytest.mark.parametrize("H_Q", [3, 6], ids=["mha", "gqa"])
def test_h2o_evicts_k_and_v_for_good(H_Q):
    """K and V of 3 heads, read by 3 query heads or, grouped, by 6."""
    B, H, T, hs, budget, W = 2, 3, 120, 16, 24, 6
    q, k, v = qkv(B, H_Q, T, hs, seed=6, scale=2.0)
    k, v = k[:, :H], v[:, :H]
    cache = H2OLayerCache(budget, W, codec=VStore())
    evicted = torch.zeros(B, H, T, dtype=torch.bool)
    ys = []
    for t in range(T):
        ys.append(cache(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]))
        n = min(t + 1, budget)
        assert cache.k.shape == cache.v.shape == (B, H, n, hs)
        assert cache.v_pos.shape == cache.score.shape == (B, H, n)
        held = torch.zeros(B, H, T, dtype=torch.bool).scatter_(-1, cache.v_pos, True)
        assert held.sum(-1).eq(n).all()  # n distinct positions
        assert held[..., max(0, t - W + 1):t + 1].all()  # the recency window
        assert not (held & evicted).any()  # an evicted position never reappears
        evicted |= ~held
        evicted[..., t + 1:] = False
        assert torch.equal(cache.k, k.gather(2, cache.v_pos[..., None].expand(-1, -1, -1, hs)))
        assert torch.equal(cache.v, v.gather(2, cache.v_pos[..., None].expand(-1, -1, -1, hs)))
    y = torch.cat(ys, dim=-2)
    assert torch.isfinite(y).all()
    assert (y - F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)).abs().max() > 1e-3
    assert not torch.equal(cache.v_pos[0, 0], cache.v_pos[0, 1])  # heads choose their own tokens
    nb = cache.nbytes()
    assert nb["k"] == nb["v"] == B * H * budget * hs * 4
    assert nb["index"] == B * H * budget * (8 + 4)
    assert nb["total"] == nb["k"] + nb["v"] + nb["index"]
    assert cache.v_elements_per_head() == budget * hs


def test_h2o_keeps_the_heavy_hitter():
    # token 0 is an attention sink: every query attends to it, so it is never evicted
    B, H, T, hs = 1, 1, 80, 8
    q, k, v = qkv(B, H, T, hs, seed=7, scale=0.3)
    q[..., 0] = 5.0
    k[..., 0, 0] = 5.0
    cache = H2OLayerCache(budget=10, recency=4, codec=VStore())
    cache(q, k, v)
    assert 0 in cache.v_pos.flatten().tolist()


def test_h2o_score_is_the_accumulated_attention():
    q, k, v = qkv(1, 2, 12, 8, seed=8)
    cache = H2OLayerCache(budget=12, recency=1, codec=VStore())  # nothing evicted
    cache(q, k, v)
    probs = F.softmax((q @ k.transpose(-2, -1)) / 8 ** 0.5
                      + torch.full((12, 12), float("-inf")).triu(1), dim=-1)
    assert torch.allclose(cache.score, probs.sum(-2), atol=1e-6)


def test_h2o_score_of_a_kv_head_is_the_attention_its_group_gave():
    """Under grouped-query attention a KV head's token is scored by the
    attention it received from every query of the g query heads sharing it,
    summed over them; those heads read the same held tokens."""
    q, _, _ = qkv(1, 4, 12, 8, seed=8)
    _, k, v = qkv(1, 2, 12, 8, seed=9)
    cache = H2OLayerCache(budget=12, recency=1, codec=VStore())  # nothing evicted
    y = cache(q, k, v)
    probs = F.softmax((q @ k.repeat_interleave(2, dim=1).transpose(-2, -1)) / 8 ** 0.5
                      + torch.full((12, 12), float("-inf")).triu(1), dim=-1)  # (1, 4, 12, 12)
    assert torch.allclose(cache.score, probs.sum(-2).view(1, 2, 2, 12).sum(2), atol=1e-6)
    assert torch.allclose(y, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), atol=1e-6)
    assert cache.k.shape == cache.v.shape == (1, 2, 12, 8)


def test_h2o_reset_and_bad_arguments():
    cache = H2OLayerCache(budget=4, recency=2, codec=VStore())
    cache(*qkv(1, 1, 9, 8))
    cache.reset()
    assert cache.length == 0 and cache.nbytes()["total"] == 0 and cache.v_elements_per_head() == 0
    with pytest.raises(ValueError, match="recency"):
        H2OLayerCache(budget=4, recency=5, codec=VStore())
    with pytest.raises(ValueError, match="recency"):
        H2OLayerCache(budget=4, recency=0, codec=VStore())

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import importance_scores, qkv
from lib.kv_pruning import KEEP_RATIO, VOnlyPruner, keep_budget, keep_mask, window_received
from lib.settings import BadSettings


def causal_probs(q, k):
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return F.softmax(att, dim=-1)


def test_keep_ratio_and_budget():
    assert KEEP_RATIO == pytest.approx(0.381966, abs=1e-6)
    assert keep_budget(KEEP_RATIO, 1024, 64) == 391
    assert keep_budget(KEEP_RATIO, 256, 16) == 97
    assert keep_budget(KEEP_RATIO, 64, 64) == 64  # k_min floor
    assert VOnlyPruner().budget == 391


@pytest.mark.parametrize("T", [1, 17, 256])
def test_future_tokens_do_not_change_the_past(T):
    pruner = VOnlyPruner(k_min=16, recency=16, block_size=256)
    assert pruner.budget == 97
    q, k, v = qkv(2, 3, T, 8, seed=1, scale=1.5)
    y = pruner(q, k, v)
    for i in sorted({0, T // 3, T // 2, T - 2, T - 1} - {-1}):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        g = torch.Generator().manual_seed(100 + i)
        for x in (q2, k2, v2):
            x[:, :, i + 1:] = torch.randn(x[:, :, i + 1:].shape, generator=g) * 3
        y2 = pruner(q2, k2, v2)
        assert torch.allclose(y[:, :, :i + 1], y2[:, :, :i + 1], atol=1e-6, rtol=0)
        if T > pruner.budget:  # the keep decisions themselves are causal
            m1 = keep_mask(importance_scores(causal_probs(q, k), 16), 97, 16)
            m2 = keep_mask(importance_scores(causal_probs(q2, k2), 16), 97, 16)
            assert torch.equal(m1[:, :, :i + 1], m2[:, :, :i + 1])


def test_pruning_is_active_at_256():
    q, k, v = qkv(1, 2, 256, 8, seed=2)
    mask = keep_mask(importance_scores(causal_probs(q, k), 16), 97, 16)
    assert (mask[..., -1, :].sum(-1) == 97).all()
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    pruned = VOnlyPruner(k_min=16, recency=16, block_size=256)(q, k, v)
    assert (pruned[..., 97:, :] - plain[..., 97:, :]).abs().max() > 1e-3


@pytest.mark.parametrize("tie_levels", [None, 3])
def test_kept_count_is_min_of_position_and_budget(tie_levels):
    g = torch.Generator().manual_seed(3)
    B, H, T, budget, W = 2, 3, 200, 50, 8
    if tie_levels is None:
        scores = torch.rand(B, H, T, generator=g)
    else:  # heavy ties: the order must still be total
        scores = torch.randint(0, tie_levels, (B, H, T), generator=g).float()
    counts = keep_mask(scores, budget, W).sum(-1)  # (B, H, T)
    expected = torch.clamp(torch.arange(T) + 1, max=budget)
    assert torch.equal(counts, expected.expand(B, H, T))


def test_keep_count_391_at_1024():
    pruner = VOnlyPruner()
    q, k, _ = qkv(1, 1, 1024, 64, seed=4)
    mask = keep_mask(importance_scores(causal_probs(q, k), pruner.recency),
                     pruner.budget, pruner.recency)
    assert mask[0, 0, -1].sum().item() == 391
    assert mask[0, 0, -1, -64:].all()  # the recency window is always kept


def test_mask_matches_a_literal_per_query_top_k():
    g = torch.Generator().manual_seed(5)
    T, budget, W = 64, 10, 4
    scores = torch.randint(0, 6, (1, 2, T), generator=g).float()  # many ties
    mask = keep_mask(scores, budget, W)
    for h in range(2):
        for i in range(T):
            old = list(range(0, i - W + 1))
            # higher score first; ties: the more recent index wins
            top = sorted(old, key=lambda j: (scores[0, h, j].item(), j), reverse=True)
            kept = set(top[:budget - W]) | set(range(max(0, i - W + 1), i + 1))
            assert set(torch.nonzero(mask[0, h, i]).flatten().tolist()) == kept


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 150), W=st.integers(1, 12), slots=st.integers(0, 70), levels=st.integers(1, 9),
       seed=st.integers(0, 2 ** 16))
def test_mask_matches_a_literal_per_query_top_k_at_any_length(T, W, slots, levels, seed):
    """The same literal check at lengths across the ranking's blocks of 64
    candidates (a partial last block, several blocks), with ties."""
    g = torch.Generator().manual_seed(seed)
    budget = W + slots
    scores = torch.randint(0, levels, (1, 1, T), generator=g).float()
    mask = keep_mask(scores, budget, W)[0, 0]
    rank = sorted(range(T), key=lambda j: (scores[0, 0, j].item(), j), reverse=True)  # best first
    for i in range(T):
        old = set(range(0, i - W + 1))
        top = [j for j in rank if j in old][:slots]
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == set(top) | set(range(max(0, i - W + 1), i + 1))


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("t0", [0, 5, 40])
def test_window_received_sums_the_queries_of_each_keys_window(groups, t0):
    """window_received, summed along diagonals, equals the masked sum over the
    query rows of every key's window, for a first prefill and later ones; on
    a first prefill it is importance_scores times the window."""
    T, W = 30, 8
    t = t0 + T
    probs = torch.rand(2, 2, groups * T, t, generator=torch.Generator().manual_seed(t0))
    lag = torch.arange(t0, t).repeat(groups)[:, None] - torch.arange(t)[None, :]  # query - key
    expected = probs.masked_fill(~((lag >= 0) & (lag < W)), 0.0).sum(-2)
    assert torch.allclose(window_received(probs, t0, W, groups), expected, atol=1e-5, rtol=0)
    if t0 == 0:
        per_group = importance_scores(probs.view(2, 2, groups, T, T), W).sum(2) * W
        assert torch.allclose(window_received(probs, 0, W, groups), per_group, atol=1e-5, rtol=0)


def test_an_evicted_token_never_returns():
    W, budget, T = 16, 97, 256
    q, k, _ = qkv(2, 3, T, 8, seed=6, scale=1.5)
    mask = keep_mask(importance_scores(causal_probs(q, k), W), budget, W)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    old = j <= i - W
    dropped = (~mask & old).int()  # (B, H, T, T)
    assert dropped.any()
    assert torch.equal(dropped.cummax(dim=-2).values, dropped)


def test_short_sequences_keep_everything():
    pruner = VOnlyPruner(k_min=16, recency=16, block_size=256)  # budget 97
    for T in (1, 5, 97):
        q, k, v = qkv(2, 3, T, 8, seed=7, scale=2.0)
        y = pruner(q, k, v)
        assert torch.allclose(y, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                              atol=1e-6, rtol=0)
        assert torch.isfinite(y).all()
    scores = torch.rand(1, 1, 97)
    assert torch.equal(keep_mask(scores, 97, 16)[0, 0], torch.ones(97, 97, dtype=torch.bool).tril())


def test_no_nan_with_extreme_logits():
    pruner = VOnlyPruner(k_min=16, recency=16, block_size=256)
    q, k, v = qkv(1, 2, 256, 8, seed=8, scale=30.0)  # softmax saturates, P underflows to 0
    y = pruner(q, k, v)
    assert torch.isfinite(y).all()


def test_bf16_and_gradients():
    pruner = VOnlyPruner(k_min=16, recency=16, block_size=256)
    q, k, v = (x.bfloat16() for x in qkv(2, 2, 200, 16, seed=9))
    y = pruner(q, k, v)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    ref = pruner(q.float(), k.float(), v.float())  # same mask: the ranking is fp32 inside
    assert torch.allclose(y.float(), ref, atol=2e-2, rtol=0)

    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 200, 8, seed=10))
    pruner(q, k, v, dropout_p=0.1).sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (q, k, v))


@pytest.mark.parametrize("H_Q", [3, 6], ids=["mha", "gqa"])
def test_output_and_gradients_are_the_softmax_over_the_kept_logits(H_Q):
    """The fused attention is the literal formula: each query's softmax over
    the logits of the values it keeps, times those values, and so are its
    gradients (the selection itself has none). Grouped (6 query heads on the
    3 heads of k and v), a query keeps what its KV head keeps, by the mean
    of the group's scores, and k, v gather the gradients of their group."""
    pruner = VOnlyPruner(k_min=16, recency=16, block_size=256)
    q, k, v = qkv(2, H_Q, 200, 16, seed=11, scale=1.5)
    q, k, v = (x.requires_grad_() for x in (q, k[:, :3], v[:, :3]))
    w = torch.randn(2, H_Q, 200, 16, generator=torch.Generator().manual_seed(12))
    y = pruner(q, k, v)
    grads = torch.autograd.grad((y * w).sum(), (q, k, v))

    g = H_Q // 3
    k_rep, v_rep = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # as Hugging Face's repeat_kv
    scores = importance_scores(causal_probs(q.detach(), k_rep.detach()), 16).view(2, 3, g, 200).mean(2)
    keep = keep_mask(scores, 97, 16).repeat_interleave(g, dim=1)
    assert (keep[..., 97:, :].sum(-1) == 97).all()  # pruning engaged: rows past the budget keep 97
    att = (q @ k_rep.transpose(-2, -1)) / 16 ** 0.5
    ref = F.softmax(att.masked_fill(~keep, float("-inf")), dim=-1) @ v_rep
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert torch.allclose(y, ref, atol=1e-5, rtol=0)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4, rtol=0)


def test_bad_configuration_fails_loudly():
    with pytest.raises(ValueError, match=r"recency 64 exceeds the keep budget 12 \(max\(k_min, block_size 32"):
        VOnlyPruner(k_min=8, recency=64, block_size=32)
    with pytest.raises(BadSettings) as bad:
        VOnlyPruner(keep_ratio=1.5, k_min=-1, recency=0)
    assert bad.value.problems == ["keep_ratio must be in (0, 1], got 1.5", "k_min must be an int >= 0, got -1",
                                  "recency must be an int >= 1, got 0"]
    with pytest.raises(ValueError, match="block_size"):
        VOnlyPruner(k_min=16, recency=16, block_size=64)(*qkv(1, 1, 65, 4))

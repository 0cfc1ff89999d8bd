"""V-only KV pruning: keys stay in full, values only for the important tokens.

Every query still scores every key it may see, but only the tokens it keeps
contribute values; its attention weights are renormalised over them. The
memory saved is V only.

The rule, with a recency window W and a per-layer budget fixed by block_size
(not by the current T, so a decoder knows it in advance):

    query i keeps the values of
      - its recency window, tokens i-W+1 .. i, and
      - the top (budget - W) "old" tokens j <= i-W by importance score,
        ties going to the more recent token.

The importance of token j is the attention it received from the W queries of
its recency window, under the full-key causal softmax P (keys are never
pruned, so P is the same in training and in the decode cache), divided by its
exposure W (the number of queries that saw it while in the window):

    score[j] = sum_{q=j}^{j+W-1} P[q, j] / W

Why a score that is final once the token leaves the window, rather than an
H2O-style running sum over all later queries: a running sum keeps changing,
so a training-time top-k at query i could pick a token that a decode cache
had already evicted at an earlier step, and training would use values that
decoding no longer has. Here score[j] is final from query j+W on (all W
queries that can add to it have run), old scores never change, and the set
of old candidates {0 .. i-W} only grows. The top-k of a growing set of fixed
scores is exactly what a cache gets by keeping a top-k and dropping the loser
of every arrival for good: a token that falls out never comes back. So the
training mask below and lib/kv_cache.py agree token for token.

Causality: for an old token j <= i-W, score[j] reads P rows j .. j+W-1 <= i-1,
and row q of P reads keys <= q only. The keep decision for query i therefore
depends on tokens < i; the output at i depends on tokens <= i.

Cost: the full-sequence path builds P, the keep mask and a (T, T) comparison
matrix per (batch, head), without gradients: O(B * nh * T^2) memory, the
same order as the attention matrix of a non-flash attention. The attention
itself is one fused kernel under the keep mask, which keeps only the mask
for backward. At T = 1024 that is fine on a GPU (about 4 MiB of fp32 per
(batch, head) for P, plus 5 MiB for the ranking); if it is not, call the
rule's forward on slices of the KV heads (each with its query heads), since
they are independent.

The same keep rule with another final score gives the controls a ranking
needs (TokenKeep below): SlidingWindow (no older tokens at all) and
RandomKeep (pruning's budget, older tokens by a fixed hash of position).

Grouped-query attention (Hugging Face's repeat_kv convention): q has nh
heads, k and v have nkv, nh a multiple of nkv, and query head h reads KV
head h // g, g = nh // nkv. The cache holds V per KV head, so the rule
decides per KV head: the g query heads that share a V keep the same tokens.
A token's score for a KV head is the mean over its g query heads of the
score each would give it; for V-only pruning, the attention it received
from the g * W queries of its window divided by that exposure:

    score[kv, j] = sum_{h in group kv} sum_{q=j}^{j+W-1} P[h, q, j] / (g * W)

It reads the same rows of P as one head's score, so it is final from query
j+W on and causal, and everything above holds per KV head. With nkv == nh
(g = 1) it is the score above, and the results are those of plain multi-head
attention bit for bit.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.settings import check

GOLDEN_RATIO = (1 + math.sqrt(5)) / 2
KEEP_RATIO = 1 / (1 + GOLDEN_RATIO)  # 0.381966...: 391 of 1024 tokens
K_MIN = 64  # never keep fewer values than this
RECENCY = 64  # the recency window: the most recent tokens always kept
NEVER = torch.iinfo(torch.long).max  # eviction position of a token never evicted


def kv_groups(q, k, v=None):
    """g, the query heads per KV head, of q (B, nh, T, hs) and k, v (B, nkv, T', hs);
    a ValueError unless nh is a multiple of nkv and k, v agree."""
    nh, nkv = q.size(1), k.size(1)
    if nh % nkv or (v is not None and v.size(1) != nkv):
        found = f"q {nh}, k {nkv}" + ("" if v is None else f", v {v.size(1)}")
        raise ValueError(f"grouped-query attention needs k and v with the same number of heads, "
                         f"one that divides q's: found {found}")
    return nh // nkv


def by_kv_head(q, nkv):
    """(B, nh, T, hs) -> (B, nkv, g * T, hs): the rows of the g query heads that
    share a KV head, head after head, so one matmul per KV head serves the group.
    A view when g == 1 (or q is contiguous)."""
    return q.unflatten(1, (nkv, -1)).flatten(2, 3)


def by_query_head(y, T):
    """by_kv_head's inverse: (B, nkv, g * T, hs) -> (B, nh, T, hs)."""
    return y.unflatten(2, (-1, T)).flatten(1, 2)


def causal_attention(q, k, v, dropout_p=0.0):
    """Plain (flash) causal attention, q (B, nh, T, hs) and k, v (B, nkv, T, hs)
    -> (B, nh, T, hs), k and v not repeated to nh heads. With nkv == nh the
    kernel call is the multi-head one: enable_gqa only when there are groups."""
    g = kv_groups(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=g > 1)


def keep_budget(keep_ratio, block_size, k_min):
    """V vectors kept per (batch, head) per layer: fixed by block_size, not by T."""
    return max(k_min, int(block_size * keep_ratio))


def eviction_positions(scores, positions, slots):
    """For each candidate token, the query-side position at which it drops out.

    scores: (B, nh, C); positions: (C,) or (B, nh, C), increasing along C.
    Candidate o beats candidate c if it has a higher score, or an equal score
    and a later position (a total, deterministic order). Returns (B, nh, C):
    the position of the slots-th candidate that beats c, or NEVER. An old
    token c is among the top `slots` of the old tokens {positions <= p} iff
    p < eviction_positions[c]; the number of tokens beating it only grows
    with p, so once it drops out it never returns. With no slots, a token
    drops out at its own position: as soon as it is old.
    """
    positions = positions.expand_as(scores)
    if slots <= 0:
        return positions
    # the order as one rank: a stable sort by score keeps equal scores in
    # position order, so o beats c iff rank[o] > rank[c] (one (C, C) pass, not five)
    rank = scores.argsort(dim=-1, stable=True).argsort(dim=-1)
    first = _kth_true(rank, slots)  # (B, nh, C): index of the slots-th candidate beating c, C if none
    never = positions.new_full(positions.shape[:-1] + (1,), NEVER)
    return torch.cat([positions, never], dim=-1).gather(-1, first)


_BLOCK = 64  # candidates counted per block by _kth_true


def _kth_true(rank, k):
    """(..., C) a permutation of 0 .. C-1 per row -> (..., C): for each c, the index
    of the k-th o (in index order) with rank[o] > rank[c], or C if there are fewer.

    The (C, C) comparison is counted per block of _BLOCK candidates, the
    block holding the k-th found by a binary search over the blocks' running
    counts, and only that block's _BLOCK bools summed in full: one pass over
    the comparison instead of a running count over it (four times its bytes
    in int32)."""
    C = rank.size(-1)
    pad = -C % _BLOCK
    padded = F.pad(rank, (0, pad), value=-1) if pad else rank  # padding never beats anyone
    beats = padded.unsqueeze(-2) > rank.unsqueeze(-1)  # (..., C, C + pad): [c, o]
    blocks = beats.view(*beats.shape[:-1], -1, _BLOCK)
    # (..., C, blocks): beating ones up to each block's end (a block's count fits a byte: no int32 copy of the bools)
    upto = blocks.view(torch.uint8).sum(-1, dtype=torch.uint8).to(torch.int32).cumsum_(-1)
    n_blocks = upto.size(-1)
    target = torch.full(upto.shape[:-1] + (1,), k, dtype=upto.dtype, device=upto.device)
    block = torch.searchsorted(upto, target)  # (..., C, 1): the block of the k-th, n_blocks if none
    found = block < n_blocks
    block = block.clamp(max=n_blocks - 1)
    before = upto.gather(-1, (block - 1).clamp(min=0)).masked_fill(block == 0, 0)
    inside = blocks.gather(-2, block[..., None].expand(*block.shape, _BLOCK)).squeeze(-2)
    offset = torch.searchsorted(inside.to(torch.int32).cumsum_(-1), target - before)
    return torch.where(found, block * _BLOCK + offset, C).squeeze(-1)


def kept_until(scores, budget, recency, key_pos):
    """(B, nh, C): each candidate's value is kept by the queries at positions
    key_pos .. kept_until - 1 (its recency window, then as long as it is among
    the top (budget - recency) old tokens). scores and key_pos as in keep_mask."""
    evict = eviction_positions(scores, key_pos, budget - recency)  # old and in the top set while p < evict
    # recent (p < key_pos + recency) or among the top (p - recency < evict)
    return torch.maximum(key_pos.expand_as(evict), evict).clamp(max=NEVER - recency) + recency


def keep_mask(scores, budget, recency, key_pos=None, query_pos=None):
    """Which values each query keeps: (B, nh, Tq, C) bool, causal.

    scores: (B, nh, C) importance of the candidate keys at key_pos ((C,) or
    (B, nh, C), increasing; default 0 .. C-1), for queries at query_pos ((Tq,);
    default 0 .. C-1). The candidates must include every old token that could
    still be in some query's top set. Each row keeps min(i+1, budget) tokens
    when the candidates are all tokens 0 .. i.
    """
    if key_pos is None:
        key_pos = torch.arange(scores.size(-1), device=scores.device)
    if query_pos is None:
        query_pos = key_pos
    until = kept_until(scores, budget, recency, key_pos)[..., None, :]  # (.., 1, C)
    query_pos = query_pos[:, None]  # (Tq, 1)
    return (key_pos[..., None, :] <= query_pos) & (query_pos < until)


def window_received(probs, t0, recency, groups):
    """The attention each key received from the queries of its recency window,
    summed over the query rows: probs (B, nkv, groups * T, t) of T queries at
    positions t0 .. t0 + T - 1 (each of `groups` query heads, rows j * T + i)
    over keys 0 .. t - 1 -> (B, nkv, t). A query at position p counts for the
    keys p - recency + 1 .. p. Summed one lag at a time along the diagonals:
    recency small ops, not a masked pass over the (T, t) probabilities."""
    B, nkv, rows, t = probs.shape
    T = rows // groups
    p = probs.view(B, nkv, groups, T, t)
    out = probs.new_zeros(B, nkv, t)
    for lag in range(min(recency, t)):
        start = max(0, t0 - lag)  # the first query's key, or key 0 for the queries that reach it
        d = torch.diagonal(p, offset=t0 - lag, dim1=-2, dim2=-1)  # (B, nkv, groups, n): query i, key i + t0 - lag
        out[..., start:start + d.size(-1)].add_(d[:, :, 0] if groups == 1 else d.sum(2))
    return out


class TokenKeep(nn.Module):
    """Causal attention, keys in full, in which each query keeps the values
    of its recency window plus the top (budget - recency) older tokens by
    `score`, a score final once a token leaves the window.

    Subclasses choose the score (V-only pruning: the attention a token
    received in its window; a random control: a hash of its position) and
    the budget. lib/kv_cache.py evicts by the same rule, so any subclass
    trains and decodes alike.
    """

    def __init__(self, budget, recency, block_size):
        super().__init__()
        check([f"recency must be >= 1, got {recency}"] if recency < 1 else
              [f"keep budget {budget} is smaller than the recency window {recency}"] if budget < recency else [])
        self.budget, self.recency, self.block_size = budget, recency, block_size

    def extra_repr(self):
        return f"budget={self.budget}, recency={self.recency}, block_size={self.block_size}"

    def score(self, received, positions):
        """Final scores (B, nkv, C) of tokens at `positions` ((C,) or (B, nkv, C))
        that left the window, from `received` (B, nkv, C): the attention each
        got from the queries of its window (W positions of each of the g query
        heads of its KV head), divided by that exposure g * W."""
        return received

    def forward(self, q, k, v, dropout_p=0.0):
        """q (B, nh, T, hs), k, v (B, nkv, T, hs) -> y (B, nh, T, hs) in q's dtype."""
        T = q.size(-2)
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}")
        if T <= self.budget:  # every query keeps everything: plain (flash) attention
            return causal_attention(q, k, v, dropout_p)
        g = kv_groups(q, k, v)
        keep = self.keep(q, k)  # (B, nkv, T, T)
        # each KV head attends for its g query heads at once, as g * T query
        # rows under their shared mask: k and v are never repeated, and a
        # masked fused kernel serves any head layout.
        # softmax over the kept logits == P * keep renormalised, and never 0/0
        # (the diagonal is always kept); the fused kernel keeps no (T, T)
        # probabilities for backward, only the mask
        rows_keep = keep.unsqueeze(2).expand(-1, -1, g, -1, -1).flatten(2, 3)  # (B, nkv, g * T, T)
        y = F.scaled_dot_product_attention(by_kv_head(q, k.size(1)), k, v.to(q.dtype), attn_mask=rows_keep,
                                           dropout_p=dropout_p)
        return by_query_head(y, T)

    @torch.no_grad()  # the selection is discrete: no gradient through it
    def keep(self, q, k):
        """Which values each KV head's queries keep, (B, nkv, T, T) bool, from
        q (B, nh, T, hs) and k (B, nkv, T, hs). In fp32 whatever the autocast:
        the ranking compares scores, and the decode cache must rank them the
        same way."""
        B, nkv, T, hs = k.shape
        g = kv_groups(q, k)
        with torch.autocast(q.device.type, enabled=False):
            att = by_kv_head(q.float(), nkv) @ k.float().transpose(-2, -1) * (1.0 / math.sqrt(hs))  # (B, nkv, g*T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            att = att.view(B, nkv, g, T, T).masked_fill_(~causal, float("-inf"))
            # the group's score: the mean of its query heads' window sums, over the exposure
            received = window_received(F.softmax(att, dim=-1).flatten(2, 3), 0, self.recency, g) / (g * self.recency)
            del att
            pos = torch.arange(T, device=q.device)
            return keep_mask(self.score(received, pos), self.budget, self.recency)


class VOnlyPruner(TokenKeep):
    """V-only pruning: each query keeps the values of `budget` tokens, the
    recency window and the older tokens that received the most attention."""

    def __init__(self, keep_ratio=KEEP_RATIO, k_min=K_MIN, recency=RECENCY, block_size=1024):
        problems = []
        if not (isinstance(keep_ratio, (int, float)) and 0 < keep_ratio <= 1):
            problems.append(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if not isinstance(k_min, int) or k_min < 0:
            problems.append(f"k_min must be an int >= 0, got {k_min}")
        if not isinstance(recency, int) or recency < 1:
            problems.append(f"recency must be an int >= 1, got {recency}")
        check(problems)
        budget = keep_budget(keep_ratio, block_size, k_min)
        check([f"recency {recency} exceeds the keep budget {budget} (max(k_min, block_size {block_size} x "
               f"keep_ratio {keep_ratio:.4f})); raise k_min or lower recency"] if budget < recency else [])
        super().__init__(budget, recency, block_size)
        self.keep_ratio, self.k_min = keep_ratio, k_min


class SlidingWindow(TokenKeep):
    """The control that keeps only the last `window` tokens' values (keys in full)."""

    def __init__(self, window, block_size=1024):
        check([] if isinstance(window, int) and window >= 1 else [f"window must be an int >= 1, got {window}"])
        super().__init__(window, window, block_size)


_HASH_MOD = 2147483647  # 2^31 - 1, prime: (a * x) % p permutes 1 .. p-1


class RandomKeep(TokenKeep):
    """The control for pruning: the same budget and recency window, but the
    older tokens kept are chosen at random (a fixed hash of seed, KV head and
    position, so training and the decode cache draw the same tokens, and the
    query heads sharing a KV head the same ones)."""

    def __init__(self, keep_ratio=KEEP_RATIO, k_min=K_MIN, recency=RECENCY, block_size=1024, seed=0):
        check([] if isinstance(seed, int) else [f"seed must be an int, got {seed!r}"])
        pruner = VOnlyPruner(keep_ratio, k_min, recency, block_size)  # the same checks and budget
        super().__init__(pruner.budget, recency, block_size)
        self.keep_ratio, self.k_min, self.seed = keep_ratio, k_min, seed

    def extra_repr(self):
        return f"{super().extra_repr()}, seed={self.seed}"

    def score(self, received, positions):
        heads = torch.arange(received.size(1), device=received.device)[:, None]  # (nkv, 1)
        h = (positions.long() * 1103515245 + heads * 2654435 + 12345 + self.seed * 69069) % _HASH_MOD
        h = (h * 48271) % _HASH_MOD
        return (h.double() / _HASH_MOD).to(received.dtype).expand_as(received)

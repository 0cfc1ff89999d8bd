"""The inference KV cache that really stores fewer bytes.

One LayerKVCache per attention layer. Keys are kept in full. V is stored as
v_encode(v) (a KVSplice latent, int8 codes, or V itself) and read back
through v_decode. With a token selector (lib.kv_pruning.TokenKeep: V-only
pruning, a sliding window, a random keep), only the values of kept tokens
are held, at most selector.budget per (batch, head), and a token is evicted
for good by the rule in lib/kv_pruning.py: the recency window plus the top
(budget - W) older tokens by selector.score, final once the token leaves the
window.

A prefill of several tokens ranks the candidates (the held old tokens plus
the tail: window + new tokens) with lib.kv_pruning.keep_mask per query; a
one-token step is its incremental form (at most one token changes status).
Either way the result is the full-sequence selector.forward on
v_decode(v_encode(v)), up to float rounding (see the caveat in the tests: an
exact near-tie between two scores may be ordered differently when rounding
differs).

Layout of a pruned layer, per (batch, head):
    v      (B, nh, n, kdim)  held values (old kept tokens and the window)
    v_pos  (B, nh, n)        their positions (heads hold different tokens)
    score  (B, nh, n)        an old token's final score; a window token's
                             attention received so far
with n = min(t, budget) for every (batch, head), so the tensors stay dense.
A prefill leaves them in position order. Once the cache is full, a step
writes the new token into the slot of the token it evicts, in place, so the
order is lost (attention does not depend on it); the next prefill sorts
them back first.

Keys (and V without a token selector, which holds every token) live in a
buffer allocated at the first forward for `capacity` tokens (the model's
block_size: a cache never holds more) plus one spare row; a step writes
its token into the next row, in place, instead of copying the whole cache
into a longer one. self.k / self.v are views of the rows written, and
nbytes() counts those. Past capacity the buffer doubles.
"""

import math

import torch
import torch.nn.functional as F

from lib.kv_pruning import keep_mask


def _identity(v):
    return v


class LayerKVCache:
    """Keys in full, values encoded and (with a token selector) only for kept tokens."""

    def __init__(self, selector=None, v_encode=None, v_decode=None, capacity=0):
        if (v_encode is None) != (v_decode is None):
            raise ValueError("v_encode and v_decode come as a pair: got only one of them")
        self.selector = selector
        self.capacity = capacity  # tokens the buffers are allocated for at the first forward
        self.v_encode = v_encode or _identity
        self.v_decode = v_decode or _identity
        self.reset()

    def reset(self):
        self.length = 0      # tokens seen
        self.k = None        # (B, nh, t, hs) every key: a view of the first t rows of _k_rows
        self._k_rows = self._v_rows = None  # the buffers (B, nh, capacity, *)
        self.v = None        # (B, nh, n, kdim) encoded values held
        self.v_pos = None    # (B, nh, n) their positions (pruning only)
        self.score = None    # (B, nh, n) final score (old tokens) or attention received (window)
        self.ordered = True  # v, v_pos, score in position order

    def __call__(self, q, k, v):
        return self.forward(q, k, v)

    def forward(self, q, k, v):
        """q, k, v: (B, nh, T_new, hs) for the new tokens -> y (B, nh, T_new, hs)."""
        with torch.autocast(q.device.type, enabled=False):  # fp32 scores, as in training
            t0 = self.length
            t = t0 + q.size(-2)
            self._k_rows = self._write(self._k_rows, k, t0)
            self.k = self._k_rows[:, :, :t]
            self.length = t
            v_new = self.v_encode(v)  # (B, nh, T_new, kdim)
            if self.selector is None:
                self._v_rows = self._write(self._v_rows, v_new, t0)
                self.v = self._v_rows[:, :, :t]
                att = F.softmax(self._logits(q, t0), dim=-1)
                return (att @ self.v_decode(self.v).float()).to(q.dtype)
            if q.size(-2) == 1 and self.v is not None:
                return self._step(q, v_new, t0)
            return self._attend_pruned(q, v_new, t0)

    def _write(self, rows, x, t0):
        """x (B, nh, T_new, d) into rows t0.. of the buffer `rows`, in place; a
        buffer is allocated (or, when full, doubled) first. One row is always
        spare: a view of the rows written is then never the whole buffer, so a
        compiled step sees the same kind of (non-contiguous) view at every
        length, and the last step before capacity does not recompile."""
        t = t0 + x.size(-2)
        if rows is None or rows.size(-2) <= t:
            grown = x.new_empty(x.shape[:-2] + (max(t, self.capacity, 2 * t0) + 1, x.size(-1)))
            if rows is not None:
                grown[:, :, :t0] = rows[:, :, :t0]
            rows = grown
        rows[:, :, t0:t] = x
        return rows

    def _logits(self, q, t0):
        """(B, nh, T_new, t) scaled q.k over every key, causal."""
        T, t = q.size(-2), self.k.size(-2)
        att = (q.float() @ self.k.float().transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
        if T == 1:  # one query sees every key
            return att
        query_pos = torch.arange(t0, t0 + T, device=q.device)
        key_pos = torch.arange(t, device=q.device)
        return att.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))

    def _step(self, q, v_new, t0):
        """One new token: O(held) reads and, once a pruned cache is full, O(1) writes to V.

        Position t0-W leaves the window; its score is final (the queries of
        its window have all run). If a slot is free the new token takes it;
        else the worst of the old tokens, the leaving one included (lowest
        score; on a tie the older, as keep_mask orders ties), is evicted for
        good and the new token takes its slot. That is the incremental form
        of keep_mask's top-k over a growing set, so the held tokens are the
        same as in the full-sequence rule.
        """
        W, budget = self.selector.recency, self.selector.budget
        pos, score = self.v_pos, self.score
        if t0 >= W:
            leaving = pos == t0 - W  # (B, nh, n): one token per (batch, head)
            score = torch.where(leaving, self.selector.score(score / W, pos), score)
        if pos.size(-1) < budget:
            v = torch.cat([self.v, v_new], dim=-2)
            pos = torch.cat([pos, pos.new_full(pos.shape[:-1] + (1,), t0)], dim=-1)
            score = F.pad(score, (0, 1))
        else:
            old = pos <= t0 - W
            old_score = score.masked_fill(~old, math.inf)
            lowest = old & (old_score == old_score.amin(-1, keepdim=True))
            slot = pos.masked_fill(~lowest, t0).argmin(-1, keepdim=True)  # (B, nh, 1): the oldest lowest
            B, nh = slot.shape[:2]
            heads = (torch.arange(B, device=q.device)[:, None], torch.arange(nh, device=q.device))
            # in place, O(1) writes (index_put_, unlike scatter_, a compiled step also does in place);
            # v and v_pos also stay the views the prefill made, so a compiled step's guards hold next step
            v = self.v.index_put_((*heads, slot[..., 0]), v_new[..., 0, :])
            pos = pos.index_put_((*heads, slot[..., 0]), pos.new_full((), t0))
            score = score.scatter(-1, slot, 0.0)
            self.ordered = False
        att = self._logits(q, t0)  # (B, nh, 1, t)
        held_att = F.softmax(att.gather(-1, pos[..., None, :]), dim=-1)  # (B, nh, 1, n)
        y = (held_att @ self.v_decode(v).float()).to(q.dtype)
        # the window's tokens (the new one included) receive this query's attention over every key
        probs = F.softmax(att, dim=-1).gather(-1, pos[..., None, :])[..., 0, :]
        self.score = score + probs.masked_fill(pos <= t0 - W, 0.0)
        self.v, self.v_pos = v, pos
        return y

    def _sort(self):
        """Back to position order (after in-place steps), for a prefill."""
        order = self.v_pos.argsort(dim=-1)
        self.v = self.v.gather(-2, order[..., None].expand_as(self.v))
        self.v_pos, self.score = self.v_pos.gather(-1, order), self.score.gather(-1, order)
        self.ordered = True

    def _attend_pruned(self, q, v_new, t0):
        W, budget = self.selector.recency, self.selector.budget
        B, nh, T, _ = q.shape
        t = t0 + T
        new_pos = torch.arange(t0, t, device=q.device)
        att = self._logits(q, t0)  # (B, nh, T, t)
        if self.v is None:
            self.v = v_new[..., :0, :]
            self.v_pos = new_pos.new_empty(B, nh, 0)
            self.score = att.new_empty(B, nh, 0)
        if not self.ordered:
            self._sort()
        w = min(W, t0)  # held window tokens: the last w, contiguous
        n_old = self.score.size(-1) - w

        # candidates: held old tokens, then the tail (window + new tokens)
        v_all = torch.cat([self.v, v_new], dim=-2)  # (B, nh, C, kdim)
        pos = torch.cat([self.v_pos, new_pos.expand(B, nh, T)], dim=-1)  # (B, nh, C)
        tail_start = t0 - w
        tail_pos = torch.arange(tail_start, t, device=q.device)
        lag = new_pos[:, None] - tail_pos[None, :]  # (T, L) query - key
        in_window = (lag >= 0) & (lag < W)
        probs = F.softmax(att, dim=-1)[..., tail_start:]  # (B, nh, T, L), full keys
        received = F.pad(self.score[..., n_old:], (0, T)) + probs.masked_fill(~in_window, 0.0).sum(-2)
        tail_scores = self.selector.score(received / W, pos[..., n_old:])
        scores = torch.cat([self.score[..., :n_old], tail_scores], dim=-1)  # (B, nh, C)

        keep = keep_mask(scores, budget, W, key_pos=pos, query_pos=new_pos)  # (B, nh, T, C)
        if pos.size(-1) == t:  # every token is a candidate (a first prefill): att is already in their order
            held_att = att.masked_fill_(~keep, float("-inf"))
        else:
            held_att = att.gather(-1, pos[..., None, :].expand(B, nh, T, pos.size(-1))).masked_fill_(~keep, float("-inf"))
        held_att = F.softmax(held_att, dim=-1)
        y = (held_att @ self.v_decode(v_all).float()).to(q.dtype)

        # keep what the last query kept; the rest is evicted for good
        held = keep[..., -1, :]  # (B, nh, C)
        n, n_old = min(t, budget), min(budget - W, max(0, t - W))
        old = held & (pos <= t - 1 - W)
        self.v = v_all[held].view(B, nh, n, v_all.size(-1))
        self.v_pos = pos[held].view(B, nh, n)
        self.score = torch.cat([scores[old].view(B, nh, n_old), received[..., received.size(-1) - min(W, t):]], -1)
        return y

    def v_elements_per_head(self):
        """V elements held per (batch, head): n tokens x kdim."""
        return 0 if self.v is None else self.v.size(-2) * self.v.size(-1)

    def nbytes(self):
        """Bytes of the tensors actually held: keys, values, and pruning bookkeeping."""
        def size(*tensors):
            return sum(x.numel() * x.element_size() for x in tensors if x is not None)
        out = dict(k=size(self.k), v=size(self.v), index=size(self.v_pos, self.score))
        out["total"] = out["k"] + out["v"] + out["index"]
        return out


class KVCache:
    """One LayerKVCache per layer; make_layer(layer_index) builds each."""

    def __init__(self, n_layer, make_layer=None):
        make_layer = make_layer or (lambda i: LayerKVCache())
        self.layers = [make_layer(i) for i in range(n_layer)]

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    @property
    def length(self):
        return self.layers[0].length if self.layers else 0

    def reset(self):
        for layer in self.layers:
            layer.reset()

    def nbytes(self):
        total = dict(k=0, v=0, index=0, total=0)
        for layer in self.layers:
            for key, value in layer.nbytes().items():
                total[key] += value
        return total

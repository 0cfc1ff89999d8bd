"""The inference KV cache that really stores fewer bytes.

One LayerKVCache per attention layer. Keys are kept in full. V is stored as
v_encode(v) (a KVSplice latent, int8 codes, or V itself) and read back
through v_decode. With a token selector (lib.kv_pruning.TokenKeep: V-only
pruning, a sliding window, a random keep), only the values of kept tokens
are held, at most selector.budget per (batch, head), and a token is evicted
for good by the rule in lib/kv_pruning.py: the recency window plus the top
(budget - W) older tokens by selector.score, final once the token leaves the
window.

Every call, a prefill of a prompt or one new token, runs the same math: the
candidates are the held old tokens plus the tail (window + new tokens), the
tail's scores are the running sums carried over plus the attention the new
queries give, and lib.kv_pruning.keep_mask decides per query. The result is
the full-sequence selector.forward on v_decode(v_encode(v)), up to float
rounding (see the caveat in the tests: an exact near-tie between two scores
may be ordered differently when rounding differs).

Layout of a pruned layer, per (batch, head), in position order:
    v      (B, nh, n, kdim)  held values: old kept tokens, then the window
    v_pos  (B, nh, n)        their positions (heads hold different tokens)
    old_score  (B, nh, n_old)   final scores of the old kept tokens
    window_sum (B, nh, w)       attention received so far by the window tokens
with n = min(t, budget) for every (batch, head), so the tensors stay dense.
"""

import math

import torch
import torch.nn.functional as F

from lib.kv_pruning import keep_mask


def _identity(v):
    return v


class LayerKVCache:
    """Keys in full, values encoded and (with a token selector) only for kept tokens."""

    def __init__(self, selector=None, v_encode=None, v_decode=None):
        if (v_encode is None) != (v_decode is None):
            raise ValueError("v_encode and v_decode come as a pair: got only one of them")
        self.selector = selector
        self.v_encode = v_encode or _identity
        self.v_decode = v_decode or _identity
        self.reset()

    def reset(self):
        self.length = 0         # tokens seen
        self.k = None           # (B, nh, t, hs) every key
        self.v = None           # (B, nh, n, kdim) encoded values held, position order
        self.v_pos = None       # (B, nh, n) their positions (pruning only)
        self.old_score = None   # (B, nh, n_old) final scores of held old tokens
        self.window_sum = None  # (B, nh, w) attention received by the window so far

    def __call__(self, q, k, v):
        return self.forward(q, k, v)

    def forward(self, q, k, v):
        """q, k, v: (B, nh, T_new, hs) for the new tokens -> y (B, nh, T_new, hs)."""
        with torch.autocast(q.device.type, enabled=False):  # fp32 scores, as in training
            return self._forward(q, k, v)

    def _forward(self, q, k, v):
        t0 = self.length
        self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
        self.length = t0 + q.size(-2)
        v_new = self.v_encode(v)  # (B, nh, T_new, kdim)
        att = self._logits(q, t0)  # (B, nh, T_new, t), causal
        if self.selector is None:
            self.v = v_new if self.v is None else torch.cat([self.v, v_new], dim=-2)
            att = F.softmax(att, dim=-1)
            return (att @ self.v_decode(self.v).float()).to(q.dtype)
        if q.size(-2) == 1 and self.v is not None:
            return self._step_pruned(q, att, v_new, t0)
        return self._attend_pruned(q, att, v_new, t0)

    def _step_pruned(self, q, att, v_new, t0):
        """One new token, O(held) instead of ranking every candidate pair.

        At most one token changes status per step: position t0-W leaves the
        window with its final score. It joins the old tokens if a slot is
        free, else it and the held old tokens lose the worst of them (lowest
        score; on a tie the older one, as keep_mask orders ties). That is the
        incremental form of keep_mask's top-k over a growing set, so the held
        tokens are the same.
        """
        W, slots = self.selector.recency, self.selector.budget - self.selector.recency
        B, nh = q.shape[:2]
        n_old = self.old_score.size(-1)
        probs = F.softmax(att, dim=-1)  # (B, nh, 1, t): full keys, for the scores
        tail_start = t0 - self.window_sum.size(-1)
        lag = t0 - torch.arange(tail_start, t0 + 1, device=q.device)
        received = F.pad(self.window_sum, (0, 1)) + probs[..., 0, tail_start:].masked_fill(lag >= W, 0.0)
        v_all = torch.cat([self.v, v_new], dim=-2)  # (B, nh, n + 1, kdim): old, window, new
        pos = torch.cat([self.v_pos, self.v_pos.new_full((B, nh, 1), t0)], dim=-1)
        old_score = self.old_score
        if t0 >= W:  # position t0-W leaves the window: its score is final
            leaving = self.selector.score(received[..., :1] / W, pos[..., n_old:n_old + 1])  # (B, nh, 1)
            received = received[..., 1:]
            old_score = torch.cat([old_score, leaving], dim=-1)  # candidates in position order
            if n_old + 1 > slots:  # one of the candidates goes, for good
                worst = old_score.argmin(dim=-1, keepdim=True)  # first = oldest among equal scores
                drop = torch.zeros_like(pos, dtype=torch.bool).scatter_(-1, worst, True)
                keep = ~drop
                n = pos.size(-1) - 1
                v_all = v_all[keep].view(B, nh, n, v_all.size(-1))
                pos = pos[keep].view(B, nh, n)
                old_score = old_score[keep[..., :n_old + 1]].view(B, nh, n_old)
        held_att = F.softmax(att.gather(-1, pos[..., None, :]), dim=-1)  # (B, nh, 1, held)
        y = (held_att @ self.v_decode(v_all).float()).to(q.dtype)
        self.v, self.v_pos, self.old_score, self.window_sum = v_all, pos, old_score, received
        return y

    def _logits(self, q, t0):
        T, t = q.size(-2), self.k.size(-2)
        att = (q.float() @ self.k.float().transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
        query_pos = torch.arange(t0, t0 + T, device=q.device)
        key_pos = torch.arange(t, device=q.device)
        return att.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))

    def _attend_pruned(self, q, att, v_new, t0):
        W, budget = self.selector.recency, self.selector.budget
        B, nh, T, _ = q.shape
        t = t0 + T
        new_pos = torch.arange(t0, t, device=q.device)
        if self.v is None:
            self.v = v_new[..., :0, :]
            self.v_pos = new_pos.new_empty(B, nh, 0)
            self.old_score = att.new_empty(B, nh, 0)
            self.window_sum = att.new_empty(B, nh, 0)
        n_old = self.old_score.size(-1)

        # candidates: held old tokens, then the tail (window + new tokens)
        v_all = torch.cat([self.v, v_new], dim=-2)  # (B, nh, C, kdim)
        pos = torch.cat([self.v_pos, new_pos.expand(B, nh, T)], dim=-1)  # (B, nh, C)
        tail_start = t0 - self.window_sum.size(-1)  # the tail is contiguous
        tail_pos = torch.arange(tail_start, t, device=q.device)
        lag = new_pos[:, None] - tail_pos[None, :]  # (T, L) query - key
        in_window = (lag >= 0) & (lag < W)
        probs = F.softmax(att, dim=-1)[..., tail_start:]  # (B, nh, T, L), full keys
        received = F.pad(self.window_sum, (0, T)) + probs.masked_fill(~in_window, 0.0).sum(-2)
        tail_scores = self.selector.score(received / W, pos[..., n_old:])
        scores = torch.cat([self.old_score, tail_scores], dim=-1)  # (B, nh, C)

        keep = keep_mask(scores, budget, W, key_pos=pos, query_pos=new_pos)  # (B, nh, T, C)
        held_att = att.gather(-1, pos[..., None, :].expand(B, nh, T, pos.size(-1)))
        held_att = F.softmax(held_att.masked_fill(~keep, float("-inf")), dim=-1)
        y = (held_att @ self.v_decode(v_all).float()).to(q.dtype)

        # keep what the last query kept; the rest is evicted for good
        held = keep[..., -1, :]  # (B, nh, C)
        n, n_old = min(t, budget), min(budget - W, max(0, t - W))
        old = held & (pos <= t - 1 - W)
        self.v = v_all[held].view(B, nh, n, v_all.size(-1))
        self.v_pos = pos[held].view(B, nh, n)
        self.old_score = scores[old].view(B, nh, n_old)
        self.window_sum = received[..., received.size(-1) - min(W, t):]
        return y

    def v_elements_per_head(self):
        """V elements held per (batch, head): n tokens x kdim."""
        return 0 if self.v is None else self.v.size(-2) * self.v.size(-1)

    def nbytes(self):
        """Bytes of the tensors actually held: keys, values, and pruning bookkeeping."""
        def size(*tensors):
            return sum(x.numel() * x.element_size() for x in tensors if x is not None)
        out = dict(k=size(self.k), v=size(self.v),
                   index=size(self.v_pos, self.old_score, self.window_sum))
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

"""The decode caches of the V-cache methods, behind one protocol (LayerCache).

FullLayerCache      keys in full, every token's V (the full selector)
KeepRuleLayerCache  keys in full, the V of the tokens a keep rule keeps
                    (prune, window, random: lib.kv_pruning.TokenKeep)
H2OLayerCache       heavy-hitter eviction of K and V (Zhang et al. 2023)
KVCache             one layer cache per attention layer

Every cache stores V through a codec (a VStore; lib.vcache.VCodec is one):
codec.write(v) is what a row holds (a KVSplice latent, int8 codes, or V
itself) and codec.read(weights, stored) the attention weights times the
values those rows hold, in fp32. Keys are kept in full.

The keep-rule cache holds at most rule.budget values per (batch, head),
and a token is evicted for good by the rule of lib/kv_pruning.py: the
recency window plus the top (budget - W) older tokens by rule.score, final
once the token leaves the window. A prefill of several tokens ranks the
candidates (the held old tokens plus the tail: window + new tokens) with
lib.kv_pruning.kept_until (keep_mask's rule); a one-token step is its
incremental form (at most one token changes status). Either way the result is the
full-sequence rule.forward on the values the codec reads back, up to float
rounding (see the caveat in the tests: an exact near-tie between two scores
may be ordered differently when rounding differs).

Grouped-query attention: q has nh heads, k and v nkv (nh a multiple of nkv;
query head h reads KV head h // g, g = nh // nkv). Keys and V are held per
KV head, never repeated, and so are a rule's keep decisions (the score of a
token for a KV head is the mean over its g query heads: lib/kv_pruning.py).
Each KV head attends for its g query heads at once, as g * T_new query rows
(lib.kv_pruning.by_kv_head): weights (B, nkv, g * T_new, n) over the held
values, which is what codec.read reads whatever the layout.

Memory is allocated at the first forward and then only written in place:
    keys           (B, nkv, rows, hs)   rows = capacity (the model's block_size;
                                        past it the buffer doubles)
    V, full        (B, nkv, rows, width) row t is token t
    V, keep rule   (B, nkv, budget, width) slots, and in its KeepRuleBook per slot
                   its position         (B, nkv, budget)  heads hold different tokens
                   its score            (B, nkv, budget)  an old token's final score
                   and per (batch, KV head) the attention the last W + 1 tokens
                   received so far (from the KV head's g query heads) and the next
                   token's slot
The keep-rule cache uses the first n = min(t, budget) slots of every
(batch, KV head). A prefill leaves them in position order; a step puts the
new token into the next free slot or, once all are in use, into the slot of
the token it evicts, so the order is lost (attention does not depend on it)
and the next prefill sorts the candidates first. k, v and v_pos are views
of the rows and slots in use, score is composed from them; nbytes() counts
those (not the book's W + 2 values a head for the window and the next slot,
a constant the per-token counts leave out). reset() keeps the buffers.
The book of every keep-rule layer of a KVCache is one, stacked over the
layers: the choice of the token each layer evicts next is made for all of
them at once after the last layer's step, a fixed number of ops per step
whatever the depth.

`step` is the one-token update with fixed shapes: the position is a tensor,
writes go to the buffers in place (each marked a static address when
allocated), and with rows=None attention runs over every row of the key
buffer and every slot, with a mask of those in use. So one compiled graph
serves every step of a generation, and on CUDA it can be captured once as a
CUDA graph. forward runs the same step eagerly over the rows written so far.
"""

import math

import torch
import torch.nn.functional as F

from lib.kv_pruning import NEVER, by_kv_head, by_query_head, kept_until, kv_groups, window_received
from lib.settings import check


def static_address(x):
    """x, marked as memory a compiled graph may keep reading and writing in
    place across calls (a CUDA graph then neither copies it in nor skips)."""
    torch._dynamo.mark_static_address(x)
    return x


class VStore:
    """How a cache stores V: write(v) -> the rows it holds, read(weights,
    stored) -> the weighted values in fp32. This one stores V as it is; a V
    codec (lib.vcache.VCodec) stores it encoded once fitted."""

    def write(self, v):
        """v (..., hs) -> the stored rows (..., width)."""
        return v

    def read(self, weights, stored):
        """weights (..., T, n) fp32 over stored rows (..., n, width) -> (..., T, hs) fp32."""
        return weights @ stored.float()

    def values(self, stored):
        """stored rows (..., n, width) -> the values they hold (..., n, hs) fp32: what
        read weighs, for a fused attention kernel over many queries."""
        return stored.float()


class LayerCache:
    """The decode-cache protocol: what a V-cache method's make_cache() returns,
    one per attention layer, and all that a model's attention and generate use.

        cache(q, k, v) -> y      the new tokens' q (B, nh, T_new, hs) and k, v
                                 (B, nkv, T_new, hs) -> their attention output
                                 (B, nh, T_new, hs); positions continue from `length`
        cache.length             tokens seen so far
        cache.reset()            forget every token
        cache.k, cache.v         the held keys (B, nkv, t, hs) and stored values
                                 (B, nkv, n, width), None while empty
        cache.v_pos, cache.score per held value its position and score (B, nkv, n),
                                 None when every token's value is held in order
        cache.nbytes()           bytes of those tensors: {"k", "v", "index", "total"}
        cache.v_elements_per_head(), cache.v_bytes_per_head()

    A cache with `fixed_shape_step = True` also has step(q, k, v, pos) and
    advance(): a one-token update whose shapes never change, which a decode
    loop can compile once (FullLayerCache, KeepRuleLayerCache).
    """

    fixed_shape_step = False
    v_pos = score = None

    def __call__(self, q, k, v):
        return self.forward(q, k, v)

    def v_elements_per_head(self):
        """V elements held per (batch, KV head): n tokens x stored width."""
        return 0 if self.v is None else self.v.size(-2) * self.v.size(-1)

    def v_bytes_per_head(self):
        """V bytes held per (batch, KV head)."""
        return 0 if self.v is None else self.v_elements_per_head() * self.v.element_size()

    def nbytes(self):
        """Bytes of the tensors actually held: keys, values, and the bookkeeping of selection."""
        def size(*tensors):
            return sum(x.numel() * x.element_size() for x in tensors if x is not None)
        out = dict(k=size(self.k), v=size(self.v), index=size(self.v_pos, self.score))
        out["total"] = out["k"] + out["v"] + out["index"]
        return out


class _KeyRowsCache(LayerCache):
    """What the full and the keep-rule caches share: every key in a row
    buffer, and the prefill / fixed-shape step around it. A subclass holds
    the values: _prefill_values and _step_values (given the new tokens' V as
    it came, to store through the codec), _make_room."""

    fixed_shape_step = True

    def __init__(self, codec, capacity=0):
        self.codec = codec  # a VStore: what a value row holds, and how it is read
        self.capacity = capacity  # tokens the buffers are allocated for at the first forward
        self._k_rows = None  # (B, nkv, rows, hs) every key
        self.reset()

    def reset(self):
        """Forget every token. The buffers stay, for the next prefill of the same
        batch: a compiled step keeps reading and writing the same memory."""
        self.length = 0  # tokens seen

    @property
    def k(self):
        """(B, nkv, t, hs) every key."""
        return None if self.length == 0 else self._k_rows[:, :, :self.length]

    def forward(self, q, k, v):
        """q (B, nh, T_new, hs), k, v (B, nkv, T_new, hs) for the new tokens -> y (B, nh, T_new, hs)."""
        kv_groups(q, k, v)
        t0, T = self.length, q.size(-2)
        if T == 1 and t0 > 0:  # a step, over the rows written so far
            self._make_room(t0, t0 + 1)
            y = self.step(q, k, v, torch.full((1,), t0, device=q.device), rows=t0 + 1)
            self.advance()
            return y
        with torch.autocast(q.device.type, enabled=False):  # fp32 scores, as in training
            held = self._held()  # before the length moves on
            self._k_rows = self._write(self._k_rows, k, t0)
            self.length = t0 + T
            return self._prefill_values(q, v, t0, held).to(q.dtype)

    def step(self, q, k, v, pos, rows=None):
        """One new token per sequence (q (B, nh, 1, hs), k, v (B, nkv, 1, hs))
        at position `pos`, a (1,) long tensor equal to self.length, after a
        prefill. Writes the buffers in place and returns y (B, nh, 1, hs); the
        caller then calls advance(). With rows=None, attention runs over every
        row of the key buffer with a mask of those written: the shapes never
        change, so a compiled step is one graph. Otherwise over the first
        `rows` rows (then at least pos + 1 and within the buffer). Each KV
        head's g query heads are g query rows (lib.kv_pruning.by_kv_head)."""
        kv_groups(q, k, v)
        with torch.autocast(q.device.type, enabled=False):
            self._k_rows.index_copy_(2, pos, k.to(self._k_rows.dtype))
            keys = self._k_rows if rows is None else self._k_rows[:, :, :rows]
            att = by_kv_head(q.float(), k.size(1)) @ keys.float().transpose(-2, -1)
            att = att * (1.0 / math.sqrt(q.size(-1)))  # (B, nkv, g, rows)
            if rows is None:
                att = att.masked_fill(torch.arange(keys.size(-2), device=q.device) > pos, float("-inf"))
            y = self._step_values(att, v, pos, rows)  # (B, nkv, g, hs)
            return by_query_head(y, 1).to(q.dtype)  # (B, nh, 1, hs)

    def advance(self, booked=False):
        """After `step`: one more token seen."""
        self.length += 1

    def _held(self):
        """What the prefill needs of the values held before it."""
        return None

    def _make_room(self, t0, t):
        """Before a step at t0: room for t rows."""
        self._k_rows = self._room(self._k_rows, t0, t)

    def _room(self, rows, t0, t):
        """The buffer `rows` (its first t0 rows written), or a zeroed one of at
        least t rows (max(t, capacity), at least doubling) holding those rows."""
        if rows.size(-2) >= t:
            return rows
        grown = static_address(rows.new_zeros(rows.shape[:-2] + (max(t, self.capacity, 2 * t0), rows.size(-1))))
        grown[:, :, :t0] = rows[:, :, :t0]
        return grown

    def _write(self, rows, x, t0):
        """x (B, nkv, T_new, d) into rows t0.. of the buffer `rows`, in place; a
        buffer is allocated (zeroed: a masked row's weight is 0, and 0 * NaN
        would not be) or grown first. A buffer of another batch is replaced."""
        t = t0 + x.size(-2)
        if rows is None or rows.shape[:2] != x.shape[:2] or rows.dtype != x.dtype or rows.device != x.device:
            rows = static_address(x.new_zeros(x.shape[:-2] + (max(t, self.capacity), x.size(-1))))
        rows = self._room(rows, t0, t)
        rows[:, :, t0:t] = x
        return rows

    def _logits(self, q, t0):
        """(B, nkv, g * T_new, t) scaled q.k of each KV head's query rows over every key, causal."""
        nkv, t = self.k.shape[1:3]
        att = (by_kv_head(q.float(), nkv) @ self.k.float().transpose(-2, -1)).mul_(1.0 / math.sqrt(q.size(-1)))
        key_pos = torch.arange(t, device=q.device)
        query_pos = self._row_pos(q, nkv, t0)
        return att.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))  # in place: no copy of the (T, t) logits

    @staticmethod
    def _row_pos(q, nkv, t0):
        """(g * T_new,) the position of each query row of a KV head: row j * T_new + i is t0 + i."""
        return torch.arange(t0, t0 + q.size(-2), device=q.device).repeat(q.size(1) // nkv)


class FullLayerCache(_KeyRowsCache):
    """Keys in full and every token's V, stored through the codec."""

    def __init__(self, codec, capacity=0):
        self._v_rows = None  # (B, nkv, rows, width): row t is token t
        super().__init__(codec, capacity)

    @property
    def v(self):
        """(B, nkv, t, width) the stored values."""
        return None if self.length == 0 else self._v_rows[:, :, :self.length]

    def _make_room(self, t0, t):
        super()._make_room(t0, t)
        self._v_rows = self._room(self._v_rows, t0, t)

    def _prefill_values(self, q, v, t0, held):
        """Every held value read back once, then one fused causal attention kernel
        over them: no (T_new, t) probabilities in memory."""
        self._v_rows = self._write(self._v_rows, self.codec.write(v), t0)
        k, t = self.k, self.length
        causal = None if t0 == 0 else torch.arange(t, device=q.device) <= torch.arange(t0, t, device=q.device)[:, None]
        return F.scaled_dot_product_attention(q.float(), k.float(), self.codec.values(self.v), attn_mask=causal,
                                              is_causal=t0 == 0, enable_gqa=k.size(1) < q.size(1))

    def _step_values(self, att, v, pos, rows):
        self._v_rows.index_copy_(2, pos, self.codec.write(v).to(self._v_rows.dtype))
        values = self._v_rows if rows is None else self._v_rows[:, :, :rows]
        return self.codec.read(F.softmax(att, dim=-1), values)


class KeepRuleBook:
    """The keep rule's bookkeeping for keep-rule layers of one KVCache, stacked
    so that a decode step's bookkeeping is one batch of ops for all of them,
    run once the last layer's step is done (advance), not once per layer.
    Layer i reads and writes the views [i]; t is the number of tokens seen:

        pos     (L, B, nkv, budget) long  each slot's token position (a free slot: 0)
        score   (L, B, nkv, budget)       each old token's final score
        ring    (L, B, nkv, W + 1)        the attention received so far by positions
                                          t - W .. t (t - W's is complete, t's is 0)
        slot    (L, B, nkv, 1) long       the slot token t's value takes
        bias    (budget,)                 0 on the slots token t's query reads, -inf on free ones
        window  (W,) long                 the key rows t - W + 1 .. t (clamped at 0) whose
                                          attention a fixed-shape step adds to the ring

    The layers share one rule (equal settings), one batch and one head layout.
    """

    def __init__(self, rule, layers):
        self.rule, self.layers = rule, layers
        self.pos = None
        self.advanced = 0  # layers whose step is done, of the step under way
        for layer in layers:
            layer.book = self

    def allocate(self, B, nkv, g, device):
        """Zeroed buffers for a batch of B sequences of nkv KV heads (g query heads each),
        unless those are the shapes held."""
        budget, W = self.rule.budget, self.rule.recency
        shape = (len(self.layers), B, nkv)
        self.g = g
        if self.pos is not None and self.pos.shape[:3] == shape and self.pos.device == device:
            return
        self.pos = static_address(torch.zeros(shape + (budget,), dtype=torch.long, device=device))
        self.score = static_address(torch.zeros(shape + (budget,), device=device))
        self.ring = static_address(torch.zeros(shape + (W + 1,), device=device))
        self.slot = static_address(torch.zeros(shape + (1,), dtype=torch.long, device=device))
        self.bias = static_address(torch.zeros(budget, device=device))
        self.window = static_address(torch.zeros(W, dtype=torch.long, device=device))
        self.slots, self.lags = torch.arange(budget, device=device), torch.arange(W, device=device)
        heads = (torch.arange(B, device=device)[:, None], torch.arange(nkv, device=device))
        for i, layer in enumerate(self.layers):
            layer._pos_slots, layer._score_slots, layer._ring, layer._slot = (
                static_address(x[i]) for x in (self.pos, self.score, self.ring, self.slot))
            layer._heads = heads

    def layer_advanced(self, t):
        """A layer's step of token t is done; after the last layer's, the bookkeeping of all."""
        self.advanced += 1
        if self.advanced == len(self.layers):
            self.advanced = 0
            self.step_done(torch.full((1,), t, device=self.pos.device))

    def step_done(self, t):
        """Every layer's step of token t (a (1,) long tensor) is done: seen() over the stack.
        A compiled decode step calls it inside its graph (KVCache.step_done)."""
        self.seen(t, self.pos, self.score, self.ring, self.slot)

    def seen(self, t, pos, score, ring, slot):
        """Token t ((1,) long tensor) has gone through every layer whose buffers
        these are (the stack, or one layer's views after its prefill): position
        t - W + 1 leaves the window with its final score, the ring moves on, and
        token t + 1's slot is chosen: the first free one, or once all are in use
        that of the lowest-scored old token (on a tie the oldest, as keep_mask
        orders ties), evicted for good. That is the incremental form of
        keep_mask's top-k over a growing set. Fixed shapes and no Python branch
        on t: the same ops in a compiled graph."""
        W, budget, nkv = self.rule.recency, self.rule.budget, pos.size(-2)
        edge = t - W + 1  # held, since it was in the window; none while negative
        received = ring[..., 1:2]  # (..., 1)
        final = self.rule.score(received.reshape(-1, nkv, 1) / (self.g * W), edge.clamp(min=0)).view_as(received)
        score.copy_(torch.where(pos == edge, final, score))
        ring.copy_(ring.roll(-1, -1))
        ring[..., -1] = 0.0
        t = t + 1
        old_score = score.masked_fill(pos > t - W, math.inf)
        lowest = old_score == old_score.amin(-1, keepdim=True)
        evict = torch.where(lowest, pos, NEVER).argmin(-1, keepdim=True)
        slot.copy_(torch.where(t < budget, t, evict))
        self.bias.copy_(torch.where(self.slots <= t, 0.0, -math.inf))
        self.window.copy_((self.lags + (t - W + 1)).clamp_(min=0))


class KeepRuleLayerCache(_KeyRowsCache):
    """Keys in full; V, stored through the codec, only for the tokens a keep
    rule (lib.kv_pruning.TokenKeep) keeps: at most rule.budget per (batch, KV
    head). Its bookkeeping (positions, scores, the next slot) lives in a
    KeepRuleBook, its own or one shared with the other layers of a KVCache."""

    def __init__(self, rule, codec, capacity=0):
        self.rule = rule
        self._v_slots = None  # (B, nkv, budget, width)
        KeepRuleBook(rule, [self])
        super().__init__(codec, capacity)

    def reset(self):
        super().reset()
        self.ordered = True  # held slots in position order
        self.book.advanced = 0

    @property
    def v(self):
        """(B, nkv, n, width) the stored values held."""
        return None if self.length == 0 else self._v_slots[:, :, :self._n_held]

    @property
    def v_pos(self):
        """(B, nkv, n) the held values' positions."""
        return None if self.length == 0 else self._pos_slots[:, :, :self._n_held]

    @property
    def score(self):
        """(B, nkv, n) an old token's final score; one of the last W tokens' attention
        received so far (from the KV head's g query heads)."""
        if self.length == 0:
            return None
        t, W = self.length, self.rule.recency
        pos = self.v_pos
        recent = self._ring.gather(-1, (pos - (t - W)).clamp(0, W))
        return torch.where(pos >= t - W, recent, self._score_slots[:, :, :self._n_held])

    @property
    def _n_held(self):
        """Slots in use: every (batch, KV head) holds min(t, budget) tokens."""
        return min(self.length, self.rule.budget)

    def advance(self, booked=False):
        self.ordered = self.ordered and self.length < self.rule.budget  # a full cache evicted out of order
        super().advance()
        if not booked:  # booked: the step's bookkeeping already ran (KVCache.step_done)
            self.book.layer_advanced(self.length - 1)

    def _held(self):
        return self.v, self.v_pos, self.score

    def _step_values(self, att, v, pos, rows):
        """The rule's one-token step, in O(1) writes: the new token's value goes
        into the slot the book chose for it (a free one, or an evicted old
        token's), the query reads the held slots (free ones masked out), and
        the window's tokens, the new one included, add the attention the
        group's queries gave them over every key to the ring. Which token
        leaves the window and which is evicted next is decided for every
        layer at once after the last layer's step (KeepRuleBook.seen).

        att (B, nkv, g, rows): the logits of each KV head's g query rows."""
        W, g = self.rule.recency, att.size(-2)
        # in place, O(1) writes (index_put_, unlike scatter_, a compiled step also does in place)
        slot = (*self._heads, self._slot[..., 0])
        self._v_slots.index_put_(slot, self.codec.write(v)[..., 0, :].to(self._v_slots.dtype))
        self._pos_slots.index_put_(slot, pos)
        held_att = att.gather(-1, self._pos_slots.unsqueeze(2).expand(-1, -1, g, -1))  # (B, nkv, g, budget)
        if rows is None or rows < self.rule.budget:  # some slots are free
            held_att = held_att + self.book.bias
        y = self.codec.read(F.softmax(held_att, dim=-1), self._v_slots)
        probs = F.softmax(att, dim=-1)
        if rows is None:
            received = probs.gather(-1, self.book.window.expand(*probs.shape[:-1], W))
        else:
            received = probs[..., max(0, rows - W):]  # keys rows - W .. rows - 1
        self._ring[..., W + 1 - received.size(-1):].add_(received.sum(-2))
        return y

    def _prefill_values(self, q, v, t0, held):
        v_new = self.codec.write(v)
        W, budget = self.rule.recency, self.rule.budget
        held_v, held_pos, held_score = held
        B, nkv, T = v_new.shape[:3]
        g = q.size(1) // nkv
        t = t0 + T
        new_pos = torch.arange(t0, t, device=q.device)
        row_pos = self._row_pos(q, nkv, t0)  # (g * T,) each query row's position
        att = self._logits(q, t0)  # (B, nkv, g * T, t)
        if t0 == 0:
            held_v, held_pos, held_score = v_new[..., :0, :], new_pos.new_empty(B, nkv, 0), att.new_empty(B, nkv, 0)
        if not self.ordered:  # back to position order
            order = held_pos.argsort(dim=-1)
            held_v = held_v.gather(-2, order[..., None].expand_as(held_v))
            held_pos, held_score = held_pos.gather(-1, order), held_score.gather(-1, order)
        w = min(W, t0)  # held window tokens: the last w, contiguous
        n_old = held_score.size(-1) - w

        # candidates: held old tokens, then the tail (window + new tokens)
        v_all = torch.cat([held_v, v_new], dim=-2)  # (B, nkv, C, width)
        pos = torch.cat([held_pos, new_pos.expand(B, nkv, T)], dim=-1)  # (B, nkv, C)
        # the attention the group's queries gave the tail (over every key), over the exposure g * W
        window = window_received(F.softmax(att, dim=-1), t0, W, g)[..., t0 - w:]  # (B, nkv, w + T)
        received = F.pad(held_score[..., n_old:], (0, T)) + window
        tail_scores = self.rule.score(received / (g * W), pos[..., n_old:])
        scores = torch.cat([held_score[..., :n_old], tail_scores], dim=-1)  # (B, nkv, C)

        # keep_mask, less its causal part: att is -inf past each query already
        until = kept_until(scores, budget, W, pos)  # (B, nkv, C): queries before it read the value
        if pos.size(-1) == t:  # every token is a candidate (a first prefill): att is already in their order
            held_att = att
        else:
            held_att = att.gather(-1, pos[..., None, :].expand(B, nkv, g * T, pos.size(-1)))
        held_att = F.softmax(held_att.masked_fill_(row_pos[:, None] >= until[..., None, :], float("-inf")), dim=-1)
        y = by_query_head(self.codec.read(held_att, v_all), T)

        # keep what the last query kept, in the first n slots; the rest is evicted for good
        held = until > t - 1  # (B, nkv, C)
        n, n_old = min(t, budget), min(budget - W, max(0, t - W))
        old = held & (pos <= t - 1 - W)
        self._hold(v_all[held].view(B, nkv, n, v_all.size(-1)), pos[held].view(B, nkv, n),
                   scores[old].view(B, nkv, n_old), received[..., received.size(-1) - min(W, t):], g)
        return y

    def _hold(self, v, pos, old_score, recent, g):
        """The held tokens (n of them, in position order) into the first n slots,
        the old ones' final scores, and `recent`, the attention received so far
        by the last min(W, t) tokens (the window of query t - 1); the rest is
        freed (position 0: a valid index that is masked out). Then, as after a
        step, the bookkeeping of token t - 1 (KeepRuleBook.seen)."""
        B, nkv, n, width = v.shape
        budget = self.rule.budget
        if self._v_slots is None or self._v_slots.shape != (B, nkv, budget, width) or \
                self._v_slots.dtype != v.dtype or self._v_slots.device != v.device:
            self._v_slots = static_address(v.new_zeros(B, nkv, budget, width))
        self.book.allocate(B, nkv, g, v.device)
        self._v_slots[:, :, :n] = v
        self._pos_slots[:, :, :n] = pos
        self._pos_slots[:, :, n:] = 0
        self._score_slots[:, :, :old_score.size(-1)] = old_score
        self._ring.zero_()
        self._ring[..., self._ring.size(-1) - recent.size(-1):] = recent  # positions t - W .. t - 1 at 1 .. W
        self.book.seen(torch.full((1,), self.length - 1, device=v.device),
                       self._pos_slots, self._score_slots, self._ring, self._slot)
        self.ordered = True


class H2OLayerCache(LayerCache):
    """H2O decode cache for one layer: K and V of at most `budget` tokens per (batch, KV head).

    Held per (batch, KV head), in position order (every row holds the same
    number of tokens, so the tensors stay dense):
        k      (B, nkv, n, hs)     keys, in the input dtype
        v      (B, nkv, n, width)  values as codec.write stores them
        v_pos  (B, nkv, n)         their positions
        score  (B, nkv, n)         attention each received from all queries so far:
                                   under grouped-query attention, summed over the
                                   g query heads that share the KV head

    Each new token is appended; if that makes n > budget, the held token
    outside the recency window (position <= t - recency) with the lowest
    accumulated score is evicted for good (ties: the oldest). The new query
    then attends over the held tokens, so every query sees at most `budget`
    tokens, as under lib.kv_pruning.VOnlyPruner; the reference implementation
    attends over budget + 1 and evicts afterwards, a one-token difference.
    Prompts are processed one token at a time. H2O is not consistent with any
    full-sequence forward, so it is only ever evaluated through this cache.
    """

    def __init__(self, budget, recency, codec):
        check(self.problems(budget, recency))
        self.budget, self.recency = budget, recency
        self.codec = codec  # a VStore: what a value row holds, and how it is read
        self.reset()

    @staticmethod
    def problems(budget, recency):
        """The settings' problems, one line each ([] when fine)."""
        if isinstance(budget, int) and isinstance(recency, int) and 1 <= recency <= budget:
            return []
        return [f"need ints 1 <= recency <= budget, got recency {recency!r}, budget {budget!r}"]

    def reset(self):
        self.length = 0    # tokens seen
        self.k = None      # (B, nkv, n, hs)
        self.v = None      # (B, nkv, n, width)
        self.v_pos = None  # (B, nkv, n) long
        self.score = None  # (B, nkv, n) float32

    def forward(self, q, k, v):
        """q (B, nh, T_new, hs), k, v (B, nkv, T_new, hs) for the new tokens -> y (B, nh, T_new, hs)."""
        kv_groups(q, k, v)
        ys = [self._step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
              for i in range(q.size(-2))]
        return torch.cat(ys, dim=-2)

    def _step(self, q, k, v):
        """One token: q (B, nh, 1, hs), k, v (B, nkv, 1, hs) -> y (B, nh, 1, hs)."""
        B, nkv, _, hs = k.shape
        t = self.length
        self.length = t + 1
        pos = torch.full((B, nkv, 1), t, dtype=torch.long, device=q.device)
        score = torch.zeros(B, nkv, 1, device=q.device)
        v = self.codec.write(v)
        if self.k is None:  # start empty, so no held tensor is a view of the caller's
            self.k, self.v = k[..., :0, :], v[..., :0, :]
            self.v_pos, self.score = pos[..., :0], score[..., :0]
        self.k = torch.cat([self.k, k], dim=-2)
        self.v = torch.cat([self.v, v], dim=-2)
        self.v_pos = torch.cat([self.v_pos, pos], dim=-1)
        self.score = torch.cat([self.score, score], dim=-1)
        if self.v_pos.size(-1) > self.budget:
            self._evict_one(t)
        att = (by_kv_head(q.float(), nkv) @ self.k.float().transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        att = F.softmax(att, dim=-1)  # (B, nkv, g, n): the KV head's g query heads as rows
        self.score = self.score + att.sum(-2)  # the attention the group gave
        return by_query_head(self.codec.read(att, self.v), 1).to(q.dtype)

    def _evict_one(self, t):
        """Drop, per (batch, KV head), the non-recent held token with the lowest score."""
        B, nkv, n = self.v_pos.shape
        old = self.v_pos <= t - self.recency  # (B, nkv, n); at least one since recency <= budget < n
        victim = self.score.masked_fill(~old, math.inf).argmin(-1, keepdim=True)  # first = oldest
        keep = torch.ones_like(old).scatter_(-1, victim, False)
        self.k = self.k[keep].view(B, nkv, n - 1, -1)
        self.v = self.v[keep].view(B, nkv, n - 1, -1)
        self.v_pos = self.v_pos[keep].view(B, nkv, n - 1)
        self.score = self.score[keep].view(B, nkv, n - 1)


class KVCache:
    """One layer cache per layer; make_layer(layer_index) builds each (default:
    a full cache storing V as it is)."""

    def __init__(self, n_layer, make_layer=None):
        make_layer = make_layer or (lambda i: FullLayerCache(VStore()))
        self.layers = [make_layer(i) for i in range(n_layer)]
        books = {}  # the keep-rule layers of one rule keep their books together
        for layer in self.layers:
            if isinstance(layer, KeepRuleLayerCache):
                books.setdefault((type(layer.rule), layer.rule.extra_repr()), []).append(layer)
        self.books = [KeepRuleBook(layers[0].rule, layers) for layers in books.values()]

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

    def step_done(self, pos):
        """After every layer's `step` of the token at pos ((1,) long tensor), inside a
        compiled step's graph: the keep-rule books' bookkeeping (KeepRuleBook.seen);
        then advance(booked=True)."""
        for book in self.books:
            book.step_done(pos)

    def advance(self, booked=False):
        """After every layer's `step`: one more token seen (and, unless step_done ran
        for it, the books' bookkeeping)."""
        for layer in self.layers:
            layer.advance(booked)

    def nbytes(self):
        total = dict(k=0, v=0, index=0, total=0)
        for layer in self.layers:
            for key, value in layer.nbytes().items():
                total[key] += value
        return total

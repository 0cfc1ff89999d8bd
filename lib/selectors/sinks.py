"""Every token's V, some of them exact: the first `sinks` tokens of a sequence
(StreamingLLM's attention sinks, KVTC's exact sinks) and each query's last
`window` tokens (KIVI's full-precision residual); the codec stores the rest.

A pretrained LM's first tokens draw much of most heads' attention, and its
most recent ones much of the rest, so a codec that touches them costs far
more than its reconstruction error suggests. A query at position t reads
token s exact when s < sinks or t - s < window, and through the codec
otherwise. With window = 0 which V a key offers does not depend on the
query; with a window it does, and training attends over every key twice,
once with its exact V and once with its coded V, each query allowed exactly
one of the two (a mask): the softmax is the same as over the keys once.

The cache holds what that attention reads and no more:
    the sinks      (B, nkv, sinks, hs)    as they came
    the window     (B, nkv, window, hs)   as they came, a ring: slot p % window
                                          holds position p
    the coded rest (B, nkv, rows, width)  row p: token p through the codec,
                                          written when p leaves the window (KIVI
                                          re-encodes as a token ages out)
Bytes count all three at the context T: min(T, sinks + window) exact tokens,
the rest coded.
"""

import torch
import torch.nn.functional as F

from lib.kv_cache import FullLayerCache
from lib.kv_pruning import by_query_head, causal_attention, kv_groups
from lib.vcache import TokenSelector, register_selector


def exact_mask(query_pos, key_pos, sinks, window):
    """(rows, keys) True where a query at query_pos reads key_pos's V exact."""
    return (key_pos[None, :] < sinks) | (query_pos[:, None] - key_pos[None, :] < window)


class SinksLayerCache(FullLayerCache):
    """Keys in full; V exact for the sinks and each query's window, through
    the codec for every older token (the module docstring's layout).

        _sink_rows  (B, nkv, sinks, hs)    V of positions 0 .. sinks-1
        _ring       (B, nkv, window, hs)   V of the last `window` positions, slot p % window
        _v_rows     (B, nkv, rows, width)  row p: token p through the codec, for
                                           sinks <= p < length - window (other rows never read)
    """

    def __init__(self, codec, sinks, window, capacity=0):
        self.sinks, self.window = sinks, window
        self._sink_rows = self._ring = None
        super().__init__(codec, capacity)

    @property
    def _coded_end(self):
        """Positions below this, and at or past `sinks`, are held through the codec."""
        return max(self.sinks, self.length - self.window)

    @property
    def v(self):
        """(B, nkv, n, width) the values stored through the codec."""
        end = self._coded_end
        return None if self.length == 0 or end == self.sinks else self._v_rows[:, :, self.sinks:end]

    @property
    def v_sinks(self):
        """(B, nkv, min(t, sinks), hs) the exact values of the first tokens."""
        return None if self.length == 0 or self.sinks == 0 else self._sink_rows[:, :, :min(self.length, self.sinks)]

    @property
    def v_window(self):
        """(B, nkv, n, hs) the exact values of the last tokens that are not sinks, in position order."""
        start = self._coded_end
        if self.length <= start:
            return None
        slots = torch.arange(start, self.length, device=self._ring.device) % self.window
        return self._ring.index_select(2, slots)

    def _held_v(self):
        return [x for x in (self.v, self.v_sinks, self.v_window) if x is not None]

    def v_elements_per_head(self):
        return sum(x.size(-2) * x.size(-1) for x in self._held_v())

    def v_bytes_per_head(self):
        return sum(x.size(-2) * x.size(-1) * x.element_size() for x in self._held_v())

    def nbytes(self):
        out = super().nbytes()
        v = sum(x.numel() * x.element_size() for x in self._held_v())
        return {**out, "v": v, "total": out["k"] + v + out["index"]}

    def _buffers_for(self, v, t0, t):
        """The exact buffers, and the coded rows' buffer with room for t rows (its
        first t0 kept), for V like v."""
        def fresh(rows, n):
            if rows is None or rows.shape[:2] != v.shape[:2] or rows.dtype != v.dtype or rows.device != v.device:
                return v.new_zeros(*v.shape[:2], n, v.size(-1))
            return rows
        self._sink_rows = fresh(self._sink_rows, self.sinks)
        self._ring = fresh(self._ring, self.window)
        probe = self.codec.write(v[:, :, :1])
        rows = self._v_rows
        if rows is None or rows.shape[:2] != probe.shape[:2] or rows.dtype != probe.dtype or \
                rows.device != probe.device or rows.size(-1) != probe.size(-1):
            rows = None
        self._v_rows = self._write(rows, probe[:, :, :0], t) if rows is None else self._room(rows, t0, t)

    def _prefill_values(self, q, v, t0, held):
        T = v.size(-2)
        t, W, S = t0 + T, self.window, self.sinks
        self._buffers_for(v, t0, t)
        lo = max(0, t0 - W)  # the exact values this prefill reads: positions lo .. t-1
        old = self._ring.index_select(2, torch.arange(lo, t0, device=v.device) % max(W, 1))
        recent = torch.cat([old.to(v.dtype), v], dim=-2)
        n = max(0, min(S, t) - t0)  # new tokens at sink positions
        self._sink_rows[:, :, t0:t0 + n] = v[:, :, :n]
        first, end = max(S, lo), max(S, t - W)  # tokens leaving the window now: first .. end-1
        if end > first:
            self._v_rows[:, :, first:end] = self.codec.write(recent[:, :, first - lo:end - lo])
        if W:
            keep = torch.arange(max(0, t - W), t, device=v.device)
            self._ring[:, :, keep % W] = recent[:, :, keep - lo]
        att = F.softmax(self._logits(q, t0), dim=-1)  # (B, nkv, g * T, t)
        key_pos = torch.arange(t, device=q.device)
        exact = exact_mask(self._row_pos(q, v.size(1), t0), key_pos, S, W)
        y = self._exact_read(att, exact, recent, lo)
        if end > S:
            y = y + self.codec.read(att.masked_fill(exact, 0.0)[..., S:end], self._v_rows[:, :, S:end])
        return by_query_head(y, T)

    def _exact_read(self, att, exact, recent, lo):
        """The sinks' and the window's share of the read: recent holds the exact V of positions lo ..."""
        s = min(self.sinks, att.size(-1))
        y = att[..., :s] @ self._sink_rows[:, :, :s].float()
        exact = exact.clone()
        exact[:, :s] = False  # a sink is read from its own rows
        return y + att.masked_fill(~exact, 0.0)[..., lo:] @ recent.float()

    def _step_values(self, att, v, pos, rows):
        S, W = self.sinks, self.window
        if S:  # a token at a sink position (a prefill shorter than sinks) gets its exact row
            at = pos.clamp(max=S - 1)
            self._sink_rows.index_copy_(2, at, torch.where(pos < S, v.to(self._sink_rows.dtype),
                                                           self._sink_rows.index_select(2, at)))
        if W:  # the token leaving the window is encoded into its row, the new one takes its slot
            gone, slot = pos - W, pos % W
            at = gone.clamp(min=0)
            coded = self.codec.write(self._ring.index_select(2, slot)).to(self._v_rows.dtype)
            self._v_rows.index_copy_(2, at, torch.where(gone >= S, coded, self._v_rows.index_select(2, at)))
            self._ring.index_copy_(2, slot, v.to(self._ring.dtype))
        else:
            self._v_rows.index_copy_(2, pos, self.codec.write(v).to(self._v_rows.dtype))
        p = F.softmax(att, dim=-1)  # (B, nkv, g, rows)
        key_pos = torch.arange(p.size(-1), device=p.device)
        exact = (key_pos < S) | (key_pos > pos - W)
        values = self._v_rows if rows is None else self._v_rows[:, :, :rows]
        y = self.codec.read(p.masked_fill(exact, 0.0), values)
        s = min(S, p.size(-1))
        y = y + p[..., :s] @ self._sink_rows[:, :, :s].float()
        if W:  # slot j holds position pos - ((pos - j) mod W)
            held = pos - torch.remainder(pos - torch.arange(W, device=p.device), W)
            weights = p.gather(-1, held.clamp(min=0).expand(*p.shape[:-1], W))
            y = y + weights.masked_fill(held < S, 0.0) @ self._ring.float()
        return y


@register_selector("sinks")
class Sinks(TokenSelector):
    """Every token's V; the first `sinks` and each query's last `window` exact, the rest through the codec."""

    defaults = {"sinks": 4, "window": 0}
    example = {"sinks": 3, "window": 5}

    def problems(self):
        out = []
        for name in ("sinks", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.block_size:
                out.append(f"{name} must be an int in [0, block_size = {self.block_size}), got {value!r}")
        if not out and not 1 <= self.sinks + self.window < self.block_size:
            out.append(f"sinks + window must be in [1, block_size = {self.block_size}), "
                       f"got {self.sinks} + {self.window} = {self.sinks + self.window}")
        return out

    def attend(self, q, k, v, dropout_p=0.0):
        return causal_attention(q, k, v, dropout_p)

    def attend_through(self, codec, q, k, v, dropout_p=0.0):
        coded = codec.roundtrip(v)
        T = v.size(-2)
        if not self.window:  # which V a key offers does not depend on the query
            s = min(self.sinks, T)
            return self.attend(q, k, torch.cat([v[:, :, :s], coded[:, :, s:]], dim=-2), dropout_p)
        pos = torch.arange(T, device=q.device)
        causal = pos[None, :] <= pos[:, None]
        exact = exact_mask(pos, pos, self.sinks, self.window)
        mask = torch.cat([causal & exact, causal & ~exact], dim=-1)  # each key once: exact or coded
        return F.scaled_dot_product_attention(q, torch.cat([k, k], dim=-2), torch.cat([v, coded], dim=-2),
                                              attn_mask=mask, dropout_p=dropout_p,
                                              enable_gqa=kv_groups(q, k, v) > 1)

    def make_cache(self, codec):
        return SinksLayerCache(codec, self.sinks, self.window, capacity=self.block_size)

    def held_tokens(self, T):
        return T

    def v_bytes(self, T, codec, dtype):
        exact = min(T, self.sinks + self.window)
        return exact * codec.head_dim * dtype.itemsize + (T - exact) * codec.stored_bytes(dtype)

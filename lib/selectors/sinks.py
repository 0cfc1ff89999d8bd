"""Every token's V, the first `sinks` tokens of a sequence exact (StreamingLLM's
attention sinks, KVTC's exact sinks).

A pretrained LM's first tokens draw much of most heads' attention, so a codec
that touches them costs far more than its reconstruction error suggests.
Here positions 0 .. sinks-1 keep V as it came; every later token's V goes
through the codec. Which V a key offers does not depend on the query, so
training attends over V with its first `sinks` rows exact and the rest
through codec.roundtrip, and the cache holds the same: the sinks in their own
rows, the codec's rows for the rest. Bytes count both.
"""

import torch
import torch.nn.functional as F

from lib.kv_cache import FullLayerCache
from lib.kv_pruning import by_query_head, causal_attention
from lib.vcache import TokenSelector, register_selector


class SinksLayerCache(FullLayerCache):
    """Keys in full; V of the first `sinks` tokens exact, every later token's through the codec.

        _sink_rows   (B, nkv, sinks, hs)  V of positions 0 .. sinks-1, as it came
        _v_rows      (B, nkv, rows, width) row t: token t through the codec (rows
                                           below `sinks` unused, zero, never read)
    """

    def __init__(self, codec, sinks, capacity=0):
        self.sinks = sinks
        self._sink_rows = None
        super().__init__(codec, capacity)

    @property
    def v(self):
        """(B, nkv, t - sinks, width) the values stored through the codec."""
        return None if self.length <= self.sinks else self._v_rows[:, :, self.sinks:self.length]

    @property
    def v_sinks(self):
        """(B, nkv, min(t, sinks), hs) the exact values of the first tokens."""
        return None if self.length == 0 else self._sink_rows[:, :, :min(self.length, self.sinks)]

    def v_elements_per_head(self):
        return sum(0 if x is None else x.size(-2) * x.size(-1) for x in (self.v, self.v_sinks))

    def v_bytes_per_head(self):
        return sum(0 if x is None else x.size(-2) * x.size(-1) * x.element_size() for x in (self.v, self.v_sinks))

    def nbytes(self):
        out = super().nbytes()
        sinks = self.v_sinks
        extra = 0 if sinks is None else sinks.numel() * sinks.element_size()
        return {**out, "v": out["v"] + extra, "total": out["total"] + extra}

    def _keep_sinks(self, v, t0):
        """The new tokens' V at positions below `sinks` into the sink rows."""
        if self._sink_rows is None or self._sink_rows.shape[:2] != v.shape[:2] or \
                self._sink_rows.dtype != v.dtype or self._sink_rows.device != v.device:
            self._sink_rows = v.new_zeros(*v.shape[:2], self.sinks, v.size(-1))
        n = max(0, min(self.sinks - t0, v.size(-2)))
        self._sink_rows[:, :, t0:t0 + n] = v[:, :, :n]

    def _read(self, weights, coded):
        """weights (B, nkv, rows_q, t) over every held token -> (B, nkv, rows_q, hs) fp32."""
        s = min(self.sinks, weights.size(-1))
        y = weights[..., :s] @ self._sink_rows[:, :, :s].float()
        return y if weights.size(-1) == s else y + self.codec.read(weights[..., s:], coded[:, :, s:])

    def _prefill_values(self, q, v, t0, held):
        self._keep_sinks(v, t0)
        self._v_rows = self._write(self._v_rows, self.codec.write(v), t0)
        att = F.softmax(self._logits(q, t0), dim=-1)  # (B, nkv, g * T_new, t)
        return by_query_head(self._read(att, self._v_rows[:, :, :self.length]), q.size(-2))

    def _step_values(self, att, v, pos, rows):
        # a step always follows a prefill of at least one token; a token at a
        # sink position still gets its exact row (a prefill shorter than sinks)
        self._sink_rows.index_copy_(2, pos.clamp(max=self.sinks - 1),
                                    torch.where(pos < self.sinks, v.to(self._sink_rows.dtype),
                                                self._sink_rows.index_select(2, pos.clamp(max=self.sinks - 1))))
        self._v_rows.index_copy_(2, pos, self.codec.write(v).to(self._v_rows.dtype))
        values = self._v_rows if rows is None else self._v_rows[:, :, :rows]
        return self._read(F.softmax(att, dim=-1), values)


@register_selector("sinks")
class Sinks(TokenSelector):
    """Every token's V; the first `sinks` tokens' exact, the rest through the codec."""

    defaults = {"sinks": 4}
    example = {"sinks": 3}

    def problems(self):
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or not 1 <= self.sinks < self.block_size:
            return [f"sinks must be an int in [1, block_size = {self.block_size}), got {self.sinks!r}"]
        return []

    def attend(self, q, k, v, dropout_p=0.0):
        return causal_attention(q, k, v, dropout_p)

    def attend_through(self, codec, q, k, v, dropout_p=0.0):
        coded = codec.roundtrip(v)
        s = min(self.sinks, v.size(-2))
        return self.attend(q, k, torch.cat([v[:, :, :s], coded[:, :, s:]], dim=-2), dropout_p)

    def make_cache(self, codec):
        return SinksLayerCache(codec, self.sinks, capacity=self.block_size)

    def held_tokens(self, T):
        return T

    def v_bytes(self, T, codec, dtype):
        s = min(self.sinks, T)
        return s * codec.head_dim * dtype.itemsize + (T - s) * codec.stored_bytes(dtype)

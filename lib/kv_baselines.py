"""The baselines KVSplice is measured against, at equal V-cache budget.

VQuantizer     KIVI-style per-token V quantization (Liu et al. 2024): int8 or
               int4 codes per group of channels, with a float16 scale and zero
               point per group. encode/decode plug into gpt2.kv_cache.LayerKVCache
               as v_encode/v_decode, and the scale and zero point travel inside
               the same uint8 tensor, so the cache's byte count includes them.
H2OLayerCache  Heavy-Hitter Oracle eviction (Zhang et al. 2023) of K and V:
               each (batch, head) holds `budget` tokens, the recency window plus
               the tokens with the largest accumulated attention, and a token
               evicted once is gone for good.

Both are baselines, written for clarity over speed.
"""

import math

import torch
import torch.nn.functional as F


def _round_down_fp16(x):
    """Largest float16 <= x (x float32), as float16."""
    h = x.half()
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


def _round_up_fp16(x):
    """Smallest float16 >= x (x float32), as float16."""
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)


class VQuantizer:
    """Asymmetric per-token, per-group quantization of V into one uint8 tensor.

    Per token (last dim = head_dim hs), in groups of `group_size` consecutive
    channels: zero = min, scale = (max - min) / (2^bits - 1), both float16,
    codes = round((v - zero) / scale) in [0, 2^bits - 1]. Layout of the
    packed last dim, per token:

        codes (hs * bits / 8 bytes; int4: two codes per byte, low nibble first)
        scales (hs / group_size float16, as bytes)
        zeros  (hs / group_size float16, as bytes)

    The zero point is rounded down and the scale up to float16, and the codes
    are computed with those stored values, so the grid zero .. zero + L*scale
    covers the group and |decode(encode(v)) - v| <= scale / 2 per element
    (plus float32 rounding), with scale the stored one. Values must lie within
    the float16 range (|v| < 65504), as V activations do; beyond it the scale
    overflows.
    """

    def __init__(self, bits, group_size=32, out_dtype=torch.float32):
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if group_size < 1 or (bits == 4 and group_size % 2):
            raise ValueError(
                f"group_size must be a positive integer (even for 4 bits), got {group_size}")
        self.bits, self.group_size, self.out_dtype = bits, group_size, out_dtype
        self.levels = 2 ** bits - 1

    def __repr__(self):
        return (f"VQuantizer(bits={self.bits}, group_size={self.group_size}, "
                f"out_dtype={self.out_dtype})")

    def _check_head_dim(self, hs):
        if hs % self.group_size:
            raise ValueError(f"head_dim {hs} is not divisible by group_size {self.group_size}")

    def bytes_per_token(self, hs):
        """Bytes one token's V (one head) takes: codes plus fp16 scale and zero per group."""
        self._check_head_dim(hs)
        return hs * self.bits // 8 + (hs // self.group_size) * 2 * 2

    def encode(self, v):
        """v (..., hs), any float dtype -> uint8 (..., bytes_per_token(hs))."""
        hs = v.size(-1)
        self._check_head_dim(hs)
        lead, G = v.shape[:-1], hs // self.group_size
        x = v.float().reshape(*lead, G, self.group_size)  # (..., G, gs)
        zero = _round_down_fp16(x.amin(-1))  # (..., G) float16
        scale = _round_up_fp16((x.amax(-1) - zero.float()) / self.levels)
        z, s = zero.float()[..., None], scale.float()[..., None]
        # a constant group stored exactly has scale 0: its codes are all 0
        codes = torch.where(s > 0, (x - z) / torch.where(s > 0, s, 1.0), 0.0)
        codes = codes.round().clamp(0, self.levels).to(torch.uint8).reshape(*lead, hs)
        if self.bits == 4:
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (..., hs / 2)
        return torch.cat([codes, scale.view(torch.uint8), zero.view(torch.uint8)], dim=-1)

    def decode(self, packed):
        """uint8 (..., X) from encode -> v (..., hs) in out_dtype."""
        if packed.dtype != torch.uint8:
            raise ValueError(f"expected the uint8 tensor encode() returns, got {packed.dtype}")
        X = packed.size(-1)
        # X = hs * bits / 8 + 4 * hs / group_size
        per = self.bits * self.group_size + 32  # 8 * group_size * bytes per group
        hs = X * 8 * self.group_size // per
        if hs == 0 or hs * per != X * 8 * self.group_size:
            raise ValueError(f"packed last dim {X} does not match any head_dim for {self!r}")
        n_code, G = hs * self.bits // 8, hs // self.group_size
        codes = packed[..., :n_code]
        if self.bits == 4:
            codes = torch.stack([codes & 0x0F, codes >> 4], dim=-1).flatten(-2)  # (..., hs)
        scale = packed[..., n_code:n_code + 2 * G].contiguous().view(torch.float16)  # (..., G)
        zero = packed[..., n_code + 2 * G:].contiguous().view(torch.float16)
        lead = packed.shape[:-1]
        x = codes.float().reshape(*lead, G, self.group_size)
        x = x * scale.float()[..., None] + zero.float()[..., None]
        return x.reshape(*lead, hs).to(self.out_dtype)


class H2OLayerCache:
    """H2O decode cache for one layer: K and V of at most `budget` tokens per (batch, head).

    Held per (batch, head), in position order (every row holds the same
    number of tokens, so the tensors stay dense):
        k      (B, nh, n, hs)  keys, in the input dtype
        v      (B, nh, n, X)   values as v_encode stores them (default: V itself)
        pos    (B, nh, n)      their positions
        score  (B, nh, n)      attention each received from all queries so far

    Each new token is appended; if that makes n > budget, the held token
    outside the recency window (position <= t - recency) with the lowest
    accumulated score is evicted for good (ties: the oldest). The new query
    then attends over the held tokens, so every query sees at most `budget`
    tokens, as under lib.kv_pruning.VOnlyPruner; the reference implementation
    attends over budget + 1 and evicts afterwards, a one-token difference.
    Prompts are processed one token at a time. H2O is not consistent with any
    full-sequence forward, so it is only ever evaluated through this cache.
    v_attend, if given, reads the held values (gpt2/vcache.py, VCodec.storage).
    """

    def __init__(self, budget, recency, v_encode=None, v_decode=None, v_attend=None):
        if not 1 <= recency <= budget:
            raise ValueError(f"need 1 <= recency <= budget, got recency {recency}, budget {budget}")
        if (v_encode is None) != (v_decode is None):
            raise ValueError("v_encode and v_decode come as a pair: got only one of them")
        self.budget, self.recency = budget, recency
        self.v_encode = v_encode or (lambda v: v)
        self.v_decode = v_decode or (lambda v: v)
        self.v_attend = v_attend or (lambda w, v: w @ self.v_decode(v).float())  # weights over stored values
        self.reset()

    def reset(self):
        self.length = 0    # tokens seen
        self.k = None      # (B, nh, n, hs)
        self.v = None      # (B, nh, n, hs)
        self.pos = None    # (B, nh, n) long
        self.score = None  # (B, nh, n) float32

    def __call__(self, q, k, v):
        return self.forward(q, k, v)

    def forward(self, q, k, v):
        """q, k, v: (B, nh, T_new, hs) for the new tokens -> y (B, nh, T_new, hs)."""
        ys = [self._step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
              for i in range(q.size(-2))]
        return torch.cat(ys, dim=-2)

    def _step(self, q, k, v):
        """One token: q, k, v (B, nh, 1, hs) -> y (B, nh, 1, hs)."""
        B, nh, _, hs = q.shape
        t = self.length
        self.length = t + 1
        pos = torch.full((B, nh, 1), t, dtype=torch.long, device=q.device)
        score = torch.zeros(B, nh, 1, device=q.device)
        v = self.v_encode(v)
        if self.k is None:  # start empty, so no held tensor is a view of the caller's
            self.k, self.v = k[..., :0, :], v[..., :0, :]
            self.pos, self.score = pos[..., :0], score[..., :0]
        self.k = torch.cat([self.k, k], dim=-2)
        self.v = torch.cat([self.v, v], dim=-2)
        self.pos = torch.cat([self.pos, pos], dim=-1)
        self.score = torch.cat([self.score, score], dim=-1)
        if self.pos.size(-1) > self.budget:
            self._evict_one(t)
        att = (q.float() @ self.k.float().transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        att = F.softmax(att, dim=-1)  # (B, nh, 1, n)
        self.score = self.score + att[..., 0, :]
        return self.v_attend(att, self.v).to(q.dtype)

    def _evict_one(self, t):
        """Drop, per (batch, head), the non-recent held token with the lowest score."""
        B, nh, n = self.pos.shape
        old = self.pos <= t - self.recency  # (B, nh, n); at least one since recency <= budget < n
        victim = self.score.masked_fill(~old, math.inf).argmin(-1, keepdim=True)  # first = oldest
        keep = torch.ones_like(old).scatter_(-1, victim, False)
        self.k = self.k[keep].view(B, nh, n - 1, -1)
        self.v = self.v[keep].view(B, nh, n - 1, -1)
        self.pos = self.pos[keep].view(B, nh, n - 1)
        self.score = self.score[keep].view(B, nh, n - 1)

    def v_elements_per_head(self):
        """V elements held per (batch, head): n tokens x stored width."""
        return 0 if self.v is None else self.v.size(-2) * self.v.size(-1)

    def nbytes(self):
        """Bytes of the tensors actually held: keys, values, positions and scores."""
        def size(*tensors):
            return sum(x.numel() * x.element_size() for x in tensors if x is not None)
        out = dict(k=size(self.k), v=size(self.v), index=size(self.pos, self.score))
        out["total"] = out["k"] + out["v"] + out["index"]
        return out

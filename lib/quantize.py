"""KIVI-style per-token V quantization (Liu et al. 2024), the int-b codecs.

b-bit codes (b = 2, 3, 4 or 8) per group of channels, packed into bytes,
with a float16 scale and zero point per group. encode/decode are the int
codecs' (lib/codecs/int.py), and the scale and zero point travel inside the
same uint8 tensor, so the cache's byte count includes them.
"""

import math

import torch


_CONSTANTS = {}


def _constant(name, device, make):
    """A small constant tensor, made (by make(), on the CPU) once per device."""
    if (name, device) not in _CONSTANTS:
        _CONSTANTS[name, device] = make().to(device)
    return _CONSTANTS[name, device]


def _fp16_toward(x, inf):
    """The float16 nearest x (float32) on the side of `inf` (-inf: at most x, +inf: at least x),
    as float16 and as its float32 value."""
    h = x.half()
    hf = h.float()
    passed = hf > x if inf < 0 else hf < x
    direction = _constant(f"fp16 {inf}", x.device, lambda: torch.tensor(inf, dtype=torch.float16))
    h = torch.where(passed, torch.nextafter(h, direction), h)
    return h, h.float()


def rms_fp16(u):
    """(..., n) -> (..., 1) float16: the root mean square of each vector, rounded
    up to float16, so codes computed with it use the scale that is stored."""
    return _fp16_toward(u.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-8), math.inf)[0]


BITS = (2, 3, 4, 8)  # the code widths pack_codes stores


def bits_problem(bits):
    """The problem of a code width that pack_codes does not store."""
    return f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}"


def codes_per_block(bits):
    """Codes that fill whole bytes: 8 / gcd(bits, 8) (2 bits: 4 codes in 1 byte, 3 bits: 8 in 3)."""
    return 8 // math.gcd(bits, 8)


def pack_codes(codes, bits):
    """b-bit codes uint8 (..., n), n a multiple of codes_per_block(bits) -> uint8
    (..., n * bits / 8). Widths that divide a byte (2, 4) store the codes in
    8 / bits planes: field i (bits i * bits and up) of byte j holds code
    i * n_bytes + j (4 bits: codes 0 .. n/2 - 1 in the low nibbles, the rest
    in the high ones), so each plane unpacks into one contiguous run. Others
    (3) store each block of codes as one little-endian bit string, code i at
    bit i * bits."""
    if bits == 8:
        return codes
    m = codes_per_block(bits)
    if 8 % bits == 0:  # shift each plane into place and add the disjoint fields
        shifts = _constant(f"planes {bits}", codes.device,
                           lambda: torch.arange(0, 8, bits, dtype=torch.uint8)[:, None])
        return (codes.reshape(*codes.shape[:-1], m, -1) << shifts).sum(-2, dtype=torch.uint8)
    blocks = codes.reshape(*codes.shape[:-1], codes.size(-1) // m, m).to(torch.int32)  # at most 24 bits a block
    value = (blocks << (torch.arange(m, device=codes.device) * bits)).sum(-1)
    shifts = torch.arange(bits * m // 8, device=codes.device) * 8
    return ((value[..., None] >> shifts) & 0xFF).to(torch.uint8).flatten(-2)


def unpack_codes(packed, bits, dtype=torch.uint8):
    """pack_codes' inverse: uint8 (..., n * bits / 8) -> codes (..., n) of `dtype`. Widths that
    divide a byte (2, 4) are shifted and masked one plane at a time straight into the output's
    contiguous run of that plane's codes (no gather, and no uint8 copy of the codes)."""
    if bits == 8:
        return packed.to(dtype)
    if 8 % bits == 0:
        planes = 8 // bits
        out = torch.empty(*packed.shape[:-1], planes, packed.size(-1), dtype=dtype, device=packed.device)
        for i in range(planes):
            field = packed >> (bits * i) if i else packed
            if i == planes - 1:  # the top field needs no mask
                out[..., i, :] = field
            else:
                torch.bitwise_and(field, 2 ** bits - 1, out=out[..., i, :])
        return out.flatten(-2)
    m = codes_per_block(bits)
    n_bytes = bits * m // 8
    blocks = packed.reshape(*packed.shape[:-1], packed.size(-1) // n_bytes, n_bytes).to(torch.int32)
    value = (blocks << (torch.arange(n_bytes, device=packed.device) * 8)).sum(-1)
    codes = (value[..., None] >> (torch.arange(m, device=packed.device) * bits)) & (2 ** bits - 1)
    return codes.to(dtype).flatten(-2)


class VQuantizer:
    """Asymmetric per-token, per-group quantization of V into one uint8 tensor.

    Per token (last dim = head_dim hs), in groups of `group_size` consecutive
    channels: zero = min, scale = (max - min) / (2^bits - 1), both float16,
    codes = round((v - zero) / scale) in [0, 2^bits - 1]. Layout of the
    packed last dim, per token:

        codes (hs * bits / 8 bytes, packed by pack_codes)
        scales (hs / group_size float16, as bytes)
        zeros  (hs / group_size float16, as bytes)

    The zero point is rounded down and the scale up to float16, and the codes
    are computed with those stored values, so the grid zero .. zero + L*scale
    covers the group and |decode(encode(v)) - v| <= scale / 2 per element
    (plus float32 rounding), with scale the stored one. Values must lie within
    the float16 range (|v| < 65504), as V activations do; beyond it the scale
    overflows.
    """

    def __init__(self, bits, group_size, out_dtype=torch.float32):
        if bits not in BITS:
            raise ValueError(bits_problem(bits))
        m = codes_per_block(bits)
        if not isinstance(group_size, int) or group_size < 1 or group_size % m:
            whole_bytes = f" (a multiple of {m} for {bits} bits, whose codes fill whole bytes in blocks of {m})"
            raise ValueError(f"group_size must be a positive integer{whole_bytes if m > 1 else ''}, got {group_size!r}")
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
        low, high = torch.aminmax(x, dim=-1)
        zero, z = _fp16_toward(low, -math.inf)  # (..., G) float16 and its value
        scale, s = _fp16_toward((high - z).div_(self.levels), math.inf)
        # x >= zero; a scale of 0 (a constant group stored exactly) leaves x - zero = 0: codes 0
        codes = (x - z[..., None]).div_(s.clamp_min_(2.0 ** -24)[..., None])
        codes = pack_codes(codes.round_().clamp_(0, self.levels).to(torch.uint8).view(*lead, hs), self.bits)
        return torch.cat([codes, scale.view(torch.uint8), zero.view(torch.uint8)], dim=-1)

    def _head_dim(self, packed):
        """The head_dim of uint8 (..., X) from encode: X = hs * bits / 8 + 4 * hs / group_size."""
        if packed.dtype != torch.uint8:
            raise ValueError(f"expected the uint8 tensor encode() returns, got {packed.dtype}")
        X = packed.size(-1)
        per = self.bits * self.group_size + 32  # 8 * group_size * bytes per group
        hs = X * 8 * self.group_size // per
        if hs == 0 or hs * per != X * 8 * self.group_size:
            raise ValueError(f"packed last dim {X} does not match any head_dim for {self!r}")
        return hs

    def _parts(self, packed):
        """uint8 (..., X) from encode -> (codes float32 (..., G, group_size), scales, zeros float32 (..., G))."""
        hs = self._head_dim(packed)
        n_code, G = hs * self.bits // 8, hs // self.group_size
        codes = unpack_codes(packed[..., :n_code], self.bits, torch.float32).view(*packed.shape[:-1], G, self.group_size)
        side = packed[..., n_code:].contiguous().view(torch.float16).float()  # (..., 2G): scales, zeros
        return codes, side[..., :G], side[..., G:]

    def decode(self, packed):
        """uint8 (..., X) from encode -> v (..., hs) in out_dtype."""
        codes, scale, zero = self._parts(packed)
        x = codes * scale[..., None] + zero[..., None]
        return x.flatten(-2).to(self.out_dtype)

    def weigh(self, weights, packed):
        """weights (..., T, n) fp32 @ decode(packed (..., n, X)) -> fp32 (..., T, hs), with the
        scale and zero point applied to the weights rather than to every code: per group g,
        sum_n w[n] (scale[n, g] codes[n] + zero[n, g]) = (w * scale[:, g]) @ codes + w @ zero[:, g].
        The groups are one matmul: the codes as (n * G, group_size) rows, read by a (G * T, n * G)
        matrix whose row (g, t) holds w[t] * scale[:, g] at the rows of group g, zero elsewhere.
        That multiplies the matmul's work by G: with many query rows (a prefill) it is the larger
        cost, and the codes are decoded first instead."""
        hs = self._head_dim(packed)
        G, gs = hs // self.group_size, self.group_size
        *lead, n, _ = packed.shape
        T = weights.size(-2)
        if G * T > 16:  # past a few rows the matmul is no longer one read of the codes
            return weights @ self.decode(packed).float()
        codes, scale, zero = self._parts(packed)  # (..., n, G, gs), (..., n, G) twice
        scaled = weights.unsqueeze(-1) * scale.unsqueeze(-3)  # (..., T, n, G)
        eye = _constant(f"eye {G}", weights.device, lambda: torch.eye(G).view(G, 1, 1, G))
        rows = (scaled.unsqueeze(-4) * eye).view(*lead, G * T, n * G)  # the block-diagonal (..., G, T, n, G)
        zero = (weights @ zero).transpose(-2, -1).unsqueeze(-1)  # (..., G, T, 1)
        y = (rows @ codes.view(*lead, n * G, gs)).view(*lead, G, T, gs).add_(zero)
        return y.view(*lead, 1, hs) if T == 1 else y.transpose(-3, -2).reshape(*lead, T, hs)


def width_layout(widths):
    """Per coordinate code widths (n,) ints in 0..8 -> (source, shift): bit p of
    the packed string is bit shift[p] of coordinate source[p] (coordinates in
    order, each code's bits low first)."""
    widths = torch.as_tensor(widths, dtype=torch.long)
    source = torch.repeat_interleave(torch.arange(widths.numel()), widths)
    start = torch.cumsum(widths, 0) - widths
    shift = torch.arange(source.numel()) - start[source]
    return source, shift


def pack_widths(codes, source, shift):
    """Codes uint8 (..., n), coordinate i at its own width (width_layout) ->
    uint8 (..., ceil(total / 8)): one little-endian bit string."""
    bits = (codes.long()[..., source] >> shift) & 1
    pad = -bits.size(-1) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(*bits.shape[:-1], pad)], dim=-1)
    weights = 2 ** torch.arange(8, device=codes.device)
    return (bits.unflatten(-1, (-1, 8)) * weights).sum(-1).to(torch.uint8)


def unpack_widths(packed, unpack_matrix):
    """pack_widths' inverse: uint8 (..., bytes) -> codes float (..., n).
    unpack_matrix (total, n) float: 2^shift[p] at [p, source[p]] (width_unpack_matrix)."""
    bits = (packed[..., None] >> torch.arange(8, device=packed.device)) & 1
    return bits.flatten(-2)[..., :unpack_matrix.size(0)].float() @ unpack_matrix


def width_unpack_matrix(source, shift, n):
    """(total, n) float32: the matrix unpack_widths multiplies the bits by."""
    out = torch.zeros(source.numel(), n)
    out[torch.arange(source.numel()), source] = (2.0 ** shift).float()
    return out

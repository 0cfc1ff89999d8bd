"""TurboQuant's shape: a fixed rotation, one scale per vector, b bits per coordinate.

    u = V R                       R: a seeded Hadamard (lib/codecs/rotated.py)
    s = rms(u), stored as fp16    one scale per vector: 2 bytes
    codes = round((u / s + c) / step) in [0, 2^b - 1], step = 2c / (2^b - 1)

After the rotation every coordinate of u / s has about the same distribution
(near a unit normal whatever V's channels looked like), so one uniform grid
on [-c, c] serves them all; the clip c is fitted on the layer's V samples
(the c of a grid that minimises the squared error of u / s). A 64-dim vector
holds 64 * b / 8 bytes of codes plus its scale: 18 bytes at 2 bits, 26 at 3.
The read dequantizes in the rotated space and applies Rᵀ once per query row,
after the weighted sum.
"""

import torch

from lib.codecs.rotated import rotation_matrix, rotation_problems
from lib.quantize import BITS, bits_problem, codes_per_block, pack_codes, rms_fp16, unpack_codes
from lib.vcache import VCodec, register_codec

CLIPS = torch.linspace(0.5, 5.0, 91)  # the clips the fit tries, in units of the vector's RMS


@register_codec("turbo")
class Turbo(VCodec):
    """A rotation, an fp16 RMS per vector and b bits per coordinate on a fitted clip."""

    defaults = {"bits": 2, "rotation": "hadamard", "seed": 0}
    example = {"bits": 3, "rotation": "orthogonal", "seed": 1}
    needs_fit = True
    bench_sweep = {"bits": (2, 3)}

    def problems(self):
        problems = []
        if self.bits not in BITS:
            problems.append(bits_problem(self.bits))
        elif self.head_dim % codes_per_block(self.bits):
            problems.append(f"head_dim {self.head_dim} is not a multiple of {codes_per_block(self.bits)}, "
                            f"the codes that fill whole bytes at {self.bits} bits")
        return problems + rotation_problems(self.rotation, self.seed, self.head_dim)

    def setup(self):
        self.register_buffer("rotation_matrix", rotation_matrix(self.rotation, self.head_dim, self.seed))
        self.register_buffer("clip", torch.ones(()))
        self.levels = 2 ** self.bits - 1

    def _quantize(self, x, clip):
        """x (..., n) in units of its RMS -> codes (..., n) uint8 on the grid of [-clip, clip]."""
        step = 2 * clip / self.levels
        return ((x + clip) / step).round().clamp(0, self.levels).to(torch.uint8)

    def _dequantize(self, codes, clip):
        return codes.float() * (2 * clip / self.levels) - clip

    def fit_state(self, samples, seed):
        u = samples.float() @ self.rotation_matrix
        x = u / rms_fp16(u).float()
        errors = torch.stack([(self._dequantize(self._quantize(x, c), c) - x).pow(2).mean() for c in CLIPS])
        best = int(errors.argmin())
        self.clip.fill_(CLIPS[best].item())
        return {"clip": CLIPS[best].item(), "relative_mse": errors[best].item()}

    def encode(self, v):
        u = v.float() @ self.rotation_matrix
        s = rms_fp16(u)  # (..., 1) float16
        codes = pack_codes(self._quantize(u / s.float(), self.clip), self.bits)
        return torch.cat([codes, s.view(torch.uint8)], dim=-1)

    def _rotated(self, stored):
        """The stored rows dequantized in the rotated space: (..., head_dim) fp32."""
        n_code = self.head_dim * self.bits // 8
        codes = unpack_codes(stored[..., :n_code], self.bits)
        s = stored[..., n_code:].contiguous().view(torch.float16).float()
        return self._dequantize(codes, self.clip) * s

    def decode(self, stored):
        return self._rotated(stored) @ self.rotation_matrix.T

    def weigh(self, weights, stored):
        return (weights @ self._rotated(stored)) @ self.rotation_matrix.T  # Rᵀ once per query row

    def bytes_per_vector(self, dtype):
        return self.head_dim * self.bits // 8 + 2

"""A fixed rotation before another codec (QuaRot, SpinQuant, TurboQuant's shape).

V's energy sits in a few channels (and a few tokens); a per-group quantizer
then spends its levels on the outliers. An orthogonal rotation R spreads the
energy evenly over the channels first, and is undone exactly:

    stored   = inner.encode(V R)
    decoded  = inner.decode(stored) Rᵀ
    read     = (Σ_i p_i inner.decode(stored_i)) Rᵀ

The read is linear, so the cache applies Rᵀ once per query row, after the
weighted sum, never per held token. R is a Hadamard matrix with seeded random
signs on its rows (a power-of-two head_dim; applied as one matmul, which at
head sizes of 64-128 is as fast as a fast Walsh-Hadamard transform in eager
PyTorch) or a seeded random orthogonal matrix (any head_dim). It is a buffer,
so it is saved with the method; every layer of a model holds the same R (the
record's seed).

The inner codec is any codec without a fit step: int-b, int4, int8, fp16, none.
"""

import math

import torch

from lib.codecs.int import IntB
from lib.settings import BadSettings
from lib.vcache import CODECS, VCodec, register_codec

ROTATIONS = ("hadamard", "orthogonal")


def hadamard(n):
    """The n x n Hadamard matrix (Sylvester's construction) over sqrt(n): orthogonal; n a power of two."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.size(0) < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / math.sqrt(n)


def rotation_problems(rotation, seed, head_dim):
    """The problems of a rotation's settings (one line each), for any codec that rotates."""
    problems = []
    if rotation not in ROTATIONS:
        problems.append(f"rotation must be one of {', '.join(ROTATIONS)}, got {rotation!r}")
    elif rotation == "hadamard" and head_dim & (head_dim - 1):
        problems.append(f"rotation 'hadamard' needs a power-of-two head_dim, got {head_dim}: use rotation 'orthogonal'")
    return problems + seed_problems(seed)


def seed_problems(seed):
    """The problem of a seed that is not an int >= 0 (one line), or none."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        return [f"seed must be an int >= 0, got {seed!r}"]
    return []


def rotation_matrix(kind, n, seed):
    """A seeded (n, n) orthogonal matrix, float32: Hadamard with random row signs, or random orthogonal."""
    g = torch.Generator().manual_seed(seed)
    if kind == "hadamard":
        signs = torch.randint(0, 2, (n, 1), generator=g, dtype=torch.float64) * 2 - 1
        return (signs * hadamard(n)).float()
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # signs fixed: Haar-distributed


@register_codec("rotated")
class Rotated(VCodec):
    """V R stored by the inner codec (a record); read back through Rᵀ once per query."""

    defaults = {"rotation": "hadamard", "seed": 0, "inner": {"kind": IntB.kind, **IntB.defaults}}
    example = {"rotation": "orthogonal", "seed": 1, "inner": {"kind": "int", "bits": 3, "group_size": 8}}
    bench_sweep = {"inner": ({"kind": "int", "bits": 2}, {"kind": "int", "bits": 3})}

    def problems(self):
        problems = rotation_problems(self.rotation, self.seed, self.head_dim)
        try:
            self._inner_codec()
        except BadSettings as e:
            problems += [f"inner: {p}" for p in e.problems]
        return problems

    def _inner_codec(self):
        spec = self.inner
        if not isinstance(spec, dict) or spec.get("kind") not in CODECS or spec.get("kind") == self.kind:
            known = ", ".join(k for k, cls in CODECS.items() if not cls.needs_fit and k != self.kind)
            raise BadSettings([f"expected a codec record {{'kind': ...}} of one of {known}, found {spec!r}"])
        cls = CODECS[spec["kind"]]
        if cls.needs_fit:
            raise BadSettings([f"{spec['kind']} needs a fit; a rotation goes before a codec without one"])
        try:
            return cls(self.head_dim, **{n: v for n, v in spec.items() if n != "kind"})
        except BadSettings as e:
            raise BadSettings([f"{spec['kind']}: {p}" for p in e.problems]) from None

    def setup(self):
        self.base = self._inner_codec()
        self.register_buffer("rotation_matrix", rotation_matrix(self.rotation, self.head_dim, self.seed))

    def params(self):
        return {**super().params(), "inner": self.base.record()}

    def encode(self, v):
        return self.base.encode((v.float() @ self.rotation_matrix).to(v.dtype))

    def decode(self, stored):
        return self.base.decode(stored).float() @ self.rotation_matrix.T

    def weigh(self, weights, stored):
        return self.base.read(weights, stored) @ self.rotation_matrix.T  # Rᵀ once per query row

    def bytes_per_vector(self, dtype):
        return self.base.stored_bytes(dtype)

"""A transform coder (KVTC's shape), with the KVSplice geometry as its transform.

    y = spline(V)                 optional: KVSplice's fitted monotone spline per channel
    u = (y - mean) B              B: the fitted PCA basis (the geometry's, all head_dim
                                  components), or a seeded random rotation
    s = rms(u), stored as fp16    one scale per vector: 2 bytes
    code_i = round((u_i / s + c_i) / step_i) on 2^w_i levels over [-c_i, c_i]

Coordinate i gets w_i bits (0 to 8), sum_i w_i = bits * head_dim, packed
into one bit string: ceil(bits * head_dim / 8) bytes of codes plus the scale.
`allocate` says how the bits are spread:
    "variance"  by dynamic programming over the fitted quantizers' errors
                (KVTC; reverse water-filling when the errors go as
                sigma_i^2 4^-w): a high-variance component gets more bits,
                a negligible one none
    "equal"     floor(bits) bits on every coordinate and one more on the first
                (bits * head_dim) mod head_dim (with the PCA basis, the
                highest-variance ones)
Each clip c_i is fitted for its width on the layer's samples (the clip of a
grid that minimises the squared error of u_i / s). A coordinate with no bits
decodes to 0 (its fitted mean).

So basis "pca" with allocate "equal" is the fitted basis as the rotation
before b-bit quantization, "pca" with "variance" the transform coder, and
`spline` puts KVSplice's spline (fitted as SplinePCA at k = `spline_k`,
kept only where it beats plain PCA held out) before either; basis "hadamard"
or "orthogonal" with "equal" is TurboQuant's shape at fractional bits. Without
the spline the read is linear and applies Bᵀ once per query row, after the
weighted sum; with it, each held row is decoded (the spline's inverse is
per token).
"""

import math

import torch

from lib.codecs.rotated import ROTATIONS, rotation_matrix, rotation_problems, seed_problems
from lib.kvsplice import FIT_EPOCHS, FIT_LR, KNOTS, MonotoneSpline, SplinePCA
from lib.quantize import pack_widths, rms_fp16, unpack_widths, width_layout, width_unpack_matrix
from lib.vcache import VCodec, register_codec

BASES = ("pca",) + ROTATIONS
ALLOCATIONS = ("variance", "equal")
MAX_WIDTH = 8
CLIPS = torch.linspace(0.25, 5.0, 20)  # the clips the fit tries, in units of the coordinate's RMS
FIT_ROWS = 16384  # rows the mean and basis are fitted on
CLIP_ROWS = 2048  # of those, rows each coordinate's clips are fitted on


def _quantize(x, clip, levels):
    """x (..., n) -> codes (..., n) float on `levels` + 1 levels over [-clip, clip] (0 levels: code 0)."""
    step = 2 * clip / levels.clamp_min(1)
    return ((x + clip) / step).round().clamp(min=torch.zeros_like(levels), max=levels)


def _dequantize(codes, clip, levels):
    return torch.where(levels > 0, codes * (2 * clip / levels.clamp_min(1)) - clip, torch.zeros_like(clip))


def allocate_bits(errors, total):
    """errors (n, widths): coordinate i's squared error at w = 0, 1, ... bits -> the
    widths (n,) summing to `total` with the least summed error (dynamic programming)."""
    n, top = errors.size(0), min(errors.size(1) - 1, total)
    best = torch.full((total + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for i in range(n):
        options = torch.full((top + 1, total + 1), math.inf, dtype=torch.float64)
        for w in range(top + 1):
            options[w, w:] = best[:total + 1 - w] + errors[i, w].double()
        best, choice = options.min(0)
        choices.append(choice)
    widths, left = [], total
    for choice in reversed(choices):
        w = int(choice[left])
        widths.append(w)
        left -= w
    return torch.tensor(widths[::-1])


@register_codec("transform")
class Transform(VCodec):
    """spline (optional) -> centre -> basis -> per-vector RMS -> w_i bits per coordinate."""

    defaults = {"basis": "pca", "bits": 2.25, "allocate": "variance", "spline": False,
                "spline_k": 16, "knots": KNOTS, "seed": 0}
    example = {"basis": "pca", "bits": 2.5, "allocate": "variance", "spline": True, "spline_k": 4, "knots": 3}
    needs_fit = True
    fit_defaults = {"epochs": FIT_EPOCHS, "lr": FIT_LR, "warp": None}
    bench_sweep = {"bits": (1.75, 2.25)}

    def problems(self):
        D, out = self.head_dim, []
        if self.basis not in BASES:
            out.append(f"basis must be one of {', '.join(BASES)}, got {self.basis!r}")
        out += rotation_problems(self.basis, self.seed, D) if self.basis in ROTATIONS else seed_problems(self.seed)
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)) or \
                not 0 < self.bits <= MAX_WIDTH or self.bits * D != round(self.bits * D):
            out.append(f"bits must be a number in (0, {MAX_WIDTH}] with bits * head_dim ({D}) a whole number "
                       f"of bits, got {self.bits!r}")
        if self.allocate not in ALLOCATIONS:
            out.append(f"allocate must be one of {', '.join(ALLOCATIONS)}, got {self.allocate!r}")
        if not isinstance(self.spline, bool):
            out.append(f"spline must be true or false, got {self.spline!r}")
        if not isinstance(self.spline_k, int) or isinstance(self.spline_k, bool) or not 1 <= self.spline_k < D:
            out.append(f"spline_k must be an int in [1, head_dim = {D}), got {self.spline_k!r}")
        if not isinstance(self.knots, int) or isinstance(self.knots, bool) or self.knots < 1:
            out.append(f"knots must be an int >= 1, got {self.knots!r}")
        return out

    @property
    def total_bits(self):
        return round(self.bits * self.head_dim)

    def setup(self):
        D = self.head_dim
        if self.spline:
            self.warp = MonotoneSpline(D, self.knots).requires_grad_(False)
        self.register_buffer("mean", torch.zeros(D))
        self.register_buffer("axes", torch.eye(D) if self.basis == "pca" else
                             rotation_matrix(self.basis, D, self.seed))
        self.register_buffer("widths", self._equal_widths())
        self.register_buffer("clip", torch.ones(D))
        for name in ("levels", "source", "shift", "unpack"):
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(_relayout)
        self._layout()

    def _equal_widths(self):
        D, total = self.head_dim, self.total_bits
        return torch.full((D,), total // D) + (torch.arange(D) < total % D)

    @torch.no_grad()
    def _layout(self):
        """The packing layout and levels, from the widths (after setup, fit and load)."""
        source, shift = width_layout(self.widths.cpu())
        device = self.widths.device
        self.levels = (2.0 ** self.widths.float() - 1)
        self.source, self.shift = source.to(device), shift.to(device)
        self.unpack = width_unpack_matrix(source, shift, self.head_dim).to(device)

    # ---- fit ----

    def fit_rows(self):
        return self.head_dim + 1, max(FIT_ROWS, 2000 * self.spline_k) if self.spline else FIT_ROWS

    def fit_state(self, samples, seed, epochs, lr, warp):
        """With the spline: fitted here, or `warp`, the state of a spline fitted on
        the same samples by another codec (codecs that differ only after the
        spline share one fit: the frontier's)."""
        stats = {}
        if self.spline and warp is not None:
            self.warp.load_state_dict(warp)
        elif self.spline:
            stats = self.fit_warp(samples, seed, epochs, lr)
        return {**stats, **self.fit_quantizers(samples, seed)}

    def fit_warp(self, samples, seed, epochs, lr):
        """The spline alone, fitted as SplinePCA at k = spline_k (kept only where it
        beats plain PCA held out)."""
        geometry = SplinePCA(self.head_dim, self.spline_k, self.knots)
        fit = geometry.fit(samples.float(), epochs=epochs, lr=lr, seed=seed)
        self.warp.load_state_dict(geometry.spline.state_dict())
        self.warp.requires_grad_(False)
        return {n: fit[n] for n in ("kept_spline", "spline_val_mse", "pca_val_mse")}

    def fit_quantizers(self, samples, seed):
        """Everything after the spline: the mean, the basis, the widths and each coordinate's clip."""
        x = self.warp(samples.float()) if self.spline else samples.float()
        rows = x[torch.randperm(x.size(0), generator=torch.Generator().manual_seed(seed))[:FIT_ROWS]]
        self.mean.copy_(rows.mean(0))
        centred = rows - self.mean
        if self.basis == "pca":
            _, vectors = torch.linalg.eigh(centred.T.double() @ centred.double() / rows.size(0))
            self.axes.copy_(vectors.flip(-1).float())  # columns by variance, highest first
        u = centred @ self.axes
        normed = u / rms_fp16(u).float()
        errors, clips = self._quantizer_errors(normed[:CLIP_ROWS])  # (D, MAX_WIDTH + 1) each
        widths = allocate_bits(errors, self.total_bits) if self.allocate == "variance" else self._equal_widths()
        self.widths.copy_(widths)
        self.clip.copy_(clips.gather(1, widths[:, None].to(clips.device)).squeeze(1))
        self._layout()
        chosen = errors.gather(1, widths[:, None]).squeeze(1)
        return {"relative_mse": (chosen.sum() / normed.pow(2).mean(0).sum()).item(),
                "max_width": int(widths.max()), "zero_width": int((widths == 0).sum())}

    @staticmethod
    def _quantizer_errors(x):
        """x (N, D) -> (errors, clips) (D, MAX_WIDTH + 1): per coordinate and
        width, the least mean squared error over CLIPS (in units of the
        coordinate's RMS) and its clip; at width 0 the error of decoding 0."""
        rms = x.pow(2).mean(0).sqrt().clamp_min(1e-12)
        errors = torch.empty(x.size(1), MAX_WIDTH + 1)
        clips = torch.zeros(x.size(1), MAX_WIDTH + 1)
        errors[:, 0] = x.pow(2).mean(0)
        for w in range(1, MAX_WIDTH + 1):
            levels = torch.full((x.size(1),), 2.0 ** w - 1)
            trials = torch.stack([(_dequantize(_quantize(x, c * rms, levels), c * rms, levels) - x).pow(2).mean(0)
                                  for c in CLIPS])  # (clips, D)
            best = trials.argmin(0)
            errors[:, w] = trials.gather(0, best[None]).squeeze(0)
            clips[:, w] = CLIPS[best] * rms
        return errors, clips

    # ---- the codec ----

    def _coordinates(self, v):
        y = self.warp(v.float()) if self.spline else v.float()
        return (y - self.mean) @ self.axes

    def encode(self, v):
        u = self._coordinates(v)
        s = rms_fp16(u)
        codes = _quantize(u / s.float(), self.clip, self.levels)
        return torch.cat([pack_widths(codes, self.source, self.shift), s.view(torch.uint8)], dim=-1)

    def _scaled(self, stored):
        """The stored rows dequantized in the basis' coordinates, times their scale: (..., head_dim) fp32."""
        n_code = math.ceil(self.total_bits / 8)
        codes = unpack_widths(stored[..., :n_code], self.unpack)
        s = stored[..., n_code:].contiguous().view(torch.float16).float()
        return _dequantize(codes, self.clip, self.levels) * s

    def decode(self, stored):
        y = self._scaled(stored) @ self.axes.T + self.mean
        return self.warp.inverse(y) if self.spline else y

    def weigh(self, weights, stored):
        if self.spline:  # the spline's inverse is per token
            return weights @ self.decode(stored)
        return (weights @ self._scaled(stored)) @ self.axes.T + weights.sum(-1, keepdim=True) * self.mean

    def bytes_per_vector(self, dtype):
        return math.ceil(self.total_bits / 8) + 2


def _relayout(codec, incompatible_keys):
    codec._layout()

"""A V codec with a fit step, in one file: V minus its layer's fitted mean,
times a fitted per-dimension scale, rounded to int8."""

import torch

from lib.vcache import VCodec, register_codec


@register_codec("centred_int8")
class CentredInt8(VCodec):
    """int8 codes of (V - mean) / scale, mean and scale fitted from V samples."""

    needs_fit = True

    def setup(self):
        self.register_buffer("mean", torch.zeros(self.head_dim))
        self.register_buffer("scale", torch.ones(self.head_dim))

    def fit_state(self, samples, seed):
        self.mean.copy_(samples.mean(0))
        self.scale.copy_((samples - self.mean).abs().amax(0).clamp(min=1e-6) / 127)
        return {"largest_scale": self.scale.max().item()}

    def encode(self, v):
        return ((v.float() - self.mean) / self.scale).round().clamp(-127, 127).to(torch.int8)

    def decode(self, stored):
        return stored.float() * self.scale + self.mean

    def bytes_per_vector(self, dtype):
        return self.head_dim  # one int8 per dimension

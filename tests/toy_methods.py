"""Three toy V-cache methods, each registered here and nowhere else: a token
selector, a codec, and a codec with a fit step. tests/test_vcache.py runs
them through every check of the registered methods, trains and decodes with
them, and never edits the model, the trainer or the benchmark for them."""

import torch

from lib.kv_pruning import TokenKeep
from lib.vcache import FittedCodec, KeepRule, VCodec, register_codec, register_selector, straight_through


class _EvenFirst(TokenKeep):
    """The window, plus older tokens at even positions first (latest first)."""

    def score(self, received, positions):
        return (positions % 2 == 0).to(received.dtype).expand_as(received)


@register_selector("even_first")
class EvenFirst(KeepRule):
    example = {"window": 4, "older": 6}

    def __init__(self, block_size, window=4, older=6):
        super().__init__(block_size, _EvenFirst(window + older, window, block_size))

    def params(self):
        return {"window": self.rule.recency, "older": self.rule.budget - self.rule.recency}


@register_codec("fp16")
class Float16(VCodec):
    """V stored as float16."""

    def encode(self, v):
        return v.half()

    def decode(self, h):
        return h.float()

    def roundtrip(self, v):
        return v.half().to(v.dtype)

    def stored_bytes(self, dtype):
        return 2 * self.head_dim


@register_codec("centred_int8")
class CentredInt8(FittedCodec):
    """V minus its layer's fitted mean, times a fitted per-dimension scale,
    rounded to int8: the state (mean, scale) is fitted from V samples."""

    def __init__(self, head_dim):
        super().__init__(head_dim)
        self.register_buffer("mean", torch.zeros(head_dim))
        self.register_buffer("scale", torch.ones(head_dim))

    def fit(self, samples, seed=0, **options):
        self.mean.copy_(samples.mean(0))
        self.scale.copy_((samples - self.mean).abs().amax(0).clamp(min=1e-6) / 127)
        self.mark_fitted()
        return {"rows": samples.shape[0]}

    def encode(self, v):
        return ((v.float() - self.mean) / self.scale).round().clamp(-127, 127).to(torch.int8)

    def decode(self, codes):
        return codes.float() * self.scale + self.mean

    def roundtrip(self, v):
        return straight_through(v, self.decode(self.encode(v)).to(v.dtype)) if self.fitted else v

    def storage(self):
        return super().storage() if self.fitted else {}

    def stored_bytes(self, dtype):
        return self.head_dim if self.fitted else self.head_dim * torch.empty((), dtype=dtype).element_size()

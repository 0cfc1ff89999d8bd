"""V stored as float16: half the bytes of fp32 V, rounding within float16's 11 bits."""

import torch

from lib.vcache import VCodec, register_codec


@register_codec("fp16")
class Float16(VCodec):
    """V stored as float16 (values beyond its range become inf)."""

    def encode(self, v):
        return v.half()

    def decode(self, stored):
        return stored.float()

    def bytes_per_vector(self, dtype):
        return self.head_dim * torch.float16.itemsize

"""KIVI-style per-token V quantization (lib/quantize.py): int8 and int4."""

from lib.quantize import VQuantizer
from lib.vcache import VCodec, register_codec


class _Quantized(VCodec):
    """Codes plus a float16 scale and zero point per group of `group_size`
    channels, all in one uint8 tensor (lib.quantize.VQuantizer); training
    sees the dequantized V with the gradient passed straight through."""

    bits = None
    defaults = {"group_size": 32}
    example = {"group_size": 8}
    bench_with_selectors = dict(defaults)

    def problems(self):
        try:
            VQuantizer(self.bits, self.group_size).bytes_per_token(self.head_dim)
        except ValueError as e:
            return [str(e)]
        return []

    def setup(self):
        self.quant = VQuantizer(self.bits, self.group_size)

    def encode(self, v):
        return self.quant.encode(v)

    def decode(self, stored):
        return self.quant.decode(stored)

    def bytes_per_vector(self, dtype):
        return self.quant.bytes_per_token(self.head_dim)


@register_codec("int8")
class Int8(_Quantized):
    bits = 8


@register_codec("int4")
class Int4(_Quantized):
    bits = 4

"""KIVI-style per-token V quantization (lib/quantize.py): int-b for b = 2, 3,
4 or 8 (`int`, bits a setting), and int8 and int4 as kinds of their own."""

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

    def weigh(self, weights, stored):
        return self.quant.weigh(weights, stored)

    def bytes_per_vector(self, dtype):
        return self.quant.bytes_per_token(self.head_dim)


@register_codec("int8")
class Int8(_Quantized):
    bits = 8


@register_codec("int4")
class Int4(_Quantized):
    bits = 4


@register_codec("int")
class IntB(_Quantized):
    """b-bit codes, b a setting: `{"kind": "int", "bits": 2}` stores 64 * 2 / 8
    = 16 bytes of codes per 64-dim vector, plus 4 bytes of scale and zero point
    per group (24 bytes in groups of 32)."""

    defaults = {"bits": 4, "group_size": 32}
    example = {"bits": 3, "group_size": 8}
    bench_sweep = {"bits": (2, 3)}  # int4 and int8 have rows of their own
    bench_with_selectors = None

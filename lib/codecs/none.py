"""V as it is."""

from lib.vcache import VCodec, register_codec


@register_codec("none")
class NoCodec(VCodec):
    """V as it is: the identity, whose gradient passes as it is."""

    straight_through_grad = False
    bench_with_selectors = {}

    def encode(self, v):
        return v

    def decode(self, stored):
        return stored

    def bytes_per_vector(self, dtype):
        return self.head_dim * dtype.itemsize

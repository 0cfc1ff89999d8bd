"""Every token's V: the reference."""

from lib.kv_cache import FullLayerCache
from lib.kv_pruning import causal_attention
from lib.vcache import TokenSelector, register_selector


@register_selector("full")
class Full(TokenSelector):
    """Every token's V."""

    def attend(self, q, k, v, dropout_p=0.0):
        return causal_attention(q, k, v, dropout_p)

    def make_cache(self, codec):
        return FullLayerCache(codec, capacity=self.block_size)

    def held_tokens(self, T):
        return T

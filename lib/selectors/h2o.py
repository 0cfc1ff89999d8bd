"""H2O (Zhang et al. 2023): heavy-hitter eviction of K and V."""

from lib.codecs.none import NoCodec
from lib.kv_cache import H2OLayerCache
from lib.vcache import TokenSelector, register_selector


@register_selector("h2o")
class H2O(TokenSelector):
    """Heavy-hitter eviction of K and V (lib.kv_cache.H2OLayerCache).

    H2O has no full-sequence form: its scores keep changing, so which tokens
    a query sees depends on every eviction before it. `attend` therefore
    runs its cache over the sequence token by token (slow, no dropout), on V
    already through the codec, and decoding equals it only in that sense:
    exact = False.
    """

    defaults = {"budget": 256, "recency": 128}
    example = {"budget": 10, "recency": 4}
    exact = False
    bench_role = "equal_bytes"

    def problems(self):
        return H2OLayerCache.problems(self.budget, self.recency)

    def attend(self, q, k, v, dropout_p=0.0):
        return self.make_cache(NoCodec(v.size(-1)))(q, k, v)

    def make_cache(self, codec):
        return H2OLayerCache(self.budget, self.recency, codec)

    def held_tokens(self, T):
        return min(T, self.budget)

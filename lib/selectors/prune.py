"""V-only pruning (lib/kv_pruning.py): the recency window plus the older
tokens that received the most attention in theirs."""

from lib.kv_pruning import K_MIN, KEEP_RATIO, RECENCY, VOnlyPruner
from lib.vcache import KeepRule, register_selector


@register_selector("prune")
class Prune(KeepRule):
    """V-only pruning: the window plus the older tokens that received the most attention."""

    defaults = {"keep_ratio": KEEP_RATIO, "k_min": K_MIN, "recency": RECENCY}
    example = {"keep_ratio": 0.25, "k_min": 8, "recency": 4}
    bench_role = "method"

    def setup(self):
        self.rule = VOnlyPruner(self.keep_ratio, self.k_min, self.recency, self.block_size)

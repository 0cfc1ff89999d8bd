"""A control for pruning: its budget and window, older tokens kept at random."""

from lib.kv_pruning import K_MIN, KEEP_RATIO, RECENCY, RandomKeep
from lib.vcache import KeepRule, register_selector


@register_selector("random")
class Random(KeepRule):
    """Control for pruning: its budget and window, older tokens chosen by a fixed hash of (seed, head, position)."""

    defaults = {"keep_ratio": KEEP_RATIO, "k_min": K_MIN, "recency": RECENCY, "seed": 0}
    example = {"keep_ratio": 0.25, "k_min": 8, "recency": 4, "seed": 3}
    bench_role = "control"

    def setup(self):
        self.rule = RandomKeep(self.keep_ratio, self.k_min, self.recency, self.block_size, self.seed)

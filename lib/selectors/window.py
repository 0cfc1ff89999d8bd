"""A control: a sliding window of V."""

from lib.kv_pruning import RECENCY, SlidingWindow
from lib.vcache import KeepRule, register_selector


@register_selector("window")
class Window(KeepRule):
    """Control: only the last `window` tokens' V (keys in full)."""

    defaults = {"window": RECENCY}
    example = {"window": 6}
    bench_role = "control"

    def setup(self):
        self.rule = SlidingWindow(self.window, self.block_size)

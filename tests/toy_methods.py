"""Toy V-cache methods, registered from the test files alone: a token
selector here, and the documented example codec (tests/example_codec.py).
tests/test_vcache.py runs them through every check of the registered
methods, trains and decodes with them, and never edits the model, the
trainer or the benchmark for them."""

import example_codec  # noqa: F401  (registers centred_int8)
from lib.kv_pruning import TokenKeep
from lib.vcache import KeepRule, register_selector


class _EvenFirst(TokenKeep):
    """The window, plus older tokens at even positions first (latest first)."""

    def score(self, received, positions):
        return (positions % 2 == 0).to(received.dtype).expand_as(received)


@register_selector("even_first")
class EvenFirst(KeepRule):
    """The window, plus `older` tokens, even positions first."""

    defaults = {"window": 4, "older": 6}
    example = {"window": 4, "older": 6}

    def setup(self):
        self.rule = _EvenFirst(self.window + self.older, self.window, self.block_size)

"""A settable clock for the aggregator's tests: deadlines pass without sleeping."""

from __future__ import annotations


class Clock:
    """Returns `now`, which a test moves forward by hand."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

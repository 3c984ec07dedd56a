"""Valid ranges ``[low, high)`` shared by op arguments and declared hyperparameters."""

from __future__ import annotations

import math


class RangeMixin:
    """For a class with ``low``, ``high``, ``low_closed`` and ``high_closed`` attributes."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    def range_text(self) -> str:
        def show(x: float) -> str:
            return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"
        return ("[" if self.low_closed else "(") + f"{show(self.low)}, {show(self.high)}" + \
            ("]" if self.high_closed else ")")

    @property
    def has_range(self) -> bool:
        return self.low != -math.inf or self.high != math.inf

    def in_range(self, v: float) -> bool:
        if isinstance(v, float) and math.isnan(v):
            return False
        return ((v >= self.low) if self.low_closed else (v > self.low)) and \
            ((v <= self.high) if self.high_closed else (v < self.high))

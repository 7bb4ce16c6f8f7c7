"""Token budgets: how many input tokens one request may carry, and how our counts are corrected.

Our counts come from cl100k_base; Claude's tokenizer differs (by model, and
by kind of text). Every estimate is scaled by a per-model *correction factor*
that starts conservative and calibrates itself from the ``usage`` the API
reports: for each request, actual input (``input_tokens +
cache_creation_input_tokens + cache_read_input_tokens``) over our raw count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

#: Context windows (input + output tokens), from the model pages (late 2026).
CONTEXT_WINDOWS: Final[dict[str, int]] = {
    "claude-opus-5-5": 1_000_000,
    "claude-sonnet-5-5": 1_000_000,
    "claude-haiku-5-5": 1_000_000,
    "claude-sonnet-4-6": 1_000_000,
    "claude-haiku-4-5": 200_000,
}
#: For a model we know nothing of: the smallest window current models have.
DEFAULT_CONTEXT_WINDOW: Final = 200_000

#: The default ``max_tokens`` convo asks for when the caller gives none.
DEFAULT_MAX_TOKENS: Final = 4_096

#: Correction factor before any calibration: Claude's newer tokenizer gives
#: about 30% more tokens than cl100k on English, more on code. Over-estimating
#: costs some context; under-estimating would send an oversized request.
DEFAULT_FACTOR: Final = 1.35
#: Weight of a new observation in the running factor.
CALIBRATION_WEIGHT: Final = 0.3
#: No tokenizer we know of counts more than twice cl100k: a turn whose raw count
#: times this fits the budget fits whatever the calibration says.
FACTOR_CEILING: Final = 2.0
#: The factor used is the calibrated one plus this margin.
CALIBRATION_MARGIN: Final = 0.03
#: Observations on tiny requests say little (fixed overheads dominate).
MIN_CALIBRATION_TOKENS: Final = 200


def reported_input_tokens(usage: Mapping[str, Any]) -> int:
    """A request's whole input as the API reports it: uncached + cache write + cache read."""
    return sum(
        int(usage.get(key) or 0)
        for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )


def context_window(model: str) -> int:
    """The model's context window; a dated snapshot id counts as its alias."""
    if model in CONTEXT_WINDOWS:
        return CONTEXT_WINDOWS[model]
    for alias, window in CONTEXT_WINDOWS.items():
        if model.startswith(alias + "-"):
            return window
    return DEFAULT_CONTEXT_WINDOW


def effective_budget(token_budget: int | None, *, model: str, max_tokens: int) -> int:
    """Input tokens one request may carry: the budget, capped by the window minus output."""
    ceiling = context_window(model) - max_tokens
    return ceiling if token_budget is None else min(token_budget, ceiling)


@dataclass(frozen=True, slots=True)
class Calibration:
    """The correction factor of one model, and how many observations made it."""

    factor: float = DEFAULT_FACTOR
    samples: int = 0

    @property
    def effective_factor(self) -> float:
        return self.factor + CALIBRATION_MARGIN if self.samples else self.factor

    def scale(self, raw_tokens: int) -> int:
        """Our estimate of Claude's count for ``raw_tokens`` cl100k tokens."""
        return math.ceil(raw_tokens * self.effective_factor)

    def observe(self, raw_tokens: int, actual_tokens: int) -> Calibration:
        """The calibration after one request: ``actual_tokens`` reported for ``raw_tokens``."""
        if raw_tokens < MIN_CALIBRATION_TOKENS or actual_tokens <= 0:
            return self
        ratio = actual_tokens / raw_tokens
        if not self.samples:
            return Calibration(ratio, 1)
        factor = (1 - CALIBRATION_WEIGHT) * self.factor + CALIBRATION_WEIGHT * ratio
        return Calibration(factor, self.samples + 1)

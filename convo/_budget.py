"""Token budgets: how many input tokens one request may carry, and how our counts are corrected.

Our counts come from cl100k_base; Claude's tokenizer differs (by model, and
by kind of text). Every estimate is scaled by a per-model *correction factor*
that starts conservative and calibrates itself from the ``usage`` the API
reports: for each request, actual input (``input_tokens +
cache_creation_input_tokens + cache_read_input_tokens``) over our raw count.

Only requests made of text (by our counter's reckoning) calibrate: an image or
a PDF is an estimate of the API's charge, not a tokenizer count, and one small
image once dragged the factor to 0.04. The first observation is blended with
the prior, the factor stays within [1.0, 2.0], and it is shared by every
conversation on the model (a new conversation starts calibrated; the faster
upward step keeps it on the safe side when conversations' text differs).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .errors import InvalidInput

ENV_MODEL: Final = "CONVO_MODEL"
#: A current, non-deprecated model from the SDK's list.
DEFAULT_MODEL: Final = "claude-sonnet-5-5"


def default_model() -> str:
    """The model of conversations that name none: ``CONVO_MODEL``, else convo's default."""
    return os.environ.get(ENV_MODEL) or DEFAULT_MODEL


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
#: Bounds of the factor. Every measurement we know of puts Claude's tokenizers
#: above cl100k (+16% on English for an older one, +30% more for the newer), so
#: below 1.0 an observation says our estimate of the request was wrong, not the
#: tokenizer; and no tokenizer we know of counts more than twice cl100k: a turn
#: whose raw count times the ceiling fits the budget fits whatever the calibration says.
FACTOR_FLOOR: Final = 1.0
FACTOR_CEILING: Final = 2.0
#: Weight of a new observation in the running factor: a ratio above the factor
#: (we under-estimated: the dangerous side) moves it faster than one below it.
#: The first observation is blended with the prior too, never taken alone.
CALIBRATION_WEIGHT_UP: Final = 0.5
CALIBRATION_WEIGHT_DOWN: Final = 0.2
#: An observed ratio below this is our estimate being wrong (a block counted far
#: above its cost), not the tokenizer: it is ignored rather than followed.
IMPLAUSIBLE_RATIO: Final = FACTOR_FLOOR / 1.5
#: A factor made of this many observations is settled: one that would move it by
#: less than SETTLED_CHANGE (relative) is not written (the margin covers it).
SETTLED_SAMPLES: Final = 10
SETTLED_CHANGE: Final = 0.005
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


#: A dated snapshot id: the alias followed by ``-YYYYMMDD`` (``claude-haiku-4-5-20251001``).
_SNAPSHOT_SUFFIX: Final = re.compile(r"-\d{8}$")


def model_alias(model: str) -> str:
    """The alias a model id stands for: a dated snapshot id without its date.

    The API answers a request to an alias with the snapshot it resolved to
    (``claude-sonnet-5-5`` -> ``claude-sonnet-5-5-20261001``): both are one model.
    """
    return _SNAPSHOT_SUFFIX.sub("", model)


def same_model(a: str, b: str) -> bool:
    """Whether two model ids name one model (a snapshot id and its alias do)."""
    return a == b or model_alias(a) == model_alias(b)


def context_window(model: str) -> int:
    """The model's context window; a dated snapshot id counts as its alias."""
    return CONTEXT_WINDOWS.get(model_alias(model), DEFAULT_CONTEXT_WINDOW)


def effective_budget(token_budget: int | None, *, model: str, max_tokens: int) -> int:
    """Input tokens one request may carry: the budget, capped by the window minus output."""
    window = context_window(model)
    if max_tokens >= window:
        raise InvalidInput(
            "max_tokens",
            f"{max_tokens:,} leaves no room for input in the {window:,}-token context window "
            f"of {model}",
        )
    ceiling = window - max_tokens
    return ceiling if token_budget is None else min(token_budget, ceiling)


def informative(raw_tokens: int, actual_tokens: int) -> bool:
    """Whether a request's observation can move any calibration at all.

    Tiny requests (fixed overheads dominate) and implausibly low ratios (our
    estimate was wrong, not the tokenizer) change nothing, whatever was learned.
    """
    if raw_tokens < MIN_CALIBRATION_TOKENS or actual_tokens <= 0:
        return False
    return actual_tokens / raw_tokens >= IMPLAUSIBLE_RATIO


@dataclass(frozen=True, slots=True)
class Calibration:
    """The correction factor of one model, and how many observations made it."""

    factor: float = DEFAULT_FACTOR
    samples: int = 0

    @property
    def effective_factor(self) -> float:
        """The factor estimates use: within the bounds (a row stored before they existed
        may be outside), plus the margin once calibrated."""
        factor = min(FACTOR_CEILING, max(FACTOR_FLOOR, self.factor))
        return factor + CALIBRATION_MARGIN if self.samples else factor

    def scale(self, raw_tokens: int, media_tokens: int = 0) -> int:
        """Our estimate of Claude's count for ``raw_tokens`` cl100k tokens, of which
        ``media_tokens`` are image and PDF estimates (already the API's tokens: not scaled)."""
        media = min(media_tokens, raw_tokens)
        return math.ceil((raw_tokens - media) * self.effective_factor) + media

    def settled_by(self, raw_tokens: int, actual_tokens: int) -> bool:
        """True if this observation would leave a settled factor as good as unchanged.

        Settled: at least ``SETTLED_SAMPLES`` observations made it. Unchanged:
        it would move by less than ``SETTLED_CHANGE`` of itself, either way.
        """
        if self.samples < SETTLED_SAMPLES:
            return False
        after = self.observe(raw_tokens, actual_tokens)
        return abs(after.factor - self.factor) < SETTLED_CHANGE * self.factor

    def observe(self, raw_tokens: int, actual_tokens: int) -> Calibration:
        """The calibration after one request: ``actual_tokens`` reported for ``raw_tokens``.

        The ratio is blended into the factor (the prior included), faster
        upwards than downwards, and the factor stays within
        [``FACTOR_FLOOR``, ``FACTOR_CEILING``]. Tiny requests and implausibly
        low ratios change nothing.
        """
        if not informative(raw_tokens, actual_tokens):
            return self
        ratio = actual_tokens / raw_tokens
        weight = CALIBRATION_WEIGHT_UP if ratio > self.factor else CALIBRATION_WEIGHT_DOWN
        factor = (1 - weight) * self.factor + weight * ratio
        return Calibration(min(FACTOR_CEILING, max(FACTOR_FLOOR, factor)), self.samples + 1)

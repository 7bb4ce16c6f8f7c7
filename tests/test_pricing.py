"""Costs from usage: hand-worked dollar figures, aliases, unknowns, overrides, tiers."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from convo._pricing import DEFAULT_PRICES, Price, PriceTable
from convo.errors import InvalidInput

TABLE = PriceTable()


def usage(
    input_tokens: int = 0,
    output_tokens: int = 0,
    cache_creation_input_tokens: int = 0,
    cache_read_input_tokens: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": cache_creation_input_tokens,
        "cache_read_input_tokens": cache_read_input_tokens,
        **extra,
    }


# --- the built-in table -----------------------------------------------------------


def test_default_table_has_the_noted_models_and_unknowns_are_none() -> None:
    assert set(DEFAULT_PRICES) == {
        "claude-opus-5-5",
        "claude-sonnet-5-5",
        "claude-haiku-5-5",
        "claude-sonnet-4-6",
        "claude-haiku-4-5",
    }
    opus = DEFAULT_PRICES["claude-opus-5-5"]
    # Opus 5.5 reads at 0.05x input, not the usual 0.1x: kept per model.
    assert opus.cache_read == Decimal("0.20")
    haiku = DEFAULT_PRICES["claude-haiku-5-5"]
    assert haiku.cache_write_5m == Decimal("0.125")
    assert haiku.cache_write_1h is None
    assert haiku.cache_read is None
    assert haiku.long_context_threshold == 100_000


def test_default_prices_cannot_be_changed() -> None:
    with pytest.raises(TypeError):
        DEFAULT_PRICES["claude-opus-5-5"] = Price()  # type: ignore[index]


# --- dollar figures worked by hand --------------------------------------------------


def test_plain_input_and_output() -> None:
    # 1,234,567 x $1 + 89 x $5 = $1,235,012 per million tokens.
    cost = TABLE.cost("claude-haiku-4-5", usage(1_234_567, 89))
    assert cost == Decimal("1.235012")


def test_all_writes_are_5m_without_a_breakdown() -> None:
    # 1,000 x 3 + 500 x 15 + 2,000 x 3.75 + 10,000 x 0.30 = 21,000 per million.
    cost = TABLE.cost("claude-sonnet-4-6", usage(1_000, 500, 2_000, 10_000))
    assert cost == Decimal("0.021")


def test_breakdown_splits_5m_and_1h_writes() -> None:
    # 200 x 4 + 1,000 x 20 + 1,000 x 5 (5m) + 2,000 x 8 (1h) + 5,000 x 0.20 = 42,800.
    split = {"ephemeral_5m_input_tokens": 1_000, "ephemeral_1h_input_tokens": 2_000}
    cost = TABLE.cost("claude-opus-5-5", usage(200, 1_000, 3_000, 5_000, cache_creation=split))
    assert cost == Decimal("0.0428")
    # The same writes without the breakdown, all at the 5m price: 3,000 x 5 instead.
    assert TABLE.cost("claude-opus-5-5", usage(200, 1_000, 3_000, 5_000)) == Decimal("0.0368")


def test_all_1h_writes() -> None:
    # 4,000 x 4 (1h write on Sonnet 5.5) = 16,000 per million.
    split = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 4_000}
    cost = TABLE.cost("claude-sonnet-5-5", usage(0, 0, 4_000, cache_creation=split))
    assert cost == Decimal("0.016")


def test_missing_and_none_counts_are_zero() -> None:
    # As the SDK's model_dump() gives them: None for counts that do not apply.
    raw = {
        "input_tokens": 10,
        "output_tokens": 20,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": None,
        "cache_creation": None,
    }
    # 10 x 2 + 20 x 10 = 220 per million.
    assert TABLE.cost("claude-sonnet-5-5", raw) == Decimal("0.00022")
    assert TABLE.cost("claude-sonnet-5-5", {"output_tokens": 1_000_000}) == Decimal("10")


def test_zero_usage_costs_zero() -> None:
    assert TABLE.cost("claude-opus-5-5", usage()) == 0


@pytest.mark.parametrize(
    ("key", "value"),
    [("input_tokens", -1), ("output_tokens", 1.5), ("cache_read_input_tokens", "9")],
)
def test_bad_usage_counts_are_rejected(key: str, value: Any) -> None:
    bad = usage(1, 1)
    bad[key] = value
    with pytest.raises(InvalidInput) as caught:
        TABLE.cost("claude-opus-5-5", bad)
    assert caught.value.field == f"usage.{key}"


# --- model ids -----------------------------------------------------------------------


def test_dated_snapshot_has_its_alias_prices() -> None:
    assert TABLE.price("claude-haiku-4-5-20251001") == DEFAULT_PRICES["claude-haiku-4-5"]
    assert TABLE.cost("claude-haiku-4-5-20251001", usage(1_000, 1_000)) == Decimal("0.006")


@pytest.mark.parametrize(
    "model",
    ["claude-unknown-9", "claude-haiku-4-5-latest", "claude-haiku-4", "claude-haiku-4-5-2025"],
)
def test_unknown_model_is_none_never_a_guess(model: str) -> None:
    assert TABLE.price(model) is None
    assert TABLE.cost(model, usage(1_000, 1_000)) is None


def test_exact_override_of_a_snapshot_wins_over_its_alias() -> None:
    snapshot = "claude-haiku-4-5-20251001"
    table = PriceTable({snapshot: Price(input=Decimal("7"), output=Decimal("9"))})
    assert table.cost(snapshot, usage(1_000_000)) == Decimal("7")
    assert table.cost("claude-haiku-4-5", usage(1_000_000)) == Decimal("1")


# --- unknown prices ------------------------------------------------------------------


def test_used_component_with_unknown_price_makes_the_cost_unknown() -> None:
    # Haiku 5.5 has no known cache-read or 1h-write price.
    assert TABLE.cost("claude-haiku-5-5", usage(100, 100, cache_read_input_tokens=1)) is None
    split = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 5}
    assert TABLE.cost("claude-haiku-5-5", usage(100, 100, 5, cache_creation=split)) is None


def test_unused_component_with_unknown_price_is_fine() -> None:
    # 1,000 x 0.10 + 1,000 x 0.50 + 2,000 x 0.125 = 850 per million.
    split = {"ephemeral_5m_input_tokens": 2_000, "ephemeral_1h_input_tokens": 0}
    cost = TABLE.cost("claude-haiku-5-5", usage(1_000, 1_000, 2_000, 0, cache_creation=split))
    assert cost == Decimal("0.00085")


# --- the long-context tier -----------------------------------------------------------


def test_haiku_5_5_at_the_threshold_is_billed_at_base_prices() -> None:
    # 100,000 x 0.10 + 1,000 x 0.50 = 10,500 per million.
    assert TABLE.cost("claude-haiku-5-5", usage(100_000, 1_000)) == Decimal("0.0105")


def test_haiku_5_5_one_token_above_the_threshold_is_billed_at_long_prices() -> None:
    # 100,001 x 0.50 + 1,000 x 2.50 = 52,500.5 per million.
    assert TABLE.cost("claude-haiku-5-5", usage(100_001, 1_000)) == Decimal("0.0525005")


def test_cache_writes_count_toward_the_long_context_threshold() -> None:
    # Prompt 50,000 + 50,001 = 100,001 > 100K: 50,000 x 0.50 + 50,001 x 0.125
    # (cache writes keep their price) + 10 x 2.50 = 31,275.125 per million.
    cost = TABLE.cost("claude-haiku-5-5", usage(50_000, 10, 50_001))
    assert cost == Decimal("0.031275125")
    # One write fewer and the prompt is back at 100K: 50,000 x 0.10 + 50,000 x 0.125
    # + 10 x 0.50 = 11,255 per million.
    assert TABLE.cost("claude-haiku-5-5", usage(50_000, 10, 50_000)) == Decimal("0.011255")


def test_long_tier_with_unknown_long_price_is_unknown() -> None:
    table = PriceTable(
        {"m": {"input": "1", "output": "2", "long_context_threshold": 10, "long_input": "3"}}
    )
    assert table.cost("m", usage(10, 1)) == Decimal("0.000012")
    assert table.cost("m", usage(11, 1)) is None  # long output price unknown
    assert table.cost("m", usage(11, 0)) == Decimal("0.000033")


# --- overrides -----------------------------------------------------------------------


def test_override_with_a_price_replaces_the_model_entirely() -> None:
    table = PriceTable({"claude-opus-5-5": Price(input=Decimal("1"))})
    assert table.cost("claude-opus-5-5", usage(1_000_000)) == Decimal("1")
    assert table.cost("claude-opus-5-5", usage(1, 1)) is None  # output now unknown
    # The default table is untouched.
    assert TABLE.cost("claude-opus-5-5", usage(1_000_000)) == Decimal("4")


def test_mapping_override_updates_only_the_fields_given() -> None:
    table = PriceTable({"claude-sonnet-5-5": {"cache_read": "0.20"}})
    price = table.price("claude-sonnet-5-5")
    assert price is not None
    assert price.cache_read == Decimal("0.20")
    assert price.input == Decimal("2")
    # 1,000,000 reads x 0.20.
    assert table.cost("claude-sonnet-5-5", usage(cache_read_input_tokens=1_000_000)) == Decimal(
        "0.20"
    )


def test_mapping_override_adds_a_model_from_strings_and_numbers() -> None:
    table = PriceTable(
        {
            "my-model": {
                "input": "3",
                "output": 15,
                "cache_write_5m": " 3.75 ",
                "cache_write_1h": 6.0,
                "cache_read": 0.3,
                "long_context_threshold": "200000",
                "long_input": Decimal("6"),
                "long_output": None,
            }
        }
    )
    assert table.price("my-model") == Price(
        input=Decimal("3"),
        output=Decimal("15"),
        cache_write_5m=Decimal("3.75"),
        cache_write_1h=Decimal("6"),
        cache_read=Decimal("0.3"),
        long_context_threshold=200_000,
        long_input=Decimal("6"),
    )
    # 0.1 given as a float is 0.1, not its binary approximation.
    price = PriceTable({"x": {"input": 0.1}}).price("x")
    assert price is not None
    assert price.input == Decimal("0.1")


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"input": "three"}, "input"),
        ({"output": "-1"}, "output"),
        ({"cache_read": float("nan")}, "cache_read"),
        ({"cache_write_5m": "Infinity"}, "cache_write_5m"),
        ({"cache_write_1h": True}, "cache_write_1h"),
        ({"input": [1]}, "input"),
        ({"long_context_threshold": 0}, "long_context_threshold"),
        ({"long_context_threshold": "lots"}, "long_context_threshold"),
        ({"long_context_threshold": 1.5}, "long_context_threshold"),
        ({"long_input": "1"}, "long_context_threshold"),
        ({"inptu": "1"}, "inptu"),
    ],
)
def test_bad_override_values_name_the_model_and_field(
    fields: dict[str, Any], bad_field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        PriceTable({"new-model": fields})
    assert caught.value.field == f"overrides['new-model'].{bad_field}"
    assert "new-model" in str(caught.value)


def test_bad_override_shapes() -> None:
    with pytest.raises(InvalidInput) as caught:
        PriceTable({"m": "3"})  # type: ignore[dict-item]
    assert caught.value.field == "overrides['m']"
    with pytest.raises(InvalidInput) as caught:
        PriceTable({"": {"input": "1"}})
    assert caught.value.field == "overrides['']"
    with pytest.raises(InvalidInput) as caught:
        PriceTable([("m", Price())])  # type: ignore[arg-type]
    assert caught.value.field == "overrides"


@pytest.mark.parametrize(
    ("kwargs", "bad_field"),
    [
        ({"input": 3}, "input"),
        ({"output": Decimal("-0.01")}, "output"),
        ({"cache_read": Decimal("NaN")}, "cache_read"),
        ({"long_context_threshold": -5}, "long_context_threshold"),
        ({"long_output": Decimal("1")}, "long_context_threshold"),
    ],
)
def test_price_validates_itself(kwargs: dict[str, Any], bad_field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        Price(**kwargs)
    assert caught.value.field == bad_field


def test_price_is_frozen() -> None:
    price = Price(input=Decimal("1"))
    with pytest.raises(AttributeError):
        price.input = Decimal("2")  # type: ignore[misc]

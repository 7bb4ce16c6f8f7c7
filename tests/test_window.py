"""The context engine's pure core: valid requests, safe cuts, breakpoints, budgets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convo._budget import (
    DEFAULT_FACTOR,
    Calibration,
    context_window,
    effective_budget,
)
from convo._window import (
    MAX_BREAKPOINTS,
    MISSING_TOOL_RESULT,
    OPENING_USER_TEXT,
    LiveTurn,
    SummaryPart,
    assemble,
    count_breakpoints,
    fit_to_budget,
    plan_compaction,
    render_messages,
    safe_starts,
)
from tests.fakeapi import FakeMessagesAPI

MODEL = "claude-sonnet-5-5"
VALIDATOR = FakeMessagesAPI(context_window=10**9)


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def turn(seq: int, role: str, *blocks: dict[str, Any], tokens: int = 10, **kw: Any) -> LiveTurn:
    return LiveTurn(seq, role, list(blocks), tokens, **kw)


def tool_use(tool_id: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_id, "name": "lookup", "input": {"q": tool_id}}


def tool_result(tool_id: str) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_id, "content": f"result {tool_id}"}


def check(messages: list[dict[str, Any]], **extra: Any) -> None:
    VALIDATOR.check_request({"model": MODEL, "max_tokens": 100, "messages": messages, **extra})


# -- render_messages --------------------------------------------------------------


def test_consecutive_turns_of_one_role_are_merged_not_lost() -> None:
    turns = [
        turn(1, "user", text("first try"), status="failed"),
        turn(2, "user", text("second try")),
    ]
    messages = render_messages(turns, model=MODEL)
    assert messages == [{"role": "user", "content": [text("first try"), text("second try")]}]
    check(messages)


def test_thinking_of_another_model_is_dropped_and_of_the_same_kept() -> None:
    thinking = {"type": "thinking", "thinking": "hmm", "signature": "sig"}
    turns = [
        turn(1, "user", text("q1")),
        turn(2, "assistant", thinking, text("a1"), model="claude-opus-5-5"),
        turn(3, "user", text("q2")),
        turn(4, "assistant", thinking, text("a2"), model=MODEL),
        turn(5, "user", text("q3")),
    ]
    messages = render_messages(turns, model=MODEL)
    assert messages[1]["content"] == [text("a1")]
    assert messages[3]["content"] == [thinking, text("a2")]
    check(messages)


def test_a_missing_tool_result_is_filled_in_as_an_error() -> None:
    turns = [
        turn(1, "user", text("weather?")),
        turn(2, "assistant", tool_use("t1"), tool_use("t2")),
        turn(3, "user", tool_result("t2"), text("and also...")),
    ]
    messages = render_messages(turns, model=MODEL)
    content = messages[2]["content"]
    assert [b.get("tool_use_id") for b in content[:2]] == ["t1", "t2"]
    assert content[0]["is_error"] is True
    assert content[0]["content"] == MISSING_TOOL_RESULT
    assert content[1] == tool_result("t2")
    assert content[2] == text("and also...")
    check(messages)


def test_an_orphan_tool_result_becomes_text() -> None:
    turns = [turn(1, "user", tool_result("gone"), text("hello"))]
    messages = render_messages(turns, model=MODEL)
    assert messages[0]["content"][0] == text("[result of tool call gone]: result gone")
    check(messages)


def test_a_conversation_starting_with_the_assistant_gets_an_opening_user_turn() -> None:
    turns = [turn(1, "assistant", text("Hi! How can I help?")), turn(2, "user", text("hi"))]
    messages = render_messages(turns, model=MODEL)
    assert messages[0] == {"role": "user", "content": [text(OPENING_USER_TEXT)]}
    check(messages)


def test_an_empty_cut_off_reply_is_skipped_and_unknown_blocks_pass_untouched() -> None:
    server_block = {"type": "server_tool_use", "id": "srv_1", "name": "web_search", "input": {}}
    turns = [
        turn(1, "user", text("q1")),
        turn(2, "assistant", text(""), status="incomplete"),
        turn(3, "user", text("q2")),
        turn(4, "assistant", server_block, text("found it")),
        turn(5, "user", text("thanks")),
    ]
    messages = render_messages(turns, model=MODEL)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == [text("q1"), text("q2")]
    assert messages[1]["content"][0] is server_block
    check(messages)


# -- where to cut --------------------------------------------------------------------


def test_safe_starts_never_split_a_tool_pair() -> None:
    turns = [
        turn(1, "user", text("q")),
        turn(2, "assistant", tool_use("a")),
        turn(3, "user", tool_result("a")),
        turn(4, "assistant", text("done")),
        turn(5, "user", text("next")),
    ]
    assert safe_starts(turns) == [0, 4]


def test_no_compaction_while_it_fits_then_down_to_low_water() -> None:
    turns = [turn(i + 1, "user" if i % 2 == 0 else "assistant", text(str(i))) for i in range(20)]
    assert plan_compaction(turns, available=200, low_water=100) == 0
    cut = plan_compaction(turns, available=150, low_water=100)
    assert cut == 10  # the fewest turns archived so that 100 tokens remain
    assert sum(t.tokens for t in turns[cut:]) <= 100
    assert turns[cut].role == "user"


def test_forced_compaction_keeps_the_latest_exchange() -> None:
    turns = [turn(i + 1, "user" if i % 2 == 0 else "assistant", text(str(i))) for i in range(6)]
    assert plan_compaction(turns, available=1000, low_water=1000, force=True) == 4


def test_fit_to_budget_drops_oldest_exchanges_only() -> None:
    turns = [turn(i + 1, "user" if i % 2 == 0 else "assistant", text(str(i))) for i in range(6)]
    assert fit_to_budget(turns, available=60) == 0
    assert fit_to_budget(turns, available=45) == 2
    assert fit_to_budget(turns, available=1) == 4


# -- budget and calibration ------------------------------------------------------------


def test_budget_is_capped_by_the_model_window() -> None:
    assert context_window("claude-haiku-4-5-20251001") == 200_000
    assert context_window("some-future-model") == 200_000
    assert effective_budget(None, model="claude-haiku-4-5", max_tokens=4_000) == 196_000
    assert effective_budget(10_000, model="claude-haiku-4-5", max_tokens=4_000) == 10_000
    assert effective_budget(500_000, model="claude-haiku-4-5", max_tokens=4_000) == 196_000


def test_calibration_starts_conservative_and_converges() -> None:
    calibration = Calibration()
    assert calibration.scale(1000) == int(1000 * DEFAULT_FACTOR)
    for _ in range(15):
        calibration = calibration.observe(1000, 1200)
    assert calibration.factor == pytest.approx(1.2, abs=1e-6)
    assert calibration.samples == 15
    assert calibration.scale(1000) >= 1200  # never below what the API reports
    assert calibration.observe(10, 100) is calibration  # tiny requests say little


# -- assemble ----------------------------------------------------------------------------


def _assemble(turns: list[LiveTurn], **kw: Any) -> Any:
    options: dict[str, Any] = {
        "model": MODEL,
        "system": "Be brief.",
        "summary": SummaryPart("They talked about cats.", 10, 12),
        "turns": turns,
        "budget": 10_000,
        "calibration": Calibration(),
        "system_tokens": 3,
    }
    options.update(kw)
    return assemble(**options)


def test_layout_puts_summary_in_the_system_part_with_breakpoints() -> None:
    turns = [turn(11, "user", text("q1")), turn(12, "assistant", text("a1"))]
    turns.append(turn(13, "user", text("q2")))
    window = _assemble(turns)
    system = window.params["system"]
    assert system[0] == text("Be brief.")
    assert "turns 1-10 are archived" in system[1]["text"]
    assert system[1]["cache_control"] == {"type": "ephemeral"}
    messages = window.params["messages"]
    assert messages[-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert messages[0]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert count_breakpoints(window.params) == 3
    assert window.summary_through_seq == 10
    assert (window.first_seq, window.last_seq) == (11, 13)
    check(messages, system=system)


def test_breakpoints_never_exceed_four_with_the_callers_own() -> None:
    marked = {**text("x"), "cache_control": {"type": "ephemeral"}}
    turns = [
        turn(i, "user" if i % 2 else "assistant", dict(marked, text=f"t{i}")) for i in range(1, 9)
    ]
    window = _assemble(turns, user_breakpoints=1)
    assert count_breakpoints(window.params) + 1 == MAX_BREAKPOINTS
    # The newest marks are the ones kept.
    assert "cache_control" in window.params["messages"][-1]["content"][-1]


def test_stored_content_is_not_modified_by_marking() -> None:
    block = text("q")
    _assemble([turn(1, "user", block)])
    assert block == text("q")


def test_over_budget_turns_are_left_out_oldest_first() -> None:
    turns = [
        turn(i + 1, "user" if i % 2 == 0 else "assistant", text(str(i)), tokens=1000)
        for i in range(10)
    ]
    window = _assemble(turns, budget=5_000, summary=None)
    assert window.estimated_tokens <= 5_000
    assert window.omitted_seqs == tuple(range(1, 1 + len(window.omitted_seqs)))
    assert window.params["messages"][0]["role"] == "user"


# -- validity over random histories -----------------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> list[LiveTurn]:
    """Random stored histories: tool loops (answered or not), failed and cut-off
    turns, thinking from several models, unknown blocks, leading assistants."""
    turns: list[LiveTurn] = []
    seq = 0
    words = st.text(
        alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30
    ).filter(lambda s: s.strip() != "")
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["user", "assistant", "tool_loop", "failed", "cut"]))
        seq += 1
        if kind == "user":
            turns.append(turn(seq, "user", text(draw(words))))
        elif kind == "failed":
            turns.append(turn(seq, "user", text(draw(words)), status="failed"))
        elif kind == "cut":
            partial = draw(st.sampled_from(["", "partial"]))
            turns.append(turn(seq, "assistant", text(partial), status="incomplete"))
        elif kind == "assistant":
            blocks = [text(draw(words))]
            if draw(st.booleans()):
                blocks.insert(0, {"type": "thinking", "thinking": "…", "signature": "s"})
            if draw(st.booleans()):
                blocks.append({"type": "compaction", "content": "opaque"})
            model = draw(st.sampled_from([MODEL, "claude-opus-5-5", None]))
            turns.append(turn(seq, "assistant", *blocks, model=model))
        else:
            ids = [f"t{seq}_{i}" for i in range(draw(st.integers(1, 3)))]
            turns.append(turn(seq, "assistant", *[tool_use(i) for i in ids], model=MODEL))
            answered = draw(st.lists(st.sampled_from(ids), unique=True))
            if answered or draw(st.booleans()):
                seq += 1
                blocks = [tool_result(i) for i in answered] or [text("no results")]
                turns.append(turn(seq, "user", *blocks))
    seq += 1
    turns.append(turn(seq, "user", text(draw(words))))  # a request always ends with the user
    return turns


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.integers(0, 8))
def test_every_random_history_renders_a_valid_request(turns: list[LiveTurn], skip: int) -> None:
    starts = safe_starts(turns)
    start = starts[min(skip, len(starts) - 1)]
    messages = render_messages(turns[start:], model=MODEL)
    check(messages)
    # Nothing the user or a tool said is lost from the turns that are sent.
    sent = json.dumps(messages, ensure_ascii=False)
    for live in turns[start:]:
        for block in live.content:
            if block.get("type") == "text" and block["text"].strip():
                assert json.dumps(block["text"], ensure_ascii=False)[1:-1] in sent


@settings(max_examples=200, deadline=None)
@given(histories(), st.integers(200, 3_000))
def test_every_random_history_assembles_within_budget(turns: list[LiveTurn], budget: int) -> None:
    window = _assemble(turns, budget=budget)
    if window.estimated_tokens <= budget:
        check(window.params["messages"], system=window.params["system"])
        assert count_breakpoints(window.params) <= MAX_BREAKPOINTS
    else:
        # Only when even the newest exchange cannot fit; the store refuses to send it.
        last_start = safe_starts(turns)[-1]
        assert window.first_seq == turns[last_start].seq

"""Redaction: each kind found and not over-found, blocks copied safely, idempotence."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convo._redaction import DEFAULT_KINDS, KINDS, Redactor
from convo.errors import InvalidInput

REDACTOR = Redactor()

ANTHROPIC_KEY = "sk-ant-api03-" + "Ab3dE6gH9jK2mN5pQ8sT1vW4yZ7" * 3
OPENAI_KEY = "sk-proj-" + "x7Yk2Lq9Wm4Nz8Rt3Vb6" * 3
GITHUB_TOKEN = "ghp_" + "a1B2c3D4e5F6g7H8i9J0" * 2  # ghp_ + 40 characters
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6y"


def luhn_valid(number: str) -> bool:
    """Independent check of the test data's premise (not the module's code)."""
    digits = [int(c) for c in number if c.isdigit()]
    checksum = sum(digits[-1::-2]) + sum(sum(divmod(2 * d, 10)) for d in digits[-2::-2])
    return checksum % 10 == 0


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


# --- each kind: found --------------------------------------------------------------------

POSITIVE = [
    ("card", "4111 1111 1111 1111"),
    ("card", "4111-1111-1111-1111"),
    ("card", "4111111111111111"),
    ("card", "5555555555554444"),
    ("card", "3782 822463 10005"),  # Amex, 4-6-5
    ("card", "6011111111111117"),
    ("card", "4222222222222"),  # 13 digits
    ("ssn", "123-45-6789"),
    ("ssn", "078-05-1120"),
    ("email", "alice@example.com"),
    ("email", "alice.smith+tag@mail.example.co.uk"),
    ("phone", "+14155552671"),
    ("phone", "+44 20 7946 0958"),
    ("phone", "(415) 555-2671"),
    ("phone", "415-555-2671"),
    ("phone", "415.555.2671"),
    ("phone", "+1 415 555 2671"),
    ("phone", "1-415-555-2671"),
    ("api_key", ANTHROPIC_KEY),
    ("api_key", OPENAI_KEY),
    ("api_key", "sk-" + "T3BlbkFJ" * 6),
    ("api_key", "AKIAIOSFODNN7EXAMPLE"),
    ("api_key", GITHUB_TOKEN),
    ("api_key", "gho_" + "Z9y8X7w6V5u4T3s2R1q0" * 2),
    ("api_key", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"),
]


@pytest.mark.parametrize(("kind", "secret"), POSITIVE)
def test_kind_is_found_in_running_text(kind: str, secret: str) -> None:
    assert luhn_valid(secret) or kind != "card"
    result = REDACTOR.redact_text(f"Here: {secret}, thanks.")
    assert result == f"Here: [REDACTED:{kind}], thanks."


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("api_key=abc123def456", "api_key=[REDACTED:api_key]"),
        ("API_KEY: 'abc123def456'", "API_KEY: '[REDACTED:api_key]'"),
        ('{"password": "hunter22"}', '{"password": "[REDACTED:api_key]"}'),
        ("token=correcthorsebattery", "token=[REDACTED:api_key]"),
        ("GITHUB_TOKEN=abcd1234efgh", "GITHUB_TOKEN=[REDACTED:api_key]"),
        ("?access_token=abc123xyz789&page=2", "?access_token=[REDACTED:api_key]&page=2"),
        ("client_secret = s3cr3t-v4lue", "client_secret = [REDACTED:api_key]"),
        ("key=Zx81Qw72", "key=[REDACTED:api_key]"),
    ],
)
def test_secret_assignments_keep_the_name_and_lose_the_value(before: str, after: str) -> None:
    assert REDACTOR.redact_text(before) == after


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (f"Authorization: Bearer {JWT}", "Authorization: Bearer [REDACTED:bearer]"),
        ("authorization: bearer short", "authorization: bearer [REDACTED:bearer]"),
        ('"Authorization": "Basic dXNlcjpwYXNz"', '"Authorization": "Basic [REDACTED:bearer]"'),
        ("Authorization: a1b2c3d4e5f6", "Authorization: [REDACTED:bearer]"),
        (f"curl -H 'Bearer {JWT}'", "curl -H 'Bearer [REDACTED:bearer]'"),
        # A key inside a bearer header is one redaction, named by the first kind.
        (f"Authorization: Bearer {ANTHROPIC_KEY}", "Authorization: Bearer [REDACTED:bearer]"),
    ],
)
def test_bearer_credentials(before: str, after: str) -> None:
    assert REDACTOR.redact_text(before) == after


# --- each kind: not over-found -----------------------------------------------------------

NEGATIVE = [
    # Cards: Luhn fails, no network's leading digit, or grouped unlike a card.
    "4111111111111112",
    "4111 1111 1111 1112",
    "1234567890123456",
    "order 5234987612345670 shipped",
    "timestamp 1718035200123",
    "1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6",
    "3 7 8 2 8 2 2 4 6 3 1 0 0 0 5",
    # Numbers, dates, versions and prices.
    "order #4155552671",
    "id 4155552671 and 14155552671",
    "2024-01-15",
    "2024-01-15T10:30:00Z",
    "on 12/25/2024 at 10:30",
    "version 1.2.3, v10.15.7, 2024.10.1234",
    "$1,234.56 and 4,155,552,671 and 1234567.89",
    "ip 192.168.100.200",
    "ISBN 978-0-306-40615-7",
    "+1 point, +15%, 3+4",
    "555-2671",
    "(012) 555-2671",
    "415-055-2671",
    # SSNs that are never issued.
    "000-12-3456",
    "666-12-3456",
    "900-12-3456",
    "123-00-4567",
    "123-45-0000",
    "1234-56-7890",
    # Not email addresses.
    "@dataclass",
    "user@localhost",
    "pkg@1.2.3",
    "a@b",
    # Not keys.
    "sk-learn",
    "sk-this-is-not-a-real-key-at-all",
    "AKIA1234",
    "ghp_short",
    "max_tokens=4096",
    "input_tokens: 123456789",
    "key=lambda item: item[1]",
    "sort key: created_at",
    "token = get_token(user)",
    "password: str",
    # Not bearer tokens.
    "the bearer of this letter",
    "Bearer authentication",
    "token_type: bearer",
]


@pytest.mark.parametrize("harmless", NEGATIVE)
def test_ordinary_text_is_kept(harmless: str) -> None:
    assert REDACTOR.redact_text(harmless) == harmless


def test_negative_card_examples_really_fail_luhn() -> None:
    # The premise of the first negative cases: same shape as a card, bad check digit.
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("5234987612345670")
    assert luhn_valid("4111111111111111")


def test_card_check_digit_makes_the_difference() -> None:
    found = [
        n
        for n in (f"411111111111111{d}" for d in range(10))
        if "REDACTED" in REDACTOR.redact_text(n)
    ]
    assert found == ["4111111111111111"]


def test_several_findings_in_one_text() -> None:
    before = (
        "Mail bob@example.org or call (415) 555-2671; card 4111 1111 1111 1111, SSN 123-45-6789."
    )
    assert REDACTOR.redact_text(before) == (
        "Mail [REDACTED:email] or call [REDACTED:phone]; card [REDACTED:card], SSN [REDACTED:ssn]."
    )


def test_findings_glued_together_are_all_found() -> None:
    assert REDACTOR.redact_text("4111 1111 1111 1111+14155552671") == (
        "[REDACTED:card][REDACTED:phone]"
    )


def test_text_touching_a_marker_is_not_a_finding() -> None:
    # Before redaction it touched the finding's own characters (one longer run).
    assert REDACTOR.redact_text("[REDACTED:card]14155552671") == "[REDACTED:card]14155552671"
    assert REDACTOR.redact_text("x 415-555-2671.[REDACTED:ssn]") == "x 415-555-2671.[REDACTED:ssn]"


def test_empty_text() -> None:
    assert REDACTOR.redact_text("") == ""


# --- choosing kinds ----------------------------------------------------------------------


def test_default_kinds_are_all_kinds() -> None:
    assert (
        set(DEFAULT_KINDS) == set(KINDS) == {"card", "ssn", "email", "phone", "api_key", "bearer"}
    )
    assert REDACTOR.kinds == KINDS


def test_only_the_chosen_kinds_are_redacted() -> None:
    redactor = Redactor(kinds=["email"])
    assert redactor.kinds == ("email",)
    assert redactor.redact_text("a@example.com 4111111111111111") == (
        "[REDACTED:email] 4111111111111111"
    )
    assert Redactor(kinds=[]).redact_text("a@example.com") == "a@example.com"


def test_unknown_kind_is_invalid_input() -> None:
    with pytest.raises(InvalidInput) as caught:
        Redactor(kinds=["email", "passport"])
    assert caught.value.field == "kinds"
    assert "passport" in str(caught.value)


def test_kinds_given_as_one_string_is_invalid_input() -> None:
    with pytest.raises(InvalidInput) as caught:
        Redactor(kinds="email")
    assert caught.value.field == "kinds"


# --- extra patterns ----------------------------------------------------------------------


def test_extra_patterns_are_redacted_under_their_name() -> None:
    redactor = Redactor(extra={"employee_id": r"EMP-\d{6}", "codename": re.compile("(?i)bluebird")})
    assert redactor.kinds[:2] == ("employee_id", "codename")
    assert redactor.redact_text("EMP-123456 on Project BlueBird, a@example.com") == (
        "[REDACTED:employee_id] on Project [REDACTED:codename], [REDACTED:email]"
    )


def test_extra_pattern_takes_precedence_over_built_in_kinds() -> None:
    redactor = Redactor(extra={"test_card": r"4111 1111 1111 1111"})
    assert redactor.redact_text("4111 1111 1111 1111") == "[REDACTED:test_card]"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"broken": "EMP-(\\d"}, "extra['broken']"),
        ({"empty": "x*"}, "extra['empty']"),
        ({"email": "foo"}, "extra['email']"),
        ({"bad name": "foo"}, "extra['bad name']"),
        ({"bytes": re.compile(b"foo")}, "extra['bytes']"),
        ({"number": 42}, "extra['number']"),
        ({"loud": "REDACTED"}, "extra['loud']"),
    ],
)
def test_bad_extra_patterns_name_the_pattern(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        Redactor(extra=extra)
    assert caught.value.field == field


def test_zero_width_matches_of_an_extra_pattern_are_ignored() -> None:
    # \b matches "" only between characters; it must not insert markers.
    redactor = Redactor(kinds=[], extra={"edge": r"\b"})
    assert redactor.redact_text("two words") == "two words"


# --- blocks ------------------------------------------------------------------------------

EMAIL = "carol@example.com"
SIGNATURE = "EqQBCkgIARABGAIiQL+signature+of+the+thinking+text=="


def test_text_blocks_and_their_citations_are_redacted() -> None:
    block = text(f"write to {EMAIL}")
    block["citations"] = [
        {"type": "char_location", "cited_text": f"mail {EMAIL}", "start_char_index": 0}
    ]
    [result] = REDACTOR.redact_blocks([block])
    assert result["text"] == "write to [REDACTED:email]"
    assert result["citations"][0]["cited_text"] == "mail [REDACTED:email]"
    assert result["citations"][0]["start_char_index"] == 0


def test_strings_anywhere_in_tool_input_are_redacted_and_keys_kept() -> None:
    block = {
        "type": "tool_use",
        "id": "toolu_01",
        "name": "send",
        "input": {
            "to": EMAIL,
            "retries": 3,
            "meta": {"cc": [EMAIL, {"ssn": "123-45-6789"}], "urgent": True, "none": None},
            EMAIL: "keys are not data",
        },
    }
    [result] = REDACTOR.redact_blocks([block])
    assert result["input"] == {
        "to": "[REDACTED:email]",
        "retries": 3,
        "meta": {
            "cc": ["[REDACTED:email]", {"ssn": "[REDACTED:ssn]"}],
            "urgent": True,
            "none": None,
        },
        EMAIL: "keys are not data",
    }
    assert result["id"] == "toolu_01"
    assert result["name"] == "send"


def test_tool_result_content_as_string_and_as_nested_blocks() -> None:
    as_string = {"type": "tool_result", "tool_use_id": "toolu_01", "content": f"found {EMAIL}"}
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": EMAIL},
    }
    as_blocks = {
        "type": "tool_result",
        "tool_use_id": "toolu_02",
        "content": [text(f"found {EMAIL}"), image],
        "is_error": False,
    }
    first, second = REDACTOR.redact_blocks([as_string, as_blocks])
    assert first["content"] == "found [REDACTED:email]"
    assert second["content"] == [text("found [REDACTED:email]"), image]
    assert second["is_error"] is False


def test_document_blocks_with_text_or_content_source() -> None:
    plain = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": f"owner {EMAIL}"},
        "title": "notes",
    }
    structured = {
        "type": "document",
        "source": {"type": "content", "content": [text(f"owner {EMAIL}")]},
    }
    pdf = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": EMAIL},
    }
    first, second, third = REDACTOR.redact_blocks([plain, structured, pdf])
    assert first["source"]["data"] == "owner [REDACTED:email]"
    assert first["title"] == "notes"
    assert second["source"]["content"] == [text("owner [REDACTED:email]")]
    assert third == pdf


def test_thinking_and_unknown_blocks_are_never_touched() -> None:
    blocks: list[dict[str, Any]] = [
        {"type": "thinking", "thinking": f"the user is {EMAIL}", "signature": SIGNATURE},
        {"type": "redacted_thinking", "data": f"opaque {EMAIL}"},
        {"type": "compaction", "content": f"summary mentions {EMAIL}"},
        {"type": "future_block", "text": EMAIL},
    ]
    assert REDACTOR.redact_blocks(blocks) == blocks


def test_input_is_not_mutated_and_the_result_shares_nothing() -> None:
    blocks = [
        text(f"hi {EMAIL}"),
        {"type": "tool_use", "id": "t", "name": "n", "input": {"to": [EMAIL]}},
        {"type": "thinking", "thinking": "hmm", "signature": SIGNATURE},
    ]
    snapshot = copy.deepcopy(blocks)
    result = REDACTOR.redact_blocks(blocks)
    assert blocks == snapshot
    assert result != blocks
    # Changing the copy (even an untouched thinking block) leaves the original alone.
    result[1]["input"]["to"].append("x")
    result[2]["thinking"] = "changed"
    assert blocks == snapshot


@pytest.mark.parametrize("not_blocks", [f"hi {EMAIL}", (text(EMAIL),), None])
def test_redact_blocks_refuses_anything_but_a_list(not_blocks: Any) -> None:
    # A string would otherwise come back unredacted, silently.
    with pytest.raises(InvalidInput) as caught:
        REDACTOR.redact_blocks(not_blocks)
    assert caught.value.field == "blocks"


def test_redact_system() -> None:
    assert REDACTOR.redact_system(f"Reply to {EMAIL}") == "Reply to [REDACTED:email]"
    assert REDACTOR.redact_system([text(f"Reply to {EMAIL}")]) == [
        text("Reply to [REDACTED:email]")
    ]
    assert REDACTOR.redact_system(None) is None


# --- idempotence -------------------------------------------------------------------------

FRAGMENTS = [secret for _, secret in POSITIVE] + [
    "api_key=abc123def456",
    f"Authorization: Bearer {JWT}",
    "Authorization: Basic dXNlcjpwYXNz",
    f"Bearer {JWT}",
    f"token: {ANTHROPIC_KEY}",
    *NEGATIVE,
]


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_redacting_twice_is_redacting_once(fragment: str) -> None:
    once = REDACTOR.redact_text(f"x {fragment} y")
    assert REDACTOR.redact_text(once) == once


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([*FRAGMENTS, " ", "\n", ": ", "=", "'", "a", "7"]), max_size=12))
def test_redacting_any_mix_twice_is_redacting_once(pieces: list[str]) -> None:
    once = REDACTOR.redact_text("".join(pieces))
    assert REDACTOR.redact_text(once) == once


def test_redacting_blocks_twice_is_redacting_once() -> None:
    blocks = [
        text(f"Authorization: Bearer {JWT} and {EMAIL}"),
        {"type": "tool_use", "id": "t", "name": "n", "input": {"k": f"api_key={OPENAI_KEY}"}},
    ]
    once = REDACTOR.redact_blocks(blocks)
    assert REDACTOR.redact_blocks(once) == once


@pytest.mark.parametrize("kind", ["server_tool_use", "mcp_tool_use"])
def test_server_and_mcp_tool_inputs_are_redacted(kind: str) -> None:
    block = {"type": kind, "id": "srvtoolu_01", "name": "web_search", "input": {"q": EMAIL}}
    assert REDACTOR.redact_blocks([block])[0]["input"] == {"q": "[REDACTED:email]"}


def test_search_results_nested_in_tool_results_are_redacted() -> None:
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_01",
        "content": [
            {
                "type": "search_result",
                "source": "https://intranet.example/people",
                "title": f"Contact {EMAIL}",
                "content": [text("SSN on file: 123-45-6789")],
            }
        ],
    }
    (redacted,) = REDACTOR.redact_blocks([result])
    found = redacted["content"][0]
    assert found["title"] == "Contact [REDACTED:email]"
    assert found["content"] == [text("SSN on file: [REDACTED:ssn]")]
    assert found["source"] == "https://intranet.example/people"


def test_values_of_credential_keys_are_redacted_whatever_they_look_like() -> None:
    call = {
        "type": "tool_use",
        "id": "toolu_01",
        "name": "login",
        "input": {
            "user": "ada",
            "password": "hunter2",
            "nested": [{"API-Key": 12345}, {"client_secret": "short"}],
            "key": "sort_by_name",
            "token_count": 12,
            "passphrase": "[REDACTED:api_key]",
        },
    }
    (redacted,) = REDACTOR.redact_blocks([call])
    assert redacted["input"] == {
        "user": "ada",
        "password": "[REDACTED:api_key]",
        "nested": [{"API-Key": "[REDACTED:api_key]"}, {"client_secret": "[REDACTED:api_key]"}],
        "key": "sort_by_name",
        "token_count": 12,
        "passphrase": "[REDACTED:api_key]",
    }
    assert Redactor(kinds=["email"]).redact_json({"password": "hunter2"}) == {"password": "hunter2"}


@pytest.mark.parametrize(
    "written",
    [
        "4111.1111.1111.1111",
        "4111\u00a01111\u00a01111\u00a01111",
        "4111\u202f1111\u202f1111\u202f1111",
        "\uff14\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 "
        "\uff11\uff11\uff11\uff11",
    ],
)
def test_card_numbers_however_they_are_separated_or_written(written: str) -> None:
    assert REDACTOR.redact_text(f"pay with {written} today") == "pay with [REDACTED:card] today"


@pytest.mark.parametrize(
    "address",
    ["jos\u00e9@b\u00fccher.de", "user@\u4f8b\u3048.\u30c6\u30b9\u30c8", "a@xn--bcher-kva.de"],
)
def test_email_addresses_on_internationalised_domains(address: str) -> None:
    assert REDACTOR.redact_text(f"write to {address} now") == "write to [REDACTED:email] now"


@pytest.mark.parametrize("harmless", ["version 2026.11.23.1234", "1.2.3.4.5.6.7.8.9.10.11.12.13"])
def test_dotted_numbers_that_are_not_cards_are_kept(harmless: str) -> None:
    assert REDACTOR.redact_text(harmless) == harmless

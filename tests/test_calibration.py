"""Token calibration: images and PDFs estimated from their bytes; a factor nothing poisons."""

from __future__ import annotations

import logging
import threading
from typing import Any

import anthropic
import pytest
from sqlalchemy import event, text

from convo._budget import (
    DEFAULT_FACTOR,
    FACTOR_CEILING,
    FACTOR_FLOOR,
    SETTLED_SAMPLES,
    Calibration,
)
from convo._models import CalibrationRow, utcnow
from convo._records import CALIBRATION_TTL_S
from convo._tokens import (
    IMAGE_TOKENS,
    PDF_PAGE_TOKENS,
    PDF_UNKNOWN_PAGES,
    TiktokenCounter,
    count_blocks,
    counted_exactly,
    image_size,
    image_tokens_for_size,
    pdf_pages,
)
from tests.faces import ConversationStore
from tests.fakeapi import FakeMessagesAPI
from tests.media import gif_header, image_block, jpeg_header, pdf, pdf_block, png, webp_header

pytestmark = pytest.mark.faces

WORDS = "the quick brown fox jumps over the lazy dog while a bird sings "
COUNTER = TiktokenCounter()


def _input_tokens(usage: dict[str, Any]) -> int:
    keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    return sum(int(usage.get(k) or 0) for k in keys)


# -- estimating images and PDFs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (png(200, 100), (200, 100)),
        (gif_header(30, 20), (30, 20)),
        (jpeg_header(640, 480), (640, 480)),
        (webp_header(321, 123, "VP8 "), (321, 123)),
        (webp_header(321, 123, "VP8L"), (321, 123)),
        (webp_header(321, 123, "VP8X"), (321, 123)),
        (b"not an image at all", None),
    ],
)
def test_image_size_is_read_from_the_header(data: bytes, size: tuple[int, int] | None) -> None:
    assert image_size(data) == size


def test_images_cost_their_pixels_like_the_api_counts_them() -> None:
    fake = FakeMessagesAPI()
    cases = [png(40, 40), png(200, 100), png(1000, 1000), png(3000, 2000), gif_header(300, 300)]
    cases.append(jpeg_header(640, 480, exif_bytes=60_000))  # size found after 60 KB of EXIF
    for data in cases:
        block = image_block(data)
        ours = count_blocks(COUNTER, [block])
        theirs = fake.count_request_tokens(
            {"model": "m", "messages": [{"role": "user", "content": [block]}]}
        )
        theirs -= 3  # the fake's per-message framing
        assert theirs <= ours <= theirs * 1.02 + 1, data[:10]
    assert image_tokens_for_size(40, 40) == 3
    assert image_tokens_for_size(3000, 2000) == IMAGE_TOKENS
    url = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    assert count_blocks(COUNTER, [url]) == IMAGE_TOKENS  # the most an image can cost
    garbage = {"type": "image", "source": {"type": "base64", "data": "%%%"}}
    assert count_blocks(COUNTER, [garbage]) == IMAGE_TOKENS


def test_pdfs_cost_a_generous_estimate_per_page() -> None:
    fake = FakeMessagesAPI()
    assert pdf_pages(pdf(3)) == 3
    assert pdf_pages(pdf(4, compressed=True)) == 4  # page objects inside an object stream
    assert pdf_pages(b"%PDF-1.7 nothing readable") == 0
    for data in (pdf(3, WORDS * 20), pdf(5, compressed=True)):
        block = pdf_block(data)
        ours = count_blocks(COUNTER, [block])
        theirs = fake.count_request_tokens(
            {"model": "m", "messages": [{"role": "user", "content": [block]}]}
        )
        assert ours >= theirs
        assert ours == PDF_PAGE_TOKENS * pdf_pages(data)
    by_url = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    assert count_blocks(COUNTER, [by_url]) == PDF_PAGE_TOKENS * PDF_UNKNOWN_PAGES
    plain = {"type": "document", "source": {"type": "text", "data": WORDS}, "title": "Fox"}
    assert count_blocks(COUNTER, [plain]) == COUNTER.count(WORDS) + COUNTER.count("Fox")


def test_only_text_requests_can_calibrate() -> None:
    assert counted_exactly([{"type": "text", "text": "hi"}, {"type": "thinking", "thinking": ""}])
    assert counted_exactly([{"type": "document", "source": {"type": "text", "data": "x"}}])
    assert counted_exactly([{"type": "tool_result", "tool_use_id": "t", "content": "ok"}])
    assert not counted_exactly([image_block(png(4, 4))])
    assert not counted_exactly([pdf_block(pdf(1))])
    nested = {"type": "tool_result", "tool_use_id": "t", "content": [image_block(png(4, 4))]}
    assert not counted_exactly([nested])
    assert not counted_exactly([{"type": "web_search_tool_result", "content": []}])


# -- the factor -------------------------------------------------------------------------


def test_the_first_observation_is_blended_with_the_prior() -> None:
    first = Calibration().observe(1_000, 1_100)
    assert first.samples == 1
    assert 1.1 < first.factor < DEFAULT_FACTOR  # moved towards 1.1, not replaced by it
    up = Calibration().observe(1_000, 1_800)
    assert up.factor - DEFAULT_FACTOR > DEFAULT_FACTOR - first.factor  # faster upwards


def test_the_factor_stays_within_its_bounds() -> None:
    calibration = Calibration()
    for _ in range(50):
        calibration = calibration.observe(1_000, 900)  # plausible, but below the floor
    assert calibration.factor == FACTOR_FLOOR
    for _ in range(50):
        calibration = calibration.observe(1_000, 9_000)
    assert calibration.factor == FACTOR_CEILING
    # A row written before the bounds existed is read within them.
    assert Calibration(0.04, 1).effective_factor >= FACTOR_FLOOR


def test_an_implausibly_low_ratio_is_ignored() -> None:
    # 1,600 estimated for a tiny image the API counted as 60: our estimate, not the tokenizer.
    calibration = Calibration(1.2, 5)
    assert calibration.observe(2_000, 80) is calibration


# -- through the public API ------------------------------------------------------------------


def test_one_small_image_no_longer_poisons_other_conversations(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    """Issue 13 item 1: a 40x40 image once dragged the factor to 0.04 for every conversation."""
    with ConversationStore(migrated_url, client=api_client, token_budget=8_000) as store:
        pictured = store.create()
        pictured.send([image_block(png(40, 40)), {"type": "text", "text": WORDS * 40}])
        assert store.calibration(store.model).samples == 0  # an estimate says nothing
        pictured.send(WORDS * 40)  # the image is still live: still no calibration
        assert store.calibration(store.model).samples == 0

        other = store.create()
        for i in range(30):
            other.send(f"Question {i}: " + WORDS * 25)
        # Calibrated by the text-only requests; settled after SETTLED_SAMPLES of them,
        # after which observations that would not move it are not written.
        assert store.calibration(store.model).samples >= SETTLED_SAMPLES
        assert store.calibration(store.model).factor == pytest.approx(1.2, abs=0.05)
        for request in fake_api.requests:
            assert request.usage is not None
            assert _input_tokens(request.usage) <= 8_000 * 1.05


def test_a_poisoned_factor_left_by_an_older_version_is_bounded(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with ConversationStore(migrated_url, client=api_client, token_budget=8_000) as store:
        with store.database.transaction(write=True) as session:
            session.add(
                CalibrationRow(model=store.model, factor=0.04, samples=1, updated_at=utcnow())
            )
        conv = store.create()
        for i in range(12):
            conv.send(f"Question {i}: " + WORDS * 40)
        for request in fake_api.requests:
            assert request.usage is not None
            assert _input_tokens(request.usage) <= 8_000
        assert store.calibration(store.model).factor >= 1.1


def test_images_and_pdfs_fit_the_budget_by_the_apis_count(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with ConversationStore(migrated_url, client=api_client, token_budget=12_000) as store:
        conv = store.create()
        for i in range(10):
            content: list[dict[str, Any]] = [{"type": "text", "text": f"Look {i}: " + WORDS * 5}]
            if i % 3 == 0:
                content.insert(0, image_block(png(900 + 50 * i, 700)))
            if i % 4 == 1:
                content.insert(0, pdf_block(pdf(2, WORDS)))
            conv.send(content)
        for request in fake_api.requests:
            assert request.usage is not None
            assert _input_tokens(request.usage) <= 12_000


def _fail_calibration_writes(store: ConversationStore) -> None:
    """Make every write to the calibration table fail the way a deadlock does."""
    statements = {
        "sqlite": [
            "CREATE TRIGGER convo_test_deadlock BEFORE INSERT ON convo_calibration "
            "BEGIN SELECT * FROM convo_test_no_such_table; END"
        ],
        "postgresql": [
            "CREATE OR REPLACE FUNCTION convo_test_deadlock() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER convo_test_deadlock BEFORE INSERT ON convo_calibration "
            "FOR EACH ROW EXECUTE FUNCTION convo_test_deadlock()",
        ],
        "mysql": [
            "CREATE TRIGGER convo_test_deadlock BEFORE INSERT ON convo_calibration FOR EACH ROW "
            "SIGNAL SQLSTATE '40001' SET MESSAGE_TEXT = 'Deadlock found when trying to get lock'"
        ],
    }
    dialect = store.database.dialect
    with store.database.transaction(write=True) as session:
        for statement in statements["mysql" if dialect == "mariadb" else dialect]:
            session.execute(text(statement))


def test_a_failed_calibration_never_fails_a_send(
    migrated_url: str,
    fake_api: FakeMessagesAPI,
    api_client: anthropic.Anthropic,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with ConversationStore(migrated_url, client=api_client) as store:
        _fail_calibration_writes(store)
        conv = store.create()
        with caplog.at_level(logging.WARNING, logger="convo"):
            reply = conv.send("Tell me about foxes. " + WORDS * 30)
            with conv.stream("And dogs? " + WORDS * 30) as streamed:
                "".join(streamed)
        assert reply.text.startswith("echo: ")
        assert [m.role for m in conv.history()] == ["user", "assistant"] * 2
        assert streamed.message is not None
        assert streamed.message.status == "complete"
        assert store.calibration(store.model).samples == 0
        skipped = [r for r in caplog.records if "calibration of" in r.getMessage()]
        assert len(skipped) == 2


def test_simultaneous_first_calibrations_fail_no_send(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    """On MariaDB two first inserts of a model's row at once could deadlock."""
    writers = 6
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []
    with ConversationStore(migrated_url, client=api_client) as store:
        conversations = [store.create() for _ in range(writers)]

        def send(index: int) -> None:
            try:
                barrier.wait(timeout=30)
                conversations[index].send(f"Writer {index}: " + WORDS * 30)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        assert all(len(c.history()) == 2 for c in conversations)
        assert 1 <= store.calibration(store.model).samples <= writers


def test_image_tokens_are_not_scaled_by_the_tokenizer_factor(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    """An image is already in the API's tokens: a 1,600-token image fits a 2,000 budget."""
    assert Calibration().scale(1_700, 1_600) == 1_600 + round(100 * DEFAULT_FACTOR)
    with ConversationStore(migrated_url, client=api_client, token_budget=2_000) as store:
        conv = store.create()
        conv.add("user", [image_block(png(2_000, 2_000)), {"type": "text", "text": "What?"}])
        window = conv.window()
        assert window.estimated_tokens < 1_700
        reply = conv.send([image_block(png(1_500, 1_500)), {"type": "text", "text": "And this?"}])
        assert reply.status == "complete"
        request = fake_api.requests[-1]
        assert request.usage is not None
        assert _input_tokens(request.usage) <= 2_000


def test_a_settled_factor_is_not_rewritten_for_an_observation_that_would_not_move_it() -> None:
    settled = Calibration(1.2, SETTLED_SAMPLES)
    assert settled.settled_by(10_000, 12_010)  # 0.1% off: the shared row is left alone
    assert not settled.settled_by(10_000, 13_000)  # 8% above: written (the dangerous side)
    assert not settled.settled_by(10_000, 11_000)  # 8% below: written too
    young = Calibration(1.2, SETTLED_SAMPLES - 1)
    assert not young.settled_by(10_000, 12_010)  # still learning: every observation counts


def test_a_calibration_is_read_once_per_interval(
    migrated_url: str, api_client: anthropic.Anthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request needs the model's calibration: it is not read from the database for
    each one, yet what another process learns arrives within CALIBRATION_TTL_S."""
    clock = {"now": 1_000.0}
    monkeypatch.setattr("convo._records._clock", lambda: clock["now"])
    with ConversationStore(migrated_url, client=api_client) as store:
        reads: list[str] = []

        def count(_c: Any, _cur: Any, sql: str, *_: Any) -> None:
            if "convo_calibration" in sql and sql.lstrip().upper().startswith("SELECT"):
                reads.append(sql)

        conv = store.create()
        conv.add("user", WORDS)
        event.listen(store.database.engine, "before_cursor_execute", count)
        try:
            for _ in range(3):
                conv.window()
            assert len(reads) == 1
            # Another process settles the factor; this one sees it after the interval.
            with store.database.transaction(write=True) as session:
                session.add(
                    CalibrationRow(model=store.model, factor=1.25, samples=40, updated_at=utcnow())
                )
            assert store.calibration(store.model).samples == 0
            clock["now"] += CALIBRATION_TTL_S + 1
            assert store.calibration(store.model) == Calibration(1.25, 40)
            assert len(reads) == 2
        finally:
            event.remove(store.database.engine, "before_cursor_execute", count)


def test_a_reply_too_small_to_teach_anything_writes_no_calibration(
    migrated_url: str, api_client: anthropic.Anthropic
) -> None:
    """A short exchange cannot move the factor (fixed overheads dominate its size): its
    reply is stored without touching the calibration row every conversation shares."""
    with ConversationStore(migrated_url, client=api_client) as store:
        touched: list[str] = []

        def count(_c: Any, _cur: Any, sql: str, *_: Any) -> None:
            if "convo_calibration" in sql:
                touched.append(sql)

        conv = store.create()
        conv.send("hello", max_tokens=50)  # reads the calibration once
        event.listen(store.database.engine, "before_cursor_execute", count)
        try:
            for _ in range(3):
                conv.send("and again", max_tokens=50)
            assert touched == []
            conv.send(WORDS * 40, max_tokens=50)  # large enough: it is learned from
            assert any(sql.lstrip().upper().startswith(("INSERT", "UPDATE")) for sql in touched)
        finally:
            event.remove(store.database.engine, "before_cursor_execute", count)
        assert store.calibration(store.model).samples == 1

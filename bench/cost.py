"""What a long conversation costs: full history, trimming, and convo.

A 300-turn conversation (system prompt ~2,000 tokens, user turns ~40 tokens,
replies of a few hundred tokens, budget 20,000 input tokens) is sent to the
fake Messages API of the test suite (``tests/fakeapi.py``), whose prompt-cache
accounting (breakpoints, 20-block look-back, minimum cacheable prefix) says
what every request was billed: uncached input, cache writes, cache reads.
Every strategy gets the same user turns and the same replies.

(a) full history every turn (no trimming);
(b) the newest turns that fit the budget, oldest dropped every turn as needed
    (counted exactly, with the fake's own tokenizer, so (b) uses the whole budget);
(c) convo: ``conv.send()`` with ``token_budget=20_000`` (summaries by
    ``ClaudeSummarizer`` through the same fake, billed at their model's price).

(a) and (b) are run with several simple cache layouts; the cheapest is the
baseline. Dollars come from ``convo.PriceTable().cost`` (``DEFAULT_PRICES``)
on each request's usage as the fake reports it. The figures are deterministic.

    python bench/cost.py [--quick] [--record]
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import anthropic

from convo import DEFAULT_PRICES, ConversationStore, PriceTable, _recall
from convo._summarizer import SUMMARIZER_SYSTEM
from tests.fakeapi import FakeMessagesAPI, Reply

TURNS = 300
QUICK_TURNS = 60
MAX_TOKENS = 1_024
#: The fake's minimum cacheable prefix. Sonnet 4.x's real minimum; the notes in
#: shared/ give 512 for the 5.x family. Every prefix here with a breakpoint is
#: above both (the system prompt alone is ~2,400 fake tokens), so it changes nothing.
MIN_CACHEABLE = 1_024
EPHEMERAL = {"type": "ephemeral"}
CONVO = "(c) convo conv.send() (default: recall on, after the last breakpoint)"
CONVO_OFF = "(c) convo conv.send(), recall off"
CONVO_B = "(c) convo, recall stored with the turn (option B, not shipped)"


# -- the conversation's content ----------------------------------------------------------------


@dataclass
class Script:
    """The user turns and, for each, the reply the fake gives (same for every strategy)."""

    system: str
    users: list[str]
    replies: list[str]
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {text: i for i, text in enumerate(self.users)}


def make_script(turns: int) -> Script:
    users_gen, replies_gen = c.ChatText(301), c.ChatText(302)
    users = []
    for i in range(turns):
        text = users_gen.user()
        users.append(f"{text} (#{i + 1})")  # unique, so each turn has its own reply
    return Script(
        system=c.system_prompt(),
        users=users,
        replies=[replies_gen.assistant() for _ in range(turns)],
    )


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body["messages"]):
        if message["role"] != "user":
            continue
        content = message["content"]
        if isinstance(content, str):
            return content
        return "\n".join(b.get("text", "") for b in content if b.get("type") == "text")
    return ""


def reply_for(script: Script) -> Callable[[dict[str, Any]], Reply]:
    def reply(body: dict[str, Any]) -> Reply:
        if body.get("system") == SUMMARIZER_SYSTEM:
            # A summary of a Claude summary's size (~550 tokens by the fake's count).
            prompt = _last_user_text(body)
            through = prompt.rsplit("(turn ", 1)[-1].split(")", 1)[0]
            return Reply(text=c.summary_text(int(through) if through.isdigit() else 0))
        text = _last_user_text(body)
        # convo resends a failed user turn merged with the next: take the newest one.
        for line in reversed(text.splitlines()):
            if line in script.index:
                return Reply(text=script.replies[script.index[line]])
        digest = int(hashlib.sha256(text.encode()).hexdigest(), 16)
        return Reply(text=script.replies[digest % len(script.replies)])

    return reply


# -- billing ---------------------------------------------------------------------------------------


@dataclass
class Bill:
    requests: int = 0
    input: int = 0
    cache_write: int = 0
    cache_read: int = 0
    output: int = 0
    dollars: Decimal = Decimal(0)
    input_dollars: Decimal = Decimal(0)
    dollars_alt: Decimal = Decimal(0)  # with cache reads at 0.1x input (see ALT_PRICES)
    summary_requests: int = 0
    summary_dollars: Decimal = Decimal(0)
    largest_request: int = 0

    @property
    def billed_input(self) -> int:
        return self.input + self.cache_write + self.cache_read

    @property
    def weighted_input(self) -> float:
        """Input in 'uncached input token' units: writes 1.25x, reads at the table's ratio."""
        price = DEFAULT_PRICES[c.MODEL]
        assert price.input is not None
        assert price.cache_write_5m is not None
        assert price.cache_read is not None
        return (
            self.input
            + self.cache_write * float(price.cache_write_5m / price.input)
            + self.cache_read * float(price.cache_read / price.input)
        )


PRICES = PriceTable()
#: DEFAULT_PRICES lists cache reads of claude-sonnet-5-5 at $0.10/M, 0.05x its $2 input (its
#: comment says a model page gives $0.20); this second table prices them at 0.1x.
ALT_PRICES = PriceTable({c.MODEL: {"cache_read": "0.20"}})


def bill(fake: FakeMessagesAPI, start: int) -> Bill:
    out = Bill()
    for request in fake.requests[start:]:
        if request.usage is None or request.path != "/v1/messages":
            continue
        model = request.body["model"]
        usage = request.usage
        cost = PRICES.cost(model, usage)
        alt = ALT_PRICES.cost(model, usage)
        input_only = PRICES.cost(model, {**usage, "output_tokens": 0})
        if cost is None or alt is None or input_only is None:
            raise RuntimeError(f"no price for {model} with usage {usage}")
        out.requests += 1
        if request.body.get("system") == SUMMARIZER_SYSTEM:
            out.summary_requests += 1
            out.summary_dollars += cost
        out.input += usage["input_tokens"]
        out.cache_write += usage["cache_creation_input_tokens"]
        out.cache_read += usage["cache_read_input_tokens"]
        out.output += usage["output_tokens"]
        out.dollars += cost
        out.dollars_alt += alt
        out.input_dollars += input_only
        out.largest_request = max(
            out.largest_request,
            usage["input_tokens"]
            + usage["cache_creation_input_tokens"]
            + usage["cache_read_input_tokens"],
        )
    return out


# -- strategies (a) and (b): the app calls the SDK itself ---------------------------------


def _mark(message: dict[str, Any]) -> dict[str, Any]:
    return {
        "role": message["role"],
        "content": [{"type": "text", "text": message["content"], "cache_control": EPHEMERAL}],
    }


def run_manual(
    client: anthropic.Anthropic,
    fake: FakeMessagesAPI,
    script: Script,
    *,
    trim: bool,
    cache: str,
) -> Bill:
    """(a) when ``trim`` is False, (b) when True; ``cache`` is the breakpoint layout:

    * ``none``: no breakpoints;
    * ``system``: one at the end of the system prompt;
    * ``system+last``: that and one on the newest user turn (the usual "cache the
      conversation" layout);
    * ``adaptive``: ``system+last`` until the first trim, then ``system`` only (once
      the oldest turn moves every request, a breakpoint on the newest turn writes
      a prefix that is never read again).
    """
    start = len(fake.requests)
    fake.clear_cache()
    history: list[dict[str, Any]] = []
    tokens: list[int] = []  # each message's tokens, as the fake counts them
    system_tokens = fake.count_request_tokens(
        {"model": c.MODEL, "system": script.system, "messages": []}
    )
    first = 0  # index of the oldest message sent
    trimmed = False
    for user, _ in zip(script.users, script.replies, strict=True):
        history.append({"role": "user", "content": user})
        tokens.append(fake.count_request_tokens({"model": c.MODEL, "messages": [history[-1]]}))
        if trim:
            total = system_tokens + sum(tokens[first:])
            while total > c.BUDGET and first < len(history) - 1:
                total -= tokens[first] + tokens[first + 1]  # a whole exchange
                first += 2
                trimmed = True
        messages: list[dict[str, Any]] = list(history[first:])
        system: Any = script.system
        if cache != "none":
            system = [{"type": "text", "text": script.system, "cache_control": EPHEMERAL}]
        if cache == "system+last" or (cache == "adaptive" and not trimmed):
            messages[-1] = _mark(messages[-1])
        response = client.messages.create(
            model=c.MODEL, max_tokens=MAX_TOKENS, system=system, messages=messages
        )
        text = "".join(b.text for b in response.content if b.type == "text")
        history.append({"role": "assistant", "content": text})
        tokens.append(fake.count_request_tokens({"model": c.MODEL, "messages": [history[-1]]}))
    return bill(fake, start)


# -- strategy (c): convo -------------------------------------------------------------------


@dataclass
class RecallUse:
    """What recall put into the requests of one run."""

    requests: int = 0  # requests that carried recalled turns
    tokens: int = 0  # their recall blocks' tokens (store's counter), all requests


def run_convo(
    client: anthropic.Anthropic,
    fake: FakeMessagesAPI,
    script: Script,
    *,
    recall: str = "off",
    use: RecallUse | None = None,
) -> Bill:
    """(c); ``recall``: ``off``, ``A`` (convo's recall: a block after the last breakpoint,
    new each request) or ``B`` (the same block stored in the user turn when it is sent,
    so every later replay of that turn is byte-identical and read from the cache)."""
    start = len(fake.requests)
    fake.clear_cache()
    use = use if use is not None else RecallUse()
    with (
        tempfile.TemporaryDirectory(prefix="convo-bench-") as tmp,
        ConversationStore(
            f"sqlite:///{Path(tmp) / 'cost.db'}",
            client=client,
            token_budget=c.BUDGET,
            recall=recall == "A",
        ) as store,
    ):
        conv = store.create(system=script.system, model=c.MODEL)
        for user in script.users:
            content: Any = user
            if recall == "B":
                block, tokens = _stored_recall(conv, user)
                if block:
                    content = [{"type": "text", "text": user}, {"type": "text", "text": block}]
                    use.requests += 1
                    use.tokens += tokens
            conv.send(content, max_tokens=MAX_TOKENS)
        if recall == "A":
            for request in fake.requests[start:]:
                if request.body is None or request.body.get("system") == SUMMARIZER_SYSTEM:
                    continue
                last = request.body["messages"][-1]["content"][-1]
                if last.get("text", "").startswith(_recall.RECALL_HEADER):
                    use.requests += 1
                    use.tokens += store.turns.count_text(last["text"])
    return bill(fake, start)


def _stored_recall(conv: Any, user: str) -> tuple[str, int]:
    """Option B's block for the next user turn: convo's own recall, looked up before it is
    stored (every live turn is in the request then, so only archived turns qualify)."""
    store = conv.store
    state = store.records.live_state(conv.id)
    budget = conv.budget(max_tokens=MAX_TOKENS)
    factor = store.calibration(conv.effective_model).effective_factor
    reserve = _recall.reserve(
        enabled=True,
        budget=budget,
        share=store.recall_share,
        factor=factor,
        archived_through_seq=state.row.archived_through_seq,
        live_tokens=sum(t.tokens for t in state.turns),
        scope="conversation",
        user_id=None,
    )
    turns = [*state.turns, _recall_probe(user, (state.turns[-1].seq if state.turns else 0) + 1)]
    query = _recall.plan(
        turns=turns,
        conversation_id=conv.id,
        user_id=None,
        scope="conversation",
        reserve=reserve,
    )
    if query is None:
        return "", 0
    hits = store.records.recall_for(query, _recall.REQUEST_K)
    _, block, tokens = _recall.select(
        hits, query, first_seq=query.exclude_from_seq, count_text=store.turns.count_text
    )
    return block, tokens


def _recall_probe(text: str, seq: int) -> Any:
    from convo._window import LiveTurn

    return LiveTurn(seq=seq, role="user", content=[{"type": "text", "text": text}], tokens=0)


def _cache_share(requests: list[Any]) -> float:
    """The share of conversation requests (not summaries) that read the cache."""
    sent = [
        r
        for r in requests
        if r.usage is not None
        and r.path == "/v1/messages"
        and r.body.get("system") != SUMMARIZER_SYSTEM
    ]
    return sum(1 for r in sent if r.usage["cache_read_input_tokens"] > 0) / max(1, len(sent))


# -- report --------------------------------------------------------------------------------


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    turns = QUICK_TURNS if args.quick else TURNS
    script = make_script(turns)
    results: dict[str, Bill] = {}
    with (
        FakeMessagesAPI(
            reply=reply_for(script),
            min_cacheable_tokens=MIN_CACHEABLE,
            context_window=1_000_000,
        ) as fake,
        anthropic.Anthropic(base_url=fake.base_url, api_key="test-key", max_retries=0) as client,
    ):
        system_tokens = fake.count_request_tokens(
            {"model": c.MODEL, "system": script.system, "messages": []}
        )
        uses = {"A": RecallUse(), "B": RecallUse()}
        strategies: list[tuple[str, Callable[[], Bill]]] = [
            (
                CONVO_OFF,
                lambda: run_convo(client, fake, script, recall="off"),
            ),
            (
                CONVO,
                lambda: run_convo(client, fake, script, recall="A", use=uses["A"]),
            ),
            (
                CONVO_B,
                lambda: run_convo(client, fake, script, recall="B", use=uses["B"]),
            ),
        ]
        for trim, cache, label in [
            (False, "none", "(a) full history, no cache"),
            (False, "system+last", "(a) full history, cache system + newest turn"),
            (True, "none", "(b) trim, no cache"),
            (True, "system", "(b) trim, cache system"),
            (True, "system+last", "(b) trim, cache system + newest turn"),
            (True, "adaptive", "(b) trim, cache system + newest turn until the first trim"),
        ]:
            strategies.append(
                (
                    label,
                    lambda t=trim, k=cache: run_manual(client, fake, script, trim=t, cache=k),
                )
            )
        strategies.extend([strategies.pop(0), strategies.pop(0), strategies.pop(0)])
        fake_requests: dict[str, list[Any]] = {}
        for name, fn in strategies:
            started = time.perf_counter()
            first_request = len(fake.requests)
            results[name] = fn()
            fake_requests[name] = fake.requests[first_request:]
            r = results[name]
            print(
                f"{name}: ${r.dollars:.4f} ({r.requests} requests, "
                f"{time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    baseline_name = min(
        (n for n in results if n.startswith("(b)")), key=lambda n: results[n].dollars
    )
    full_name = min((n for n in results if n.startswith("(a)")), key=lambda n: results[n].dollars)
    base = results[baseline_name]
    convo = results[CONVO]
    rows = []
    for name, r in results.items():
        rows.append(
            [
                name + (" **(baseline)**" if name == baseline_name else ""),
                f"{r.requests}"
                + (f" ({r.summary_requests} summaries)" if r.summary_requests else ""),
                c.fmt_int(r.input),
                c.fmt_int(r.cache_write),
                c.fmt_int(r.cache_read),
                c.fmt_int(r.billed_input),
                c.fmt_int(r.largest_request),
                f"{r.input_dollars:.3f}",
                f"{r.dollars:.3f}",
                f"{r.dollars / base.dollars:.0%}",
                f"{r.dollars_alt / base.dollars_alt:.0%}",
            ]
        )
    headers = [
        "strategy",
        "requests",
        "uncached input",
        "cache writes",
        "cache reads",
        "billed input tokens",
        "largest request",
        "input $",
        "total $",
        "vs baseline",
        "vs baseline, reads 0.1x",
    ]
    result_table = c.table(headers, rows)
    ratio = convo.dollars / base.dollars
    ratio_input = convo.input_dollars / base.input_dollars
    versus_full = convo.dollars / results[full_name].dollars
    summaries = (
        f"convo's {convo.summary_requests} summary requests cost ${convo.summary_dollars:.3f} "
        f"of its ${convo.dollars:.3f}."
    )
    verdict = (
        f"convo costs **{ratio:.0%}** of the cheapest trimming baseline in total dollars "
        f"({ratio_input:.0%} of its input dollars; {versus_full:.0%} of the cheapest "
        f"full-history run). Target <= 40%: **{'met' if ratio <= 0.4 else 'MISSED'}**."
    )
    off = results[CONVO_OFF]
    recall_lines = []
    for name, key in ((CONVO, "A"), (CONVO_B, "B")):
        r, u = results[name], uses[key]
        recall_lines.append(
            f"{name}: ${r.dollars:.3f}, {r.dollars / off.dollars - 1:+.1%} vs recall off; "
            f"cache reads in {_cache_share(fake_requests[name]):.0%} of requests "
            f"(recall off: {_cache_share(fake_requests[CONVO_OFF]):.0%}); recalled turns in "
            f"{u.requests} of {turns} requests, {u.tokens:,} tokens in all"
        )
    price = DEFAULT_PRICES[c.MODEL]
    print()
    print(result_table)
    print()
    print(verdict)
    print(summaries)
    print("\n".join(recall_lines))
    if args.record:
        largest_full = results[full_name].largest_request
        growth = (largest_full - system_tokens) / turns
        turn_200k = int((200_000 - system_tokens) / growth)
        body = "\n".join(
            [
                f"{turns} turns of `{c.MODEL}` (prices from `DEFAULT_PRICES`, per million: input "
                f"${price.input}, output ${price.output}, 5-minute cache write "
                f"${price.cache_write_5m}, cache read ${price.cache_read}; summaries by "
                "`claude-haiku-5-5` at its prices), system prompt ~2,000 cl100k tokens, user "
                f"turns ~40, replies ~250 cl100k tokens, `max_tokens={MAX_TOKENS}`, budget "
                f"{c.BUDGET:,} input tokens. Billing is the fake API's prompt-cache accounting "
                f"(its tokenizer counts cl100k x 1.2; minimum cacheable prefix {MIN_CACHEABLE:,} "
                "tokens, Sonnet 4.x's real minimum; the notes give 512 for the 5.x family, and "
                "every cached prefix here is above both). Turns are assumed to come within the "
                "5-minute cache lifetime. Deterministic: one run.",
                "",
                result_table,
                "",
                verdict,
                "",
                f"- {summaries}",
                "- Recall (issue 9): the same run with recall off, on (convo's default: the "
                "recalled turns ride in a text block after the last cache breakpoint, new each "
                "request), and with the block stored in the user turn instead (option B: cached "
                "on later replays, but it stays in the live turns until compacted). The "
                "generated chat repeats its vocabulary, so nearly every turn recalls "
                "something: an upper bound on what recall adds.",
                *(f"  - {line}" for line in recall_lines),
                "- *billed input tokens* = uncached input + cache writes + cache reads; *input $* "
                "leaves out output tokens (the same replies in every strategy, plus convo's "
                "summaries). *vs baseline, reads 0.1x* prices Sonnet 5.5 cache reads at $0.20/M "
                f"(0.1x input) instead of `DEFAULT_PRICES`' ${price.cache_read}/M (0.05x), as one "
                "model page has it.",
                f"- (a) never trims: its last request carried {largest_full:,} tokens, "
                f"{largest_full / c.BUDGET:.1f}x the {c.BUDGET:,} budget (it ignores the budget by "
                f"design). That fits {c.MODEL}'s 1M-token window and would fit a 200k one too; "
                f"growing ~{growth:,.0f} tokens a turn, it would pass 200k at about turn "
                f"{turn_200k:,}. With caching, full history is cheaper than trimming (almost "
                "everything is a cache read), but each request grows without bound.",
                "- (b) is given exact counts (the fake's own tokenizer) and the best of four "
                "breakpoint layouts. Each turn that drops an exchange moves the start of the "
                "messages: only the system prompt is then read from the cache and the rest is "
                "written again (1.25x); a turn that needs no trim reads its whole prefix. A "
                "trimmer that dropped many turns at once would cache better; that is half of "
                "what convo's compaction does.",
                "- (c) convo keeps the prefix (system prompt + summary + live turns) "
                "byte-identical between compactions, so most input is read from the cache; each "
                "compaction costs one summary request (Haiku) and one cache write of the new "
                "prefix. It sends less raw history than (b) (the live turns use 55-100% of "
                "the budget, plus a summary).",
            ]
        )
        c.record("cost", body, postgres_url=None, command=c.command_line())


if __name__ == "__main__":
    main()

"""How long convo takes to assemble the next request, as conversations grow.

For conversations of 100, 1,000, 10,000 and 100,000 stored messages, compacted
as convo would have compacted them while they grew (archive blocks, a rolling
summary, a live window under a 20,000-token budget), time ``conv.window()``:
what ``conv.send()`` does before the API call, without the call. No API, no
compaction during the timing (each conversation's live turns already fit).

Each size is measured on three conversations, 0, 10 and 20 messages past the
nominal size, so the live window is seen at different points of its
compaction cycle (between ~55% and 100% of the budget). Figures: p50 and p95
per run, median over the runs.

    python bench/context_assembly.py [--quick] [--record] [--runs N]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

from convo import ConversationStore, ExtractiveSummarizer

SIZES = [100, 1_000, 10_000, 100_000]
QUICK_SIZES = [100, 1_000, 5_000]
PHASES = [0, 10, 20]
CALLS = 100  # timed window() calls per conversation per run
TARGET_P50_MS = 5.0
TARGET_FLATNESS = 1.5


def build(url: str, sizes: list[int], pool: c.TurnPool, system: str) -> dict[int, list[str]]:
    """Conversations per size (one per phase), bulk-inserted; their ids."""
    ids: dict[int, list[str]] = {}
    with ConversationStore(url) as store:
        for size in sizes:
            ids[size] = []
            for phase in PHASES:
                started = time.perf_counter()
                plan = c.plan_conversation(pool, size + phase, system=system)
                ids[size].append(c.insert_conversation(store, plan, system=system))
                print(
                    f"  built {size + phase:>7,} messages: {len(plan.block_rows):,} archive "
                    f"blocks, {plan.messages - plan.archived_through} live turns "
                    f"({plan.live_tokens:,} tokens) in {time.perf_counter() - started:.1f} s",
                    flush=True,
                )
    return ids


def measure(url: str, ids: dict[int, list[str]], runs: int) -> dict[int, dict[str, float]]:
    results: dict[int, dict[str, float]] = {}
    # ExtractiveSummarizer: should a compaction ever run here, it must not call an API.
    with ConversationStore(url, summarizer=ExtractiveSummarizer()) as store:
        convs = {size: [store.get(i) for i in conv_ids] for size, conv_ids in ids.items()}
        before = {conv.id: conv.archived_through_seq for group in convs.values() for conv in group}
        per_run: dict[int, list[tuple[float, float]]] = {size: [] for size in convs}
        live_turns: dict[int, list[int]] = {size: [] for size in convs}
        for _ in range(runs):
            for size, group in convs.items():
                samples: list[float] = []
                for conv in group:
                    samples += c.timed(conv.window, CALLS, warmup=5)
                per_run[size].append((c.percentile(samples, 50), c.percentile(samples, 95)))
        for size, group in convs.items():
            for conv in group:
                window = conv.window()
                assert not window.omitted_seqs, "a window left turns out: not a fair measurement"
                assert conv.archived_through_seq == before[conv.id], "compaction ran while timing"
                live_turns[size].append((window.last_seq or 0) - (window.first_seq or 0) + 1)
            results[size] = {
                "p50": c.median([p50 for p50, _ in per_run[size]]),
                "p95": c.median([p95 for _, p95 in per_run[size]]),
                "live_min": min(live_turns[size]),
                "live_max": max(live_turns[size]),
            }
    return results


def profile(url: str, conversation_id: str, calls: int = 300) -> str:
    """The top entries of a cProfile of ``calls`` window() calls."""
    with ConversationStore(url, summarizer=ExtractiveSummarizer()) as store:
        conv = store.get(conversation_id)
        for _ in range(10):
            conv.window()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            conv.window()
        profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(14)
    text = out.getvalue()
    for prefix in sorted(
        {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"], str(c.ROOT)},
        key=len,
        reverse=True,
    ):
        text = text.replace(prefix + "/", "")
    start = text.find("   ncalls")
    total = stats.total_tt  # type: ignore[attr-defined]
    return (
        f"{calls} calls of conv.window() under cProfile: {total:.3f} s in all "
        f"({total / calls * 1000:.2f} ms a call with profiling overhead), sorted by own time:\n\n"
        + text[start:].rstrip()
    )


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs per size (default 5)")
    args = p.parse_args()
    sizes = QUICK_SIZES if args.quick else SIZES
    runs = 2 if args.quick else args.runs
    pg = c.prepare_postgres(args.postgres_url, enabled=not args.no_postgres)
    pool = c.turn_pool()
    system = c.system_prompt()
    rows = []
    verdicts = []
    profiles = []
    for kind in c.database_kinds(pg):
        with c.fresh_database(kind, pg) as url:
            print(f"{kind}: building conversations", flush=True)
            ids = build(url, sizes, pool, system)
            print(f"{kind}: timing conv.window()", flush=True)
            res = measure(url, ids, runs)
            base = res[1_000]["p50"] if 1_000 in res else res[sizes[0]]["p50"]
            for size in sizes:
                r = res[size]
                rows.append(
                    [
                        kind,
                        f"{size:,}",
                        f"{r['live_min']}-{r['live_max']}",
                        c.fmt_ms(r["p50"]),
                        c.fmt_ms(r["p95"]),
                        f"{r['p50'] / base:.2f}x",
                    ]
                )
            largest = sizes[-1]
            p50 = res[largest]["p50"] * 1000
            flat = res[largest]["p50"] / base
            if kind == "sqlite":
                ok_speed = p50 < TARGET_P50_MS
                ok_flat = flat <= TARGET_FLATNESS
                verdicts.append(
                    f"- p50 at {largest:,} messages on SQLite: {p50:.2f} ms, target < "
                    f"{TARGET_P50_MS:g} ms: **{'met' if ok_speed else 'MISSED'}**."
                )
                verdicts.append(
                    f"- {largest:,} vs 1,000 messages on SQLite: {flat:.2f}x, target <= "
                    f"{TARGET_FLATNESS}x: **{'met' if ok_flat else 'MISSED'}**."
                )
            else:
                verdicts.append(
                    f"- {kind}: p50 {p50:.2f} ms at {largest:,} messages, {flat:.2f}x of 1,000."
                )
            profiles.append((kind, profile(url, ids[largest][0])))
    headers = [
        "database",
        "stored messages",
        "live turns",
        "p50 ms",
        "p95 ms",
        "p50 vs 1,000",
    ]
    result_table = c.table(headers, rows)
    print()
    print(result_table)
    print()
    print("\n".join(verdicts))
    for kind, text in profiles:
        print(f"\nprofile ({kind}, largest size):\n{text}")
    if args.record:
        body = [
            f"Budget {c.BUDGET:,} tokens, system prompt ~2,000 tokens, {runs} runs of "
            f"{CALLS} calls on each of {len(PHASES)} conversations per size (0, 10 and 20 "
            "messages past the size, to sample the compaction cycle). Older turns are in "
            "archive blocks with a rolling summary, as convo leaves them; `live turns` is the "
            "range of turns in the window. p50/p95 are medians over the runs.",
            "",
            result_table,
            "",
            "Targets:",
            "",
            *verdicts,
            "",
            "Where the time goes (cProfile of the largest SQLite conversation):",
            "",
            "```",
            profiles[0][1],
            "```",
        ]
        c.record("context_assembly", "\n".join(body), postgres_url=pg, command=c.command_line())


if __name__ == "__main__":
    main()

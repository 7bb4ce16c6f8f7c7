"""Generated conversations with facts planted early, to measure what summaries keep.

The test suite and ``bench/summaries.py`` use the same generator: a user
states ten facts (names, numbers, dates, a preference, a decision) in the
first turns, then chats for a long time. The filler is not easy to tell
apart from the facts by shape alone: assistant replies carry names, numbers,
dates and identifiers too, and user turns carry short pleasantries and
questions. Deterministic for a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from convo import SummaryTurn

#: (what the user says, the string that must survive in the summary)
FACTS: tuple[tuple[str, str], ...] = (
    ("My name is Priya Raman and I run a small bakery.", "Priya Raman"),
    ("Our opening day is 2027-03-14, a Sunday.", "2027-03-14"),
    ("The total budget for the fit-out is $48,500.", "48,500"),
    ("I'm allergic to peanuts, so keep them out of every recipe.", "peanuts"),
    ("My business partner is Tomasz Wojcik; he handles the accounts.", "Tomasz Wojcik"),
    ("The flour supplier's account number is 88213-B.", "88213-B"),
    ("I prefer metric units everywhere, grams not cups.", "metric"),
    ("We decided to take the lease on Rua das Flores 112.", "Rua das Flores"),
    ("The ovens must be preheated by 05:40 every weekday.", "05:40"),
    ("Please always answer in British English.", "British English"),
)

_NAMES = ("Marta", "Jonas", "Chen", "Farah", "Luis", "Amara", "Sven", "Kenji", "Olga", "Ravi")
_NOUNS = (
    "dough", "oven", "schedule", "delivery", "invoice", "recipe", "croissant", "sourdough",
    "shift", "counter", "display", "fridge", "starter", "batch", "tray", "supplier", "price",
    "label", "menu", "order", "window", "mixer", "proofing", "crust", "glaze", "filling",
)  # fmt: skip
_VERBS = (
    "needs", "affects", "changes", "depends on", "follows", "improves", "slows", "fixes",
    "replaces", "matches", "shortens", "balances",
)  # fmt: skip
_ADJECTIVES = ("early", "cold", "busy", "new", "larger", "slower", "cheaper", "even", "dense")
_PLEASANTRIES = (
    "Thanks!", "Great, thank you.", "Ok.", "Sounds good.", "Perfect, thanks a lot.", "Got it.",
    "Nice.", "Sure.", "Yes please.", "Cool.",
)  # fmt: skip
_QUESTIONS = (
    "How should I handle the {a} {n}?",
    "What if the {n} {v} the {n2}?",
    "Can you suggest a better {n} for the {a} {n2}?",
    "Is it fine to move the {n} earlier?",
)


@dataclass(frozen=True)
class Planted:
    turns: list[SummaryTurn]
    facts: tuple[tuple[str, str], ...]


class _Filler:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def sentence(self) -> str:
        r = self.rng
        text = (
            f"The {r.choice(_ADJECTIVES)} {r.choice(_NOUNS)} {r.choice(_VERBS)} the "
            f"{r.choice(_NOUNS)} and the {r.choice(_NOUNS)}"
        )
        roll = r.random()
        if roll < 0.2:
            text += f", as {r.choice(_NAMES)} noted"
        elif roll < 0.35:
            text += f" by about {r.randint(2, 900)} grams"
        elif roll < 0.42:
            text += f" until {r.choice(('Monday', 'Friday', 'June 3', '2027-01-09'))}"
        return text + "."

    def user(self) -> str:
        r = self.rng
        roll = r.random()
        if roll < 0.3:
            return r.choice(_PLEASANTRIES)
        question = r.choice(_QUESTIONS).format(
            a=r.choice(_ADJECTIVES), n=r.choice(_NOUNS), n2=r.choice(_NOUNS), v=r.choice(_VERBS)
        )
        if roll < 0.6:
            return question
        return f"{self.sentence()} {question}"

    def assistant(self) -> str:
        r = self.rng
        paragraphs = [" ".join(self.sentence() for _ in range(r.randint(2, 5)))]
        if r.random() < 0.4:
            paragraphs.append("\n".join(f"- {self.sentence()}" for _ in range(r.randint(2, 4))))
        if r.random() < 0.25:
            paragraphs.append(
                f"For {r.choice(_NAMES)}'s order ({r.randint(2, 99)} trays, "
                f"{r.randint(5, 90)} minutes) that comes to {r.randint(100, 99_999):,} in total."
            )
        return "\n\n".join(paragraphs)


def planted_conversation(turn_count: int, *, seed: int = 1, fact_turns: int = 40) -> Planted:
    """``turn_count`` alternating turns; the facts are stated in the first ``fact_turns``."""
    filler = _Filler(seed)
    rng = random.Random(seed * 7919)
    user_slots = list(range(0, min(fact_turns, turn_count), 2))
    slots = dict(zip(sorted(rng.sample(user_slots, len(FACTS))), FACTS, strict=True))
    turns = []
    for i in range(turn_count):
        if i % 2 == 0:
            fact = slots.get(i)
            text = filler.user() if fact is None else f"{fact[0]} {filler.user()}"
            turns.append(SummaryTurn(i + 1, "user", [{"type": "text", "text": text}]))
        else:
            text = filler.assistant()
            turns.append(SummaryTurn(i + 1, "assistant", [{"type": "text", "text": text}]))
    return Planted(turns, FACTS)


def kept(summary: str, facts: tuple[tuple[str, str], ...] = FACTS) -> int:
    """How many facts' key strings are in ``summary``."""
    return sum(key in summary for _, key in facts)

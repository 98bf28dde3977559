"""What the self-distillation generator answers: every human turn of the packaged ShareGPT conversations
(answered in order, the target's own earlier replies as the context) and Magpie-style prompts the
target writes itself (arXiv:2406.08464: the instruct model continues its chat template's user prefix),
deduplicated and filtered. Never an evaluation prompt: spec_bench is not read here.

A :class:`Job` is one conversation: its user turns, where they come from, and its split ("train" or
"heldout": a fixed range of ShareGPT conversations whose greedy replies every scaling-curve point is
measured on, never trained on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

HELDOUT_CONVERSATIONS = (6000, 6100)  # ShareGPT conversations kept out of training (earlier held-out: 6,000+)


@dataclass(frozen=True)
class Job:
    kind: str  # "sharegpt" | "magpie" | "magpie_prompt" (writes a user turn, answers nothing)
    source_id: int  # ShareGPT conversation number, or the Magpie prompt's rank
    turns: tuple = field(default_factory=tuple)  # user turns (str); empty for "magpie_prompt"
    split: str = "train"

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.source_id}"


def sharegpt_jobs(heldout: tuple = HELDOUT_CONVERSATIONS) -> tuple[list[Job], list[Job]]:
    """(held-out jobs, training jobs): every ShareGPT conversation with its user turns, in file order."""
    from .sharegpt import sharegpt_conversations

    held, train = [], []
    for i, msgs in enumerate(sharegpt_conversations(min_turns=1)):
        turns = tuple(m["content"] for m in msgs if m["role"] == "user")
        if not turns:
            continue
        if heldout[0] <= i < heldout[1]:
            held.append(Job("sharegpt", i, turns, "heldout"))
        else:
            train.append(Job("sharegpt", i, turns, "train"))
    return held, train


def interleave(first: list, second: list, every: int) -> list:
    """``first`` with an item of ``second`` after every ``every`` of it (0: ``second`` left out); what
    remains of either list follows."""
    if every <= 0 or not second:
        return list(first)
    out, j = [], 0
    for i, x in enumerate(first):
        out.append(x)
        if (i + 1) % every == 0 and j < len(second):
            out.append(second[j])
            j += 1
    return out + list(second[j:])


_WORD = re.compile(r"[a-z0-9]+")


def normalised(text: str) -> str:
    """Lower-case words joined by single spaces (what two prompts must share to count as duplicates)."""
    return " ".join(_WORD.findall(text.lower()))


@dataclass
class PromptFilter:
    """Magpie prompts kept: ``min_words``..``max_chars`` long, not degenerate (the share of distinct words
    at least ``min_distinct``), and neither the same normalised text nor the same first ``prefix_words``
    words as an earlier kept prompt. Decided in job order, so a rerun keeps the same prompts."""
    min_words: int = 3
    max_chars: int = 1500
    min_distinct: float = 0.4
    prefix_words: int = 8
    seen: set = field(default_factory=set)
    seen_prefix: set = field(default_factory=set)
    rejected: dict = field(default_factory=dict)

    def verdict(self, text: str) -> str | None:
        """None to keep ``text`` (and remember it), else the reason it is dropped."""
        words = normalised(text).split()
        if len(words) < self.min_words:
            reason = "too_short"
        elif len(text) > self.max_chars:
            reason = "too_long"
        elif len(set(words)) < self.min_distinct * len(words):
            reason = "repetitive"
        elif " ".join(words) in self.seen:
            reason = "duplicate"
        elif " ".join(words[:self.prefix_words]) in self.seen_prefix:
            reason = "near_duplicate"
        else:
            self.seen.add(" ".join(words))
            self.seen_prefix.add(" ".join(words[:self.prefix_words]))
            return None
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return reason

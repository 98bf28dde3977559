"""Model-free tree branches: continuations found by n-gram lookup in the prompt and the text generated so
far (what prompt lookup decoding does), grafted onto a step's draft tree at no draft cost
(``decoding.sources``: a branch follows the draft's nodes where they match and hangs new nodes below,
never fed to the draft; the draft re-reads whatever is accepted at commit).
"""

from __future__ import annotations

from dataclasses import dataclass



@dataclass
class NgramLookup:
    """``num_tokens``: the longest continuation grafted per step; the lookup key is the last
    ``max_ngram`` tokens, shortened down to ``min_ngram`` until one occurred before. The most recent
    earlier occurrence wins (recent text repeats more often than old)."""

    num_tokens: int = 10
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        for name in ("num_tokens", "max_ngram", "min_ngram"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NgramLookup.{name} must be an integer >= 1, got {value!r}")
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"NgramLookup.min_ngram {self.min_ngram} > max_ngram {self.max_ngram}")

    def index(self, tokens) -> "NgramIndex":
        """An index over ``tokens`` (the prompt) that ``extend`` keeps current as text is generated."""
        return NgramIndex(self, tokens)


class NgramIndex:
    """For every n-gram (n in [min_ngram, max_ngram]) of the history, where its most recent occurrence
    that has a continuation ends. Appending a token costs O(max_ngram); a lookup O(max_ngram)."""

    def __init__(self, lookup: NgramLookup, tokens):
        self.lookup = lookup
        self.history: list[int] = []
        self._ends: dict[tuple, int] = {}
        self.extend(tokens)

    def extend(self, tokens) -> None:
        h, lo, hi = self.history, self.lookup.min_ngram, self.lookup.max_ngram
        for t in tokens:
            j = len(h)  # the n-grams ending just before position j now have a continuation: token j
            for n in range(lo, min(hi, j) + 1):
                self._ends[tuple(h[j - n:j])] = j
            h.append(int(t))

    def propose(self) -> list[int]:
        """The continuation of the longest recent n-gram match of the history's end (may be empty).

        A match close to the end has fewer than ``num_tokens`` tokens after it; the continuation then
        repeats with the match's period (an overlapping copy, as in LZ77), so that a run such as
        ``1 1 1`` or ``a b a b`` proposes a full-length branch rather than one or two tokens."""
        h, k = self.history, self.lookup.num_tokens
        for n in range(min(self.lookup.max_ngram, len(h)), self.lookup.min_ngram - 1, -1):
            start = self._ends.get(tuple(h[len(h) - n:]))
            if start is not None:
                out = h[start:start + k]
                period = len(h) - start
                while len(out) < k:
                    out.append(out[len(out) - period])
                return out
        return []

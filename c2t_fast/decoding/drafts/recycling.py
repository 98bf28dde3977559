"""Token Recycling (arXiv:2408.08696): the target's own top-k candidates at every verified position, kept
in an adjacency table (token -> its k most likely successors, as the target last saw them), grown into a
draft tree from the root at no draft cost.

Every verification pass computes the target's logits at every tree node; their top-k is what the
target would say next after that node's token, in that context. The table keeps the latest top-k per
token (``V x k`` ids and probabilities: 1.6 MB for SmolLM2's 49,152 ids at k = 8), and a step's tree
follows it breadth-first with a fixed shape (``widths``: children per node at each depth), each node
carrying the probability the target gave it when it was recorded.
"""

from __future__ import annotations

import torch


class RecyclingTable:
    """``vocab`` ids, ``k`` successors each; ``widths``: children kept per node at depth 1, 2, ... of a
    proposed tree (a node's i-th child is its i-th most likely successor)."""

    def __init__(self, vocab: int, k: int = 8, widths: tuple = (4, 2, 2, 1, 1, 1)):
        if vocab < 1 or not 1 <= k <= 64 or not widths or any(not 1 <= w <= k for w in widths):
            raise ValueError(f"RecyclingTable: vocab >= 1, k in 1..64 and every width in 1..k, got {vocab}, {k}, "
                             f"{widths}")
        self.vocab, self.k, self.widths = vocab, k, tuple(widths)
        self.next = torch.full((vocab, k), -1, dtype=torch.int32)
        self.prob = torch.zeros(vocab, k, dtype=torch.float16)

    def reset(self) -> None:
        self.next.fill_(-1)
        self.prob.zero_()

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """A verification pass: ``tokens`` int64 ``[T]`` (the tree's nodes) and the target's logits ``[T, V]``
        at them (the distribution of each node's successor)."""
        k = min(self.k, logits.shape[-1])
        probs = torch.softmax(logits.float(), -1)
        p, ids = probs.topk(k, -1)
        t = tokens.to(torch.int64).cpu()
        self.next[t, :k] = ids.to(torch.int32).cpu()
        self.prob[t, :k] = p.to(torch.float16).cpu()

    def propose(self, root: int, max_nodes: int = 64) -> tuple[list, list, list]:
        """(tokens, parents, probs) of the tree grown from ``root``: parents index the list (-1: the root);
        probs are each node's probability given its parent as the target recorded it."""
        tokens, parents, probs = [], [], []
        frontier = [(-1, root)]
        nxt, prob = self.next, self.prob
        for w in self.widths:
            new = []
            for parent, tok in frontier:
                row, prow = nxt[tok].tolist(), prob[tok].tolist()
                for j in range(w):
                    if row[j] < 0 or len(tokens) >= max_nodes:
                        break
                    tokens.append(row[j])
                    parents.append(parent)
                    probs.append(prow[j])
                    new.append((len(tokens) - 1, row[j]))
            frontier = new
            if not frontier:
                break
        return tokens, parents, probs

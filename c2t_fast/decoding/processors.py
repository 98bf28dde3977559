"""transformers' logits processors applied along a token tree.

A processor reads the sequence so far (``input_ids``) to change the next-token scores (a repetition
penalty, banned n-grams or words, no end of text before ``min_new_tokens``, ...). In a tree, node i's
next-token scores follow *its own* sequence: the context (prompt and emitted tokens, the root last) and
then the path from the root to node i; two siblings see different histories. Verifying against each
node's processed distribution is what makes the tree lossless for the processed target, as
transformers' own assisted generation does for its single candidate. Nodes of one depth share a history
length, so each processor runs once per depth (a handful of calls per step), never per node.
"""

from __future__ import annotations

import torch


class TreeProcessor:
    """``processors``: a callable ``(input_ids [b, L] int64, scores [b, V]) -> scores`` (a transformers
    ``LogitsProcessorList``; ``hf.adapter.check_tree_processors`` says which ones are safe)."""

    def __init__(self, processors):
        self.processors = processors

    def __call__(self, context: list[int], tokens: torch.Tensor, parents: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Processed scores ``[T, V]`` (fp32) of a tree's logits ``[T, V]``: ``context`` ends with the root
        (node 0); ``tokens`` int64 ``[T]``, ``parents`` the tree's parent list."""
        T = len(parents)
        toks = tokens.tolist()
        paths: list[list[int]] = [[] for _ in range(T)]
        for i in range(1, T):  # topological order: a parent's path is known before its child's
            paths[i] = paths[parents[i]] + [toks[i]]
        by_depth: dict[int, list[int]] = {}
        for i, p in enumerate(paths):
            by_depth.setdefault(len(p), []).append(i)
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for depth, nodes in by_depth.items():
            hist = torch.tensor([context + paths[i] for i in nodes], dtype=torch.int64, device=logits.device)
            idx = torch.tensor(nodes, device=logits.device)
            out[idx] = self.processors(hist, logits[idx].float().clone()).float()
        return out

    def one(self, context: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Processed scores ``[1, V]`` of the next token after ``context`` (a prefill's or a plain step's)."""
        hist = torch.tensor([context], dtype=torch.int64, device=logits.device)
        return self.processors(hist, logits.reshape(1, -1).float().clone()).float()

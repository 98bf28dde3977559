"""The named objects of one speculative step, in the order the engine uses them (as SGLang's EAGLE worker
names ``EagleDraftInput`` / ``EagleVerifyInput`` / ``EagleVerifyOutput``):

- ``DraftBacklog``: the text the draft has not read yet (the prompt until its first step, the tokens of
  steps it sat out), fed before the draft grows a tree;
- ``Sampler``: greedy or seeded sampling, the processed distribution of a prefill or a tree;
- ``Verifier``: one target pass over a tree (or a plain step) and the acceptance -> ``Verified``.

The cost rule's part of a step is ``cost.SizedTree``; the tree itself is ``drafts.sources.StepTree``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..hf.adapter import TargetAdapter, sampling_probs
from ..hf.attention import compact_dynamic_cache
from ..kernels import ops
from .processors import TreeProcessor


@dataclass
class DraftBacklog:
    """What the draft must read before its next tree: ``prompt`` (ids ``[P]`` and the target's features
    ``[P, F]``, read lazily: a run the cost rule keeps plain never pays for it) and the (token, feature of
    its predecessor) pairs of steps that ran without the draft."""

    prompt: tuple | None = None
    tokens: list = field(default_factory=list)
    features: list = field(default_factory=list)

    def feed(self, draft, device) -> None:
        """Bring ``draft`` up to date (the cost lands on the step that needs it)."""
        if self.prompt is not None:
            draft.prefill(*self.prompt)
            self.prompt = None
        if self.tokens:
            draft.extend(torch.tensor(self.tokens, dtype=torch.int64, device=device), torch.stack(self.features))
            self.tokens, self.features = [], []

    def add(self, root: int, root_feature: torch.Tensor, verified: "Verified") -> None:
        """A step the draft sat out: its root and accepted tokens, each with its predecessor's feature."""
        self.tokens += [root] + verified.emitted[:-1]
        self.features += [root_feature] + list(verified.hidden[verified.path[:-1]])


class Sampler:
    """Greedy (``temperature == 0``) or sampling from a CPU generator seeded with ``seed`` (None: fresh
    randomness), the target's distribution processed by ``processor`` (a ``TreeProcessor``: then its list is
    the whole recipe) or by temperature / top-k / top-p. Uniforms are drawn on the CPU so that a seed gives
    the same output on every device."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seed: int | None,
                 processor: TreeProcessor | None):
        self.sample = temperature > 0
        self.temperature, self.top_k, self.top_p, self.processor = temperature, top_k, top_p, processor
        self.gen = torch.Generator()
        if seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(seed)

    def probs(self, scores: torch.Tensor) -> torch.Tensor:
        """``[n, V]`` sampling distribution of (processed) scores."""
        if self.processor is not None:
            return torch.softmax(scores, -1).view(-1, scores.shape[-1])
        return sampling_probs(scores, self.temperature, self.top_k, self.top_p)

    def first(self, context: list[int], logits: torch.Tensor) -> int:
        """The prefill's token after ``context`` from its last logits ``[V]``."""
        scores = logits if self.processor is None else self.processor.one(context, logits)[0]
        if not self.sample:
            return int(scores.argmax())
        return int(torch.multinomial(self.probs(scores)[0].cpu(), 1, generator=self.gen))


@dataclass
class Verified:
    """What one target pass decided: ``path`` (int64 node indices, root first), ``accepted`` (the path's
    tokens, root excluded), ``emitted`` (those tokens and the target's own bonus token after them, read to
    the host once), ``hidden`` (the target's features of every verified node) and ``logits`` (its processed
    scores)."""

    tree: ops.Tree
    path: torch.Tensor
    accepted: torch.Tensor
    emitted: list
    hidden: torch.Tensor
    logits: torch.Tensor

    @property
    def plain(self) -> bool:
        return self.tree.tokens.numel() == 1


class Verifier:
    """One target pass over a step's tree through the patched attention (a single root: the model's own
    causal fast path, no tree bits), logits processed per node with the node's own history, acceptance by
    ``verify_greedy`` / ``verify_sample``, and the target's cache compacted to the accepted path."""

    def __init__(self, target: TargetAdapter, feature_layers, sampler: Sampler):
        self.target, self.feature_layers, self.sampler = target, feature_layers, sampler

    def prefill(self, ids: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        return self.target.forward(ids.to(self.target.device), cache, feature_layers=self.feature_layers)

    def __call__(self, tree: ops.Tree, cache, context: list[int]) -> Verified:
        plain = tree.tokens.numel() == 1
        prefix = cache.get_seq_length()
        if plain:
            hidden, logits = self.target.forward(tree.tokens, cache, feature_layers=self.feature_layers)
        else:
            b = ops.build_tree(tree.parents, prefix)
            hidden, logits = self.target.forward(tree.tokens, cache, b.position_ids, b.ancestor_bits,
                                                 self.feature_layers)
        s, proc = self.sampler, self.sampler.processor
        if proc is not None:
            logits = proc.one(context, logits) if plain else proc(context, tree.tokens, tree.parents.tolist(), logits)
        if s.sample:
            u = torch.rand(tree.tokens.numel(), dtype=torch.float64, generator=s.gen).to(logits.device)
            verdict = ops.verify_sample(tree.tokens, tree.parents, s.probs(logits), u)
        else:
            verdict = ops.verify_greedy(tree.tokens, tree.parents, logits.max(-1).indices)
        compact_dynamic_cache(cache, prefix, verdict.path)
        accepted = tree.tokens[verdict.path[1:]]
        return Verified(tree, verdict.path, accepted, accepted.tolist() + [int(verdict.bonus)], hidden, logits)

"""Tree-drafting strategies behind one interface; all produce the same tree structure (ops.Tree), so
tau and gamma compare on equal terms.

- ``Chain(length)``: one path of the draft's top-1 tokens.
- ``ChainC2T(classifier, beta, max_length=10)``: a chain that stops when the classifier's confidence in
  the next token falls below beta (paper section 3.6 / App. F).
- ``Static(choices)``: an EAGLE-1 static tree given as rank paths, e.g. ``[(0,), (1,), (0, 0)]``.
- ``Eagle2(top_k, depth, total_tokens)``: expand the top-K by joint probability per layer for
  ``depth`` iterations after the first layer, then rerank to the top ``total_tokens`` (root included).
- ``C2T(classifier, beta, top_k, d_max, top_m, second_prune)``: the paper's Algorithm 1.

A strategy reads the draft only through a ``TreeDrafter`` (``tree.py``: the tree arrays on one device +
the draft-side feeding) and returns the tree to verify; draft-logit columns become tokens through
``TreeDrafter.token_of`` (a restricted draft vocabulary). A strategy holds only its settings: what one
step selected lives on that step's drafter.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

import torch

from ..kernels import ops
from .tree import TreeDrafter


class Strategy:
    name = "strategy"

    def build(self, d: TreeDrafter) -> ops.Tree:
        raise NotImplementedError

    @property
    def max_tree_depth(self) -> int:
        """The deepest node's depth (root 0): tree positions reach the root's position + this."""
        raise NotImplementedError


@dataclass
class Chain(Strategy):
    length: int = 5
    name = "chain"

    def __post_init__(self):
        if self.length < 0:
            raise ValueError(f"chain length must be >= 0, got {self.length}")

    @property
    def max_tree_depth(self) -> int:
        return self.length

    def build(self, d):
        logits, parent = d.root_logits, 0
        for i in range(self.length):
            lp = torch.log_softmax(logits, -1)
            col = lp.argmax()
            node = d.append(d.nodes(parent), d.token_of(col).view(1), (d.logp[parent] + lp[col]).view(1))
            if i + 1 < self.length:
                logits, parent = d.expand(node)[0], d.size - 1  # the node just appended (no host sync)
        return d.tree()


class _ClassifierStrategy(Strategy):
    def _score(self, d: TreeDrafter, logits: torch.Tensor, parent_logp: torch.Tensor, depth: int,
               k: int) -> ops.LayerScores:
        """One layer of candidates: top-M of each row, then the fused scoring op (tokens mapped back
        from draft-logit columns)."""
        if getattr(self, "_w", None) is None or self._w[0].device != logits.device:
            self._w = tuple(w.to(logits.device) for w in self.classifier.kernel_weights())
        tv, ti = torch.topk(logits, min(self.top_m, logits.shape[-1]))
        s = ops.score_children(logits, tv, ti, parent_logp, depth, k, self._w, self.beta,
                               self.classifier.config.log_p)
        return s._replace(tokens=d.token_of(s.tokens))


@dataclass
class ChainC2T(_ClassifierStrategy):
    classifier: object = None
    beta: float = 0.85
    max_length: int = 10
    top_m: int = 1000
    name = "chain_c2t"

    def __post_init__(self):
        if self.classifier is None or not 0 <= self.beta <= 1 or self.max_length < 1:
            raise ValueError("chain_c2t needs a classifier, beta in [0, 1] and max_length >= 1")

    @property
    def max_tree_depth(self) -> int:
        return self.max_length

    def build(self, d):
        logits, parent = d.root_logits, 0
        for depth in range(self.max_length):
            s = self._score(d, logits.view(1, -1), d.logp[parent].view(1), depth, 1)
            if not bool(s.keep[0, 0]):
                break
            node = d.append(d.nodes(parent), s.tokens[0], s.child_logp[0], s.entropy, s.confidence[0])
            if depth + 1 < self.max_length:
                logits, parent = d.expand(node)[0], d.size - 1  # the node just appended (no host sync)
        return d.tree()


@dataclass
class Static(Strategy):
    choices: tuple = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    name = "static"

    def __post_init__(self):
        paths = {tuple(c) for c in self.choices}
        for c in paths:
            if not c or min(c) < 0 or (len(c) > 1 and tuple(c[:-1]) not in paths):
                raise ValueError(f"static tree choice {c} is empty, negative, or lacks its parent path")
        self._paths = sorted(paths, key=lambda c: (len(c), c))

    @property
    def max_tree_depth(self) -> int:
        return max(len(c) for c in self._paths)

    def build(self, d):
        node_of = {(): 0}
        logits_of = {(): d.root_logits}
        max_len = max(len(c) for c in self._paths)
        for depth in range(1, max_len + 1):
            layer = [c for c in self._paths if len(c) == depth]
            for c in layer:
                lp = torch.log_softmax(logits_of[c[:-1]], -1)
                top = torch.topk(lp, c[-1] + 1)
                parent = node_of[c[:-1]]
                d.append(d.nodes(parent), d.token_of(top.indices[-1]).view(1),
                         (d.logp[parent] + top.values[-1]).view(1))
                node_of[c] = d.size - 1
            feed = [c for c in layer if any(len(x) == depth + 1 and x[:-1] == c for x in self._paths)]
            if feed:
                out = d.expand(d.nodes([node_of[c] for c in feed]))
                for c, row in zip(feed, out):
                    logits_of[c] = row
        return d.tree()


@dataclass
class Eagle2(Strategy):
    top_k: int = 10
    depth: int = 5  # EAGLE's depth: iterations after the first layer (d_max = depth + 1)
    total_tokens: int = 60  # EAGLE's total_token: tree size after rerank, root included
    name = "eagle2"

    def __post_init__(self):
        if self.top_k < 1 or self.depth < 0 or self.total_tokens < 1:
            raise ValueError("eagle2 needs top_k >= 1, depth >= 0, total_tokens >= 1")

    @property
    def max_tree_depth(self) -> int:
        return self.depth + 1

    def build(self, d):
        lp = torch.log_softmax(d.root_logits, -1)
        top = torch.topk(lp, min(self.top_k, lp.numel()))
        ent = d.entropy_of(d.root_logits, top.values.numel())
        frontier = d.append(d.nodes([0] * top.values.numel()), d.token_of(top.indices), top.values,
                            ent)
        for _ in range(self.depth):
            logits = d.expand(frontier)
            lp = torch.log_softmax(logits, -1)
            top = torch.topk(lp, min(self.top_k, lp.shape[-1]), dim=-1)
            joint = d.logp[frontier][:, None] + top.values  # [K, K]
            parents = frontier[:, None].expand_as(joint).reshape(-1)
            ent = d.entropy_of(logits)
            ent = ent[:, None].expand_as(joint).reshape(-1) if ent is not None else None
            new = d.append(parents, d.token_of(top.indices.reshape(-1)), joint.reshape(-1), ent)
            keep = torch.topk(joint.reshape(-1), min(self.top_k, joint.numel())).indices
            frontier = new[keep]
        return d.rerank(self.total_tokens)


@dataclass
class C2T(_ClassifierStrategy):
    classifier: object = None
    beta: float = 0.5
    top_k: int = 15
    d_max: int = 10
    top_m: int = 1000
    second_prune: bool = True
    max_nodes: int | None = None  # without the second pruning: cap at 2 * K * d_max (the tree must stay one pass)
    name = "c2t"

    def __post_init__(self):
        if self.classifier is None:
            raise ValueError("c2t needs a classifier (c2t_fast.C2TClassifier, c2t_fast.load_classifier())")
        if not 0 <= self.beta <= 1 or self.top_k < 1 or self.d_max < 1 or self.top_m < self.top_k:
            raise ValueError(f"c2t needs beta in [0, 1], top_k >= 1, d_max >= 1, top_m >= top_k; got beta={self.beta}, "
                             f"top_k={self.top_k}, d_max={self.d_max}, top_m={self.top_m}")

    @property
    def max_tree_depth(self) -> int:
        return self.d_max

    def build(self, d):
        cap = self.max_nodes or 2 * self.top_k * self.d_max
        frontier = d.nodes(0)
        logits = d.root_logits.view(1, -1)
        for depth in range(self.d_max):
            k = min(self.top_k, logits.shape[-1])
            s = self._score(d, logits, d.logp[frontier], depth, k)
            budget = cap - (d.size - 1)
            max_keep = min(self.top_k, budget) if self.second_prune else budget
            parents = frontier[:, None].expand(-1, k).reshape(-1)
            tokens, child_logp = s.tokens.reshape(-1), s.child_logp.reshape(-1)
            _, _, sel = ops.prune_tree(d.tree(), parents, tokens, child_logp, s.confidence.reshape(-1),
                                       s.keep.reshape(-1), max(0, max_keep))
            if sel.numel() == 0:
                break
            ent = s.entropy[:, None].expand(-1, k).reshape(-1)[sel]
            frontier = d.append(parents[sel], tokens[sel], child_logp[sel], ent, s.confidence.reshape(-1)[sel])
            if depth + 1 == self.d_max or d.size - 1 >= cap:
                break
            logits = d.expand(frontier)
        return d.tree()


STRATEGIES = {"chain": Chain, "chain_c2t": ChainC2T, "static": Static, "eagle2": Eagle2, "c2t": C2T}
CLASSIFIER_STRATEGIES = ("c2t", "chain_c2t")  # the strategies that need a C2T classifier


def strategy_parameters(name: str) -> dict:
    """The settings of strategy ``name`` and their defaults (the classifier excluded): the one list the
    CLI flags, the benchmark sweeps and their help texts are built from."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    return {f.name: f.default if f.default is not MISSING else f.default_factory()
            for f in fields(STRATEGIES[name]) if f.init and f.name != "classifier"}


def strategy_from_name(name: str, classifier=None, **params) -> Strategy:
    """``STRATEGIES[name](**params)``, with ``classifier`` for the classifier strategies; a parameter
    the strategy does not take is refused by name."""
    unknown = sorted(set(params) - set(strategy_parameters(name)))
    if unknown:
        raise ValueError(f"strategy {name!r} has no parameter {', '.join(unknown)}; its parameters are "
                         f"{sorted(strategy_parameters(name))}")
    if name in CLASSIFIER_STRATEGIES:
        params["classifier"] = classifier
    return STRATEGIES[name](**params)

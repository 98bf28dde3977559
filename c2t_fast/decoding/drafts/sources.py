"""Training-free sources of draft tokens, grafted into the step's tree beside the draft's own nodes:
n-gram lookup in the prompt and reply (``ngram``), a datastore of the target's own text (``datastore``),
and the target's recycled top-k candidates (``recycling``). One tree holds them all: where a source
proposes a token the tree already holds under the same parent, the nodes merge; every node keeps its
source and the source's estimate of its chance given its parent, so the cost rule (``decoding.cost``)
verifies only what pays. Verification never reads where a node came from, so a grafted tree is exactly
as lossless as any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...kernels import ops
from .datastore import Datastore
from .ngram import NgramLookup
from .recycling import RecyclingTable

HEAD, NGRAM, DATASTORE, RECYCLING = 0, 1, 2, 3
SOURCE_NAMES = ("head", "ngram", "datastore", "recycling")


@dataclass
class Proposal:
    """A small tree hung from the root: ``parents[i]`` is -1 (the root) or an earlier index; ``scores[i]``
    the source's estimate of node i given its parent (in [0, 1])."""
    source: int
    tokens: list
    parents: list
    scores: list


@dataclass
class StepTree:
    """A step's tree with, per node, its ``source`` (int64 ``[n]``, the root ``HEAD``) and ``score`` (float32
    ``[n]``: for source nodes their proposal's score; for the draft's nodes unused)."""
    tree: ops.Tree
    source: torch.Tensor
    score: torch.Tensor
    added: dict = field(default_factory=dict)  # nodes each source added

    @classmethod
    def of(cls, tree: ops.Tree) -> "StepTree":
        n = tree.tokens.numel()
        return cls(tree, torch.zeros(n, dtype=torch.int64), torch.ones(n))

    def graft(self, prop: Proposal) -> "StepTree":
        """This tree with the proposal hung from the root: a proposed node equal to an existing child of
        its parent is that node; the rest is appended in topological order."""
        if not prop.tokens:
            return self
        tree = self.tree
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()  # one host read of a small tree
        child = {(parents[i], tokens[i]): i for i in range(1, len(tokens))}
        where = []  # tree index of each proposal node
        new_tok, new_par, new_score = [], [], []
        for t, p, s in zip(prop.tokens, prop.parents, prop.scores):
            parent = 0 if p < 0 else where[p]
            node = child.get((parent, t))
            if node is None:
                node = len(tokens) + len(new_tok)
                new_tok.append(t)
                new_par.append(parent)
                new_score.append(float(s))
                child[(parent, t)] = node
            where.append(node)
        if not new_tok:
            return self
        dev = tree.tokens.device
        par = torch.tensor(new_par, dtype=torch.int32, device=dev)
        # a new node carries its attach point's joint log-probability (nothing reads it after drafting)
        old = tree.logp.tolist()
        new_lp = []
        for p in new_par:
            new_lp.append(old[p] if p < len(old) else new_lp[p - len(old)])
        logp = torch.cat([tree.logp, torch.tensor(new_lp, dtype=tree.logp.dtype, device=dev)])
        grown = ops.Tree(torch.cat([tree.tokens, torch.tensor(new_tok, dtype=tree.tokens.dtype, device=dev)]),
                         torch.cat([tree.parents, par]), logp)
        added = dict(self.added)
        added[prop.source] = added.get(prop.source, 0) + len(new_tok)
        return StepTree(grown, torch.cat([self.source, torch.full((len(new_tok),), prop.source, dtype=torch.int64)]),
                        torch.cat([self.score, torch.tensor(new_score)]), added)


class NgramSource:
    """Prompt lookup in the prompt and the reply (``NgramLookup``): one chain per step."""
    kind = NGRAM

    def __init__(self, lookup: NgramLookup):
        self.lookup = lookup
        self.depth = lookup.num_tokens

    def start(self, tokens: list) -> None:
        self.index = self.lookup.index(tokens)

    def extend(self, tokens: list) -> None:
        self.index.extend(tokens)

    def propose(self, root: int) -> Proposal:
        chain = self.index.propose()
        return Proposal(NGRAM, chain, list(range(-1, len(chain) - 1)), [1.0] * len(chain))

    def observe(self, tokens, logits) -> None:
        pass


class DatastoreSource:
    """The continuations of the context's longest suffix in a ``Datastore`` of the target's own text."""
    kind = DATASTORE

    def __init__(self, store: Datastore, depth: int = 6, max_nodes: int = 16):
        self.store, self.depth, self.max_nodes = store, depth, max_nodes

    def start(self, tokens: list) -> None:
        self.history = list(tokens)

    def extend(self, tokens: list) -> None:
        self.history += tokens

    def propose(self, root: int) -> Proposal:
        found = self.store.lookup(self.history, self.depth, self.max_nodes)
        if found is None:
            return Proposal(DATASTORE, [], [], [])
        return Proposal(DATASTORE, found.tokens, found.parents, found.share)

    def observe(self, tokens, logits) -> None:
        pass


class RecyclingSource:
    """The target's recycled top-k candidates (``RecyclingTable``), kept across generations."""
    kind = RECYCLING

    def __init__(self, table: RecyclingTable, max_nodes: int = 64):
        self.table, self.max_nodes = table, max_nodes
        self.depth = len(table.widths)

    def start(self, tokens: list) -> None:
        pass

    def extend(self, tokens: list) -> None:
        pass

    def propose(self, root: int) -> Proposal:
        toks, parents, probs = self.table.propose(root, self.max_nodes)
        return Proposal(RECYCLING, toks, parents, probs)

    def observe(self, tokens, logits) -> None:
        self.table.observe(tokens, logits)

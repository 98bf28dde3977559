"""The tree of one speculative step, on one stated device, and the draft fed with it."""

from __future__ import annotations

import torch

from ..kernels import ops


def entropy_topm(logits: torch.Tensor, m: int = 1000) -> torch.Tensor:
    """C2T's H feature of each row: -sum p log p over the row's top-``m`` probabilities (not renormalised)."""
    lp = torch.log_softmax(logits.float(), -1)
    top = torch.topk(lp, min(m, lp.shape[-1])).values
    return torch.special.entr(top.exp()).sum(-1)


class TreeDrafter:
    """The growing tree of one step and the draft fed with it. Node 0 is the root.

    Every tensor of the tree lives on one device, ``self.device``: the device of the draft's logits.
    On a GPU the tree is grown, scored, pruned and verified there (the tree ops' CUDA kernels); the
    host reads only sizes (the data-dependent outputs of prune/rerank) and the accepted tokens."""

    def __init__(self, draft, root_token: int, root_feature, keep_entropy: bool = False):
        self.draft = draft
        self.root_logits = draft.root(root_token, root_feature).float()
        dev = self.device = self.root_logits.device
        self.tokens = torch.tensor([root_token], dtype=torch.int64, device=dev)
        self.parents = torch.tensor([-1], dtype=torch.int32, device=dev)
        self.logp = torch.zeros(1, dtype=torch.float32, device=dev)
        self.depth = torch.zeros(1, dtype=torch.int64, device=dev)
        self.slot = torch.zeros(1, dtype=torch.int64, device=dev)  # draft slot of each node, -1 when not fed
        self.anc = torch.ones(1, 1, dtype=torch.bool, device=dev)  # [node, slot]: slot is the node or an ancestor
        # H of the distribution a node was drawn from: C2T's feature, kept for every strategy when an observer
        # of the step reads it (``keep_entropy``: the classifier's training data)
        self.entropy = torch.zeros(1, device=dev)
        self.keep_entropy = keep_entropy
        self.conf = torch.ones(1, device=dev)  # a node's acceptance score (C2T: the classifier's confidence)
        self.has_conf = False  # True once a strategy gave scores (else the draft's probabilities are used)
        self.vocab_ids = draft.vocab_ids_on(dev)
        self.selected: torch.Tensor | None = None  # set when the verified tree is a subset (rerank)

    def token_of(self, columns: torch.Tensor) -> torch.Tensor:
        """Token ids of draft-logit columns (the identity unless the draft's vocabulary is restricted)."""
        return columns if self.vocab_ids is None else self.vocab_ids[columns]

    def nodes(self, ids) -> torch.Tensor:
        """int64 node ids on the tree's device (from Python ints)."""
        return torch.as_tensor(ids, dtype=torch.int64, device=self.device).view(-1)

    @property
    def size(self) -> int:
        return self.tokens.numel()

    def tree(self) -> ops.Tree:
        """The whole tree grown so far."""
        return ops.Tree(self.tokens, self.parents, self.logp)

    def rerank(self, total_tokens: int) -> ops.Tree:
        """EAGLE-2's rerank of the whole tree to ``total_tokens`` nodes (``ops.rerank_tree``); the
        chosen node ids are kept in ``self.selected`` (the verified tree's node i is node
        ``selected[i]`` of this drafter)."""
        pruned, self.selected = ops.rerank_tree(self.tree(), total_tokens)
        return pruned

    def append(self, parents: torch.Tensor, tokens: torch.Tensor, logp: torch.Tensor,
               entropy: torch.Tensor | None = None, conf: torch.Tensor | None = None) -> torch.Tensor:
        """Add nodes (parents must be in the tree); returns their node ids. ``conf``: the nodes'
        path acceptance scores in [0, 1] (C2T's classifier; default: their joint probability)."""
        n, dev = tokens.numel(), self.device
        ids = torch.arange(self.size, self.size + n, device=dev)
        parents = parents.to(torch.int64)
        self.tokens = torch.cat([self.tokens, tokens.to(torch.int64)])
        self.parents = torch.cat([self.parents, parents.to(torch.int32)])
        self.logp = torch.cat([self.logp, logp.float()])
        self.depth = torch.cat([self.depth, self.depth[parents] + 1])
        self.slot = torch.cat([self.slot, torch.full((n,), -1, dtype=torch.int64, device=dev)])
        self.anc = torch.cat([self.anc, self.anc[parents]])
        self.entropy = torch.cat([self.entropy, entropy.float() if entropy is not None else torch.zeros(n, device=dev)])
        self.conf = torch.cat([self.conf, conf.float().view(-1) if conf is not None else logp.float().exp().view(-1)])
        self.has_conf |= conf is not None
        return ids

    def scores(self) -> torch.Tensor:
        """The acceptance scores of the tree the strategy returned (the reranked subset after ``rerank``)."""
        return self.conf if self.selected is None else self.conf[self.selected]

    def path_scores(self) -> torch.Tensor | None:
        """The strategy's path-level acceptance scores of the returned tree's nodes (C2T's classifier), or
        None when it gave none (the draft's probabilities are the scores then)."""
        return self.scores() if self.has_conf else None

    def entropy_of(self, logits: torch.Tensor, n: int | None = None) -> torch.Tensor | None:
        """The top-M entropy of each row of ``logits`` (repeated ``n`` times for one row), for ``append``; None
        when nothing reads it (``keep_entropy`` off): strategies that do not score by it skip the cost."""
        if not self.keep_entropy:
            return None
        ent = entropy_topm(logits)
        return ent.expand(n) if n is not None else ent

    def expand(self, nodes: torch.Tensor) -> torch.Tensor:
        """Feed ``nodes`` (one batched draft call) and return their next-token logits ``[n, V]``."""
        nodes = nodes.to(torch.int64)
        n, n_slots = nodes.numel(), self.anc.shape[1]
        parent_slots = self.slot[self.parents[nodes].to(torch.int64)]
        if bool((parent_slots < 0).any()):  # a host sync, the price of this check
            raise RuntimeError("a node was expanded before its parent")
        new_slots = torch.arange(n_slots, n_slots + n, device=self.device)
        self.anc = torch.cat([self.anc, torch.zeros(self.size, n, dtype=torch.bool, device=self.device)], 1)
        self.anc[nodes, new_slots] = True
        self.slot[nodes] = new_slots
        visible = self.anc[nodes]  # [n, n_slots + n]: ancestors' slots and its own
        return self.draft.layer_logits(self.tokens[nodes], parent_slots, visible).float()

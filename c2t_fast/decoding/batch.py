"""Lossless speculative generation for a batch: a tree per sequence, every tree verified in one target pass.

Each sequence of the batch keeps its own draft state (a shallow copy of the draft sharing its weights), its
own training-free sources and its own tree; one step drafts every unfinished sequence's tree, pads the trees
to the longest, verifies them together in one pass of the target over a static KV cache with a slot per
sequence (``hf.static_batch.StaticBatchLM.tree_pass``), accepts each sequence's own path with the batch-1
rules (``verify_greedy`` / ``verify_sample``) and commits each slot's accepted nodes (``keep``). A sequence
that finished leaves the batch: it costs nothing afterwards. Left-padded ``[B, n]`` prompts with an
attention mask (what ``tokenizer(..., padding=True)`` gives) are read row by row, padding dropped.

Trees are sized for the batch by the cost rule (``budget="auto"``, the default: ``CostRule.size_batch`` cuts
every row's tree to the common T that maximises the batch's expected tokens per second at the profile's cost
of b x T tokens; its step modes run draft, sources-only or plain steps for the whole batch), or verified as
grown (``budget=None``), capped at ``max_nodes`` per sequence either way. What batch 1 has that this does
not: transformers' logits processors along the tree, recording classifier trees, tensor-parallel targets.
"""

from __future__ import annotations

import copy
import numbers
import time
from dataclasses import dataclass, field

import torch

from ..hf.adapter import TargetAdapter, vocab_size
from ..hf.static_batch import StaticBatchLM, check_supported
from ..kernels import ops
from . import defaults
from .drafts import DraftProtocol, check_draft
from .engine import check_sampling
from .cost import CostRule, load_costs
from .drafts.sources import SOURCE_NAMES, DatastoreSource, NgramSource, RecyclingSource, StepTree
from .metrics import Metrics
from .step import DraftBacklog, Sampler, Verified
from .strategies import Strategy
from .tree import TreeDrafter


@dataclass
class BatchGeneration:
    """``tokens``: each sequence's new tokens (list per row, in the batch's order); ``metrics``: the whole
    batch's (``steps`` counts sequence-steps, so ``tau`` is per sequence and step; ``new_tokens`` all rows'),
    ``passes``: target passes (one per batched step, the prefills apart)."""
    tokens: list
    metrics: Metrics
    passes: int = 0
    rows_per_pass: list = field(default_factory=list)


class _Row:
    """One sequence's state: its draft copy, sources, history and pending root."""

    def __init__(self, slot: int, ids: list[int], draft, sources: list, backlog: DraftBacklog):
        self.slot, self.context, self.draft, self.sources, self.backlog = slot, list(ids), draft, sources, backlog
        self.out: list[int] = []
        self.root: int | None = None
        self.root_feature = None
        self.path_scores = None  # this step's draft nodes' path-level scores (C2T), when the draft grew the tree


def _row_draft(draft):
    """A copy of ``draft`` with its own per-sequence state (cache, slots) and the same weights."""
    row = copy.copy(draft)
    row.cache, row.n_stable, row.n_tree = None, 0, 0
    return row


class BatchSpeculativeGenerator:
    """``BatchSpeculativeGenerator(target, draft)``: the target's exact output for every sequence of a batch.

    target: a transformers Llama / Qwen2 / Mistral causal LM (the families ``StaticBatchLM`` runs).
    draft: any ``DraftProtocol`` or None (the training-free sources alone). strategy / ngram / datastore /
    recycling / budget: as ``SpeculativeGenerator`` (the main job's defaults unless told otherwise; the
    datastore and recycling only for the shipped target; ``budget`` "auto" sizes the batch's trees by the
    measured cost, None verifies them as grown, or a ``CostRule``). ``max_nodes``: the most tree nodes verified per sequence and step
    (the draft's nodes first, then the sources'); None: all. ``kv_dtype``: the cache's precision."""

    def __init__(self, target, draft: DraftProtocol | None, strategy: Strategy | None = None, eos_token_id=None,
                 stop_token_ids=(), ngram=defaults.DEFAULT, datastore=defaults.DEFAULT,
                 recycling=defaults.DEFAULT, budget=defaults.DEFAULT, max_nodes: int | None = 64,
                 kv_dtype: torch.dtype | None = None):
        check_supported(target)
        budget = defaults.resolve_budget(budget)
        if budget is not None and not isinstance(budget, CostRule) and budget != "auto":
            raise ValueError(f"budget must be None, 'auto' or a c2t_fast.decoding.cost.CostRule, got {budget!r}")
        if max_nodes is not None and (isinstance(max_nodes, bool) or not isinstance(max_nodes, numbers.Integral)
                                      or max_nodes < 1):
            raise ValueError(f"max_nodes must be None or an integer >= 1, got {max_nodes!r}")
        if strategy is None:
            strategy = defaults.make_strategy()
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a c2t_fast.decoding.strategies.Strategy, got {type(strategy).__name__}")
        self.ngram = defaults.resolve_ngram(ngram)
        self.datastore = defaults.resolve_datastore(datastore, target)
        self.recycling = defaults.resolve_recycling(recycling, target)
        if draft is None and self.ngram is None and self.datastore is None and self.recycling is None:
            raise ValueError("draft=None drafts with the training-free sources alone: give ngram=, datastore= or "
                             "recycling=")
        if draft is not None:
            check_draft(draft)
            draft.check_target(target)
        self.target, self.draft, self.strategy, self.max_nodes, self.kv_dtype = (target, draft, strategy, max_nodes,
                                                                                 kv_dtype)
        self.adapter = TargetAdapter(target)
        self.stop = set(self.adapter.eos_ids(eos_token_id)) | set(stop_token_ids)
        self.max_positions = self.adapter.max_positions
        self.feature_layers = tuple(draft.feature_layers) if draft is not None and draft.feature_layers else ()
        self._runner: StaticBatchLM | None = None
        self._has_sources = any(x is not None for x in (self.ngram, self.datastore, self.recycling))
        self.cost_rule = CostRule(load_costs(target)) if budget == "auto" else budget

    # -- input -------------------------------------------------------------------------------------
    def _rows(self, input_ids, attention_mask) -> list[list[int]]:
        """Each sequence's prompt ids (padding dropped) from ``[B, n]`` ids and mask, or a list of id lists."""
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
                raise ValueError(f"input_ids must be [B, n] with B, n >= 1, got shape {tuple(input_ids.shape)}")
            if input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
            if attention_mask is None:
                rows = input_ids.tolist()
            else:
                if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                    raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}")
                m = attention_mask.bool()
                if (m[:, :-1] & ~m[:, 1:]).any():
                    raise ValueError("attention_mask must be left padding (zeros before ones in every row)")
                rows = [r[k].tolist() for r, k in zip(input_ids, m)]
        elif isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(r, (list, tuple)) for r in input_ids):
            if attention_mask is not None:
                raise ValueError("attention_mask goes with a [B, n] tensor; lists of ids carry no padding")
            rows = [list(r) for r in input_ids]
        else:
            raise ValueError("input_ids must be a [B, n] tensor or a list of token-id lists")
        vocab = vocab_size(self.target)
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"input_ids row {i} is empty (all padding)")
            if not all(isinstance(t, numbers.Integral) and 0 <= t < vocab for t in r):
                raise ValueError(f"input_ids row {i} holds ids outside [0, {vocab})")
        return rows

    def _depth(self) -> int:
        """The deepest tree a step can verify (the draft's and the sources')."""
        d = self.strategy.max_tree_depth if self.draft is not None else 0
        for src in self._sources():
            d = max(d, src.depth)
        return d

    def _sources(self) -> list:
        return [s for s in (NgramSource(self.ngram) if self.ngram is not None else None,
                            DatastoreSource(self.datastore) if self.datastore is not None else None,
                            RecyclingSource(self.recycling) if self.recycling is not None else None) if s]

    def _runner_for(self, slots: int, capacity: int) -> StaticBatchLM:
        if self._runner is None:  # the fused weights once per generator; the cache grows as calls need
            self._runner = StaticBatchLM(self.target, slots, capacity, self.feature_layers, linear="torch",
                                         kv_dtype=self.kv_dtype)
        self._runner.reserve(slots, capacity)
        return self._runner

    # -- generation --------------------------------------------------------------------------------
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> BatchGeneration:
        """Every sequence's continuation, exactly the target's (greedy: its argmax; sampling: its distribution,
        per sequence, from one generator seeded with ``seed``). ``input_ids`` ``[B, n]`` (left-padded, with
        ``attention_mask``) or a list of B token-id lists."""
        prompts = self._rows(input_ids, attention_mask)
        check_sampling(max_new_tokens, temperature, top_p, top_k, seed)
        tree_max = self.max_nodes if self.max_nodes is not None else 1 << 14
        longest = max(len(p) for p in prompts)
        if self.max_positions and longest + max_new_tokens + self._depth() - 1 > self.max_positions:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} + a tree of depth up to "
                             f"{self._depth()} exceeds the target's context of {self.max_positions} positions")
        m = Metrics()
        sampler = Sampler(temperature, top_k, top_p, seed, None)
        with torch.no_grad():
            t_start = time.perf_counter()
            lm = self._runner_for(len(prompts), longest + max_new_tokens + min(tree_max, 1024) + 2)
            rows = [self._start(i, p, lm, sampler) for i, p in enumerate(prompts)]
            m.prefill_time, m.new_tokens = time.perf_counter() - t_start, len(rows)
            live = [r for r in rows if not self._finished(r, max_new_tokens)]
            passes, per_pass = 0, []
            rule = self.cost_rule
            if rule is not None:
                rule.reset()
            while live:
                t0 = time.perf_counter()
                mode = (rule.step_mode(self.draft is not None, self._has_sources)
                        if rule is not None else ("draft" if self.draft is not None else "sources"))
                trees = [self._tree(r, mode, m) for r in live]
                sized = None
                if rule is not None and mode != "plain":
                    sized = rule.size_batch(trees, [r.path_scores for r in live], time.perf_counter() - t0,
                                            backoff=mode == "draft")
                    trees = [z.step for z in sized]
                t1 = time.perf_counter()
                verdicts = self._verify(lm, live, trees, sampler)
                t2 = time.perf_counter()
                emitted = 0
                for i, (r, st, v) in enumerate(zip(live, trees, verdicts)):
                    if sized is not None:
                        rule.learn(sized[i], v.path)
                    emitted += self._commit(r, st, v, mode, lm, max_new_tokens, m)
                T = max(st.tree.tokens.numel() for st in trees)
                if rule is not None:
                    rule.settle(time.perf_counter() - t0, emitted, T == 1, len(live) * T, mode, rows=len(live))
                m.plain_steps += len(live) if T == 1 else 0
                m.draft_time += t1 - t0
                m.verify_time += t2 - t1
                passes += 1
                per_pass.append(len(live))
                live = [r for r in live if not self._finished(r, max_new_tokens)]
            m.total_time = time.perf_counter() - t_start
        return BatchGeneration([r.out for r in rows], m, passes, per_pass)

    def _start(self, slot: int, prompt: list[int], lm: StaticBatchLM, sampler: Sampler) -> _Row:
        """Prefill one sequence into its slot; its first token from the prefill."""
        ids = torch.tensor(prompt, dtype=torch.int64)
        out = lm.prefill(slot, ids)
        feats = out.features if self.feature_layers else out.hidden
        draft = _row_draft(self.draft) if self.draft is not None else None
        # the draft reads the prompt on its first drafting step (a batch the rule keeps plain never pays it)
        row = _Row(slot, prompt, draft, self._sources(),
                   DraftBacklog((ids.to(lm.device), feats) if draft is not None else None))
        root = sampler.first(row.context, out.logits[-1])
        row.context.append(root)
        row.out.append(root)
        row.root, row.root_feature = root, feats[-1]
        for src in row.sources:
            src.start(list(row.context))
        return row

    def _finished(self, row: _Row, max_new_tokens: int) -> bool:
        return len(row.out) >= max_new_tokens or row.out[-1] in self.stop

    def _tree(self, row: _Row, mode: str, m: Metrics) -> StepTree:
        """The sequence's step tree: "draft" the draft's with every source's branches grafted, "sources" theirs
        alone, "plain" the root alone."""
        dev = self.adapter.device
        row.path_scores = None
        if mode == "draft":
            row.backlog.feed(row.draft, dev)
            drafter = TreeDrafter(row.draft, row.root, row.root_feature)
            st = StepTree.of(self.strategy.build(drafter))
            row.path_scores = drafter.path_scores()
        else:
            st = StepTree.of(ops.Tree(torch.tensor([row.root], dtype=torch.int64, device=dev),
                                      torch.tensor([-1], dtype=torch.int32, device=dev), torch.zeros(1, device=dev)))
        for src in row.sources if mode != "plain" else ():
            st = st.graft(src.propose(row.root))
        if self.max_nodes is not None and st.tree.tokens.numel() > self.max_nodes:
            n = self.max_nodes  # topological order: the first n nodes are a tree
            t = st.tree
            st = StepTree(ops.Tree(t.tokens[:n], t.parents[:n], t.logp[:n]), st.source[:n], st.score[:n], st.added)
            if row.path_scores is not None:  # the draft's nodes come first
                row.path_scores = row.path_scores[:n]
        for k, n in st.added.items():
            m.source_nodes[SOURCE_NAMES[k]] = m.source_nodes.get(SOURCE_NAMES[k], 0) + n
        return st

    def _verify(self, lm: StaticBatchLM, live: list[_Row], trees: list[StepTree], sampler: Sampler) -> list:
        """One target pass over every live sequence's tree -> a ``Verified`` per sequence."""
        T = max(st.tree.tokens.numel() for st in trees)
        b = len(live)
        tokens = torch.zeros(b, T, dtype=torch.int64)
        depth = torch.zeros(b, T, dtype=torch.int64)
        visible = torch.eye(T, dtype=torch.bool).repeat(b, 1, 1)  # a padding node sees itself alone
        for i, st in enumerate(trees):
            n = st.tree.tokens.numel()
            built = ops.build_tree(st.tree.parents.cpu(), 0)
            j = torch.arange(n)
            bits = built.ancestor_bits[:, j // 64]  # [n, n]: the word holding bit j
            visible[i, :n, :n] = ((bits >> (j % 64)) & 1).bool()
            tokens[i, :n] = st.tree.tokens.cpu()
            depth[i, :n] = built.depth.to(torch.int64)
        out = lm.tree_pass([r.slot for r in live], tokens, depth, visible)
        feats = out.features if self.feature_layers else out.hidden
        verdicts = []
        for i, (r, st) in enumerate(zip(live, trees)):
            t = st.tree
            n = t.tokens.numel()
            logits = out.logits[i, :n]
            if sampler.sample:
                u = torch.rand(n, dtype=torch.float64, generator=sampler.gen).to(logits.device)
                v = ops.verify_sample(t.tokens, t.parents, sampler.probs(logits), u)
            else:
                v = ops.verify_greedy(t.tokens, t.parents, logits.max(-1).indices)
            accepted = t.tokens[v.path[1:]]
            verdicts.append(Verified(t, v.path, accepted, accepted.tolist() + [int(v.bonus)], feats[i, :n], logits))
        return verdicts

    def _commit(self, row: _Row, st: StepTree, v: Verified, mode: str, lm: StaticBatchLM, max_new_tokens: int,
                m: Metrics) -> int:
        """The accepted path into the slot's cache, the draft and the sources; the emitted tokens up to a stop
        (their number returned)."""
        lm.keep(row.slot, v.path.tolist())
        out = []
        for tok in v.emitted:
            out.append(tok)
            if tok in self.stop or len(row.out) + len(out) >= max_new_tokens:
                break
        m.steps += 1
        m.accepted.append(v.path.numel() - 1)
        m.draft_tokens.append(v.tree.tokens.numel() - 1)
        for k in st.source[v.path[1:].cpu()].tolist():
            m.source_accepted[SOURCE_NAMES[k]] = m.source_accepted.get(SOURCE_NAMES[k], 0) + 1
        m.new_tokens += len(out)
        row.out += out
        row.context += out
        for src in row.sources:
            src.observe(v.tree.tokens, v.logits)
            src.extend(out)
        if row.draft is not None:
            if mode == "draft":
                row.draft.commit(v.accepted, v.hidden[v.path[:-1]])
            else:  # the draft reads this text on its next drafting step
                row.backlog.add(row.root, row.root_feature, v)
        row.root, row.root_feature = v.emitted[-1], v.hidden[v.path[-1]]
        return len(out)

"""Lossless speculative generation (batch 1; a batch: ``decoding.batch``): draft a tree, verify it in one
target pass through the patched attention, accept with verify_greedy / verify_sample, compact the KV cache, emit.

Per step (docs/DESIGN.md, "Generation engine"): draft (the strategy grows a tree through a
``TreeDrafter``, the training-free sources graft theirs) -> size (``CostRule.size`` -> ``SizedTree``) ->
verify (``step.Verifier``: one target pass with the tree bits, acceptance, the target's cache compacted)
-> commit (the draft reads the accepted path; the rule, sources and recorder learn from ``Verified``).
Every transformers call goes through ``hf.adapter``.
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Iterator

import torch

from ..hf.adapter import TargetAdapter, check_tree_processors, encode_chat
from ..hf.attention import check_supported, is_patched, patch, unpatch
from ..kernels import ops
from . import defaults
from .agreement import Agreement, agreement_for
from .cost import CostRule, SizedTree, load_costs
from .drafts import DraftProtocol, check_draft
from .drafts.datastore import Datastore
from .drafts.recycling import RecyclingTable
from .drafts.sources import NGRAM, SOURCE_NAMES, DatastoreSource, NgramSource, RecyclingSource, StepTree
from .metrics import Generation, Metrics
from .processors import TreeProcessor
from .step import DraftBacklog, Sampler, Verified, Verifier
from .strategies import Strategy
from .tree import TreeDrafter


def _is_default(value) -> bool:
    return isinstance(value, str) and value == defaults.DEFAULT


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def check_sampling(max_new_tokens, temperature, top_p, top_k, seed) -> None:
    """ValueError naming the first bad generation argument (the engine's and the batched engine's)."""
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("top_k", top_k, 0)
    if seed is not None:
        _check_int("seed", seed, 0)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


class SpeculativeGenerator:
    """``SpeculativeGenerator(target, draft)``: the target's exact output, faster; with no other argument it
    runs the main job's settings (``decoding.defaults``: C2T with the shipped classifier, trees sized by
    measured cost, n-gram branches).

    target: a Hugging Face causal LM of a supported family (patched here for tree verification).
    draft: any ``DraftProtocol``: ``EagleDraftHead`` (attached to the target) or ``DraftLM``.
    strategy: one of ``decoding.strategies`` (None: the default C2T). ``recorder``: a step observer with
    ``on_step(drafter, path)`` (and ``wants_entropy``: the drafter then keeps every node's entropy), called
    after each drafted step's verification (``training.tree_dataset.TreeRecorder`` writes (P, H, d, accepted)
    of every node of the full tree: classifier training data; recording leaves out the default n-gram
    branches and cost rule). ``ngram``: an ``NgramLookup`` (or its token count; 0 / None:
    none) whose continuations (prompt lookup in the prompt and the generated text) join each step's tree
    as extra branches (``decoding.drafts.ngram``). ``datastore``: a ``Datastore`` (``drafts.datastore``), a
    directory, ``"shipped"`` or None; ``recycling``: a ``RecyclingTable``, True or None / False: their
    branches join the tree too (left at ``"default"``: both on for the shipped target, off for another).
    ``budget``: None verifies each tree the strategy grows as it
    is; ``"auto"`` (the default) sizes it by this machine's measured verification cost and falls back to
    plain decoding steps when no tree pays (``decoding.cost``; the profile is measured once and cached);
    or a ``CostRule``. ``agreement``: how the ranks of a tensor-parallel target take the decisions that
    depend on a rank's own clock or randomness together (``decoding.agreement``; None: a ``RankAgreement``
    over the target's tensor-parallel group when it has one, else none is needed).
    """

    def __init__(self, target, draft: DraftProtocol | None, strategy: Strategy | None = None, eos_token_id=None,
                 stop_token_ids=(), recorder=None, ngram=defaults.DEFAULT, budget=defaults.DEFAULT,
                 datastore: Datastore | str | None = defaults.DEFAULT,
                 recycling: RecyclingTable | bool | str | None = defaults.DEFAULT,
                 agreement: Agreement | None = None):
        # Everything is checked before the target is patched, so a refused construction changes nothing.
        check_supported(target)
        self.agreement = agreement_for(target, agreement)
        ngram = defaults.resolve_ngram(ngram, recording=recorder is not None)
        budget = defaults.resolve_budget(budget, recording=recorder is not None)
        user_sources = (not _is_default(datastore) and datastore is not None) or (
            not _is_default(recycling) and recycling not in (None, False))
        if user_sources and recorder is not None:
            raise ValueError("record trees without training-free sources: the classifier learns the draft's own nodes")
        datastore = defaults.resolve_datastore(datastore, target, recording=recorder is not None)
        recycling = defaults.resolve_recycling(recycling, target, recording=recorder is not None)
        sources = [s for s in (NgramSource(ngram) if ngram is not None else None,
                               DatastoreSource(datastore) if datastore is not None else None,
                               RecyclingSource(recycling) if recycling is not None else None) if s]
        if draft is None and not sources:
            raise ValueError("draft=None drafts with the training-free sources alone: give ngram=, datastore= or "
                             "recycling=")
        if draft is None and recorder is not None:
            raise ValueError("recording classifier trees needs a draft")
        if ngram is not None and recorder is not None:
            raise ValueError("record trees without n-gram branches: the classifier learns the draft's own nodes")
        if budget is not None and not isinstance(budget, CostRule) and budget != "auto":
            raise ValueError(f"budget must be None, 'auto' or a c2t_fast.decoding.cost.CostRule, got {budget!r}")
        if budget is not None and recorder is not None:
            raise ValueError("record trees without a budget: the classifier learns from the strategy's whole trees")
        if strategy is None:
            strategy = defaults.make_strategy()
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a c2t_fast.decoding.strategies.Strategy, got {type(strategy).__name__}")
        if recorder is not None and not callable(getattr(recorder, "on_step", None)):
            raise TypeError(f"recorder must have on_step(drafter, path) (training.tree_dataset.TreeRecorder), got "
                            f"{type(recorder).__name__}")
        if draft is not None:
            check_draft(draft)
            draft.check_target(target)
        self.target, self.draft, self.strategy, self.recorder, self.ngram = target, draft, strategy, recorder, ngram
        self.sources = sources
        self.adapter = TargetAdapter(target)
        self.stop = set(self.adapter.eos_ids(eos_token_id)) | set(stop_token_ids)
        self.max_positions = self.adapter.max_positions
        was_patched = is_patched(target)
        patch(target)
        try:
            self.cost_rule = CostRule(self.agreement.costs(target, load_costs)) if budget == "auto" else budget
        except BaseException:
            if not was_patched:
                unpatch(target)  # a failed construction changes nothing
            raise

    def _encode(self, prompt, tokenizer):
        if isinstance(prompt, torch.Tensor):
            ids = prompt.view(-1)
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            if tokenizer is None:
                raise ValueError("chat messages need a tokenizer")
            ids = encode_chat(tokenizer, prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = torch.tensor(prompt, dtype=torch.int64)
        else:
            raise ValueError(f"prompt must be token ids or chat messages, got {type(prompt).__name__}")
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError("prompt must be one non-empty sequence (batch size 1)")
        return ids

    def stream(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, tokenizer=None, metrics: Metrics | None = None,
               logits_processor=None) -> Iterator[list[int]]:
        """Yields the tokens each step emits (the first yield is the prefill's token).

        Sampling (``temperature > 0``) draws from a generator seeded with ``seed``: the same seed gives
        the same output; ``seed=None`` draws fresh randomness on every call.

        ``logits_processor``: transformers' processors (``c2t_fast.logits_processors(model, ...)`` builds
        them from generation settings: repetition penalty, no-repeat n-grams, min_new_tokens, bad words,
        min-p, typical-p, ...), applied to every tree node's scores with that node's own history
        (``decoding.processors``). The list is then the whole sampling recipe: its temperature / top-k /
        top-p warpers replace the arguments, and ``temperature > 0`` only says "sample"."""
        agree = self.agreement
        try:
            ids, proc = self._check_request(prompt, max_new_tokens, temperature, top_p, top_k, seed, tokenizer,
                                            logits_processor)
        except BaseException as err:
            agree.fail(err)  # the other ranks raise too instead of waiting in the prefill's collectives
            raise
        if agree.world > 1:
            agree.check_same("generation", self._fingerprint(ids, max_new_tokens, temperature, top_p, top_k, seed,
                                                             logits_processor))
        seed = agree.seed(seed)
        m = metrics if metrics is not None else Metrics()
        sampler = Sampler(temperature, top_k, top_p, seed, proc)
        verify = Verifier(self.adapter, self.draft.feature_layers if self.draft is not None else None, sampler)
        with torch.no_grad():
            t_start = time.perf_counter()
            cache = self.adapter.new_cache()
            hidden, logits = verify.prefill(ids, cache)
            context = ids.tolist()  # the processors' history: prompt and every emitted token
            root = sampler.first(context, logits[-1])
            context.append(root)
            backlog = DraftBacklog((ids.to(self.adapter.device), hidden) if self.draft is not None else None)
            root_feature = hidden[-1]
            m.prefill_time, m.new_tokens = time.perf_counter() - t_start, 1
            for src in self.sources:
                src.start(list(context))
            yield [root]
            if root in self.stop or max_new_tokens == 1:
                m.total_time = time.perf_counter() - t_start
                return
            if self.cost_rule is not None:
                self.cost_rule.reset()
            # The tree lives on the target's device (checked equal to the draft's at construction) and every
            # tree op runs there; the host reads sizes (prune/rerank outputs, the verdict), the accepted
            # tokens and the bonus.
            while True:
                t0 = time.perf_counter()
                try:
                    mode = self._step_mode()
                    drafter, st = self._draft(mode, root, root_feature, backlog, m)
                except BaseException as err:
                    agree.fail(err)
                    raise
                draft_s = agree.share([time.perf_counter() - t0])[0]  # rank 0's clock sizes every rank's tree
                sized = (self.cost_rule.size(st, drafter.path_scores() if drafter is not None else None, draft_s,
                                             backoff=mode == "draft")
                         if st is not None and self.cost_rule is not None else None)
                if sized is not None:
                    st = sized.step
                t1 = time.perf_counter()
                v = verify(st.tree if st is not None else self._root_only(root), cache, context)
                t2 = time.perf_counter()
                try:
                    self._observe(v, st, sized, drafter, m)
                    out = self._emit(v, max_new_tokens, m)
                except BaseException as err:
                    agree.fail(err)
                    raise
                step_s = agree.share([time.perf_counter() - t0])[0]
                context += out
                m.draft_time += t1 - t0
                m.verify_time += t2 - t1
                if self.cost_rule is not None:
                    self.cost_rule.settle(step_s, len(v.emitted), v.plain, v.tree.tokens.numel(), mode)
                done = len(out) < len(v.emitted) or out[-1] in self.stop or m.new_tokens >= max_new_tokens
                for src in self.sources:
                    src.extend(out)
                if not done:
                    if self.draft is not None and mode != "draft":  # the draft reads this text later
                        backlog.add(root, root_feature, v)
                    elif self.draft is not None:
                        self.draft.commit(v.accepted, v.hidden[v.path[:-1]])
                    root, root_feature = v.emitted[-1], v.hidden[v.path[-1]]
                m.total_time = time.perf_counter() - t_start
                yield out
                if done:
                    return

    def _check_request(self, prompt, max_new_tokens, temperature, top_p, top_k, seed, tokenizer, logits_processor):
        """(prompt ids ``[n]``, the ``TreeProcessor`` or None); raises on bad input before anything runs."""
        if isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and prompt.shape[0] != 1:
            raise ValueError(f"batch size {prompt.shape[0]} > 1: SpeculativeGenerator decodes one sequence; a batch "
                             "goes through c2t_fast.decoding.batch.BatchSpeculativeGenerator (a tree per sequence)")
        check_sampling(max_new_tokens, temperature, top_p, top_k, seed)
        ids = self._encode(prompt, tokenizer)
        proc = None
        if logits_processor is not None:
            check_tree_processors(logits_processor)
            if top_k or top_p < 1.0:
                raise ValueError("with logits_processor, give top_k / top_p through the processor list "
                                 "(c2t_fast.logits_processors), not as arguments")
            proc = TreeProcessor(logits_processor)
        D = max([self.strategy.max_tree_depth if self.draft is not None else 0] + [s.depth for s in self.sources])
        # the last step's root sits at position prompt + max_new_tokens - 2 and its tree reaches D deeper
        if self.max_positions and ids.numel() + max_new_tokens + D - 1 > self.max_positions:
            raise ValueError(f"prompt of {ids.numel()} tokens + max_new_tokens {max_new_tokens} + a tree of depth up "
                             f"to {D} exceeds the target's context of {self.max_positions} positions")
        return ids, proc

    def _fingerprint(self, ids, max_new_tokens, temperature, top_p, top_k, seed, logits_processor) -> dict:
        """What every rank of a tensor-parallel target must run alike (compared across ranks at the start)."""
        simple = {k: v for k, v in vars(self.strategy).items() if isinstance(v, (int, float, str))}
        return {"prompt": ids.tolist(), "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "top_k": top_k, "seed": seed, "strategy": [type(self.strategy).__name__, simple],
                "draft": type(self.draft).__name__, "sources": [type(x).__name__ for x in self.sources],
                "budget": self.cost_rule is not None, "processors": [type(x).__name__ for x in logits_processor or ()]}

    def _step_mode(self) -> str:
        """"draft" (the draft grows a tree, the sources join it), "sources" (their tree alone) or "plain"."""
        if self.cost_rule is not None:
            return self.cost_rule.step_mode(self.draft is not None, bool(self.sources))
        return "draft" if self.draft is not None else "sources"

    def _root_only(self, root: int) -> ops.Tree:
        dev = self.adapter.device
        return ops.Tree(torch.tensor([root], dtype=torch.int64, device=dev),
                        torch.tensor([-1], dtype=torch.int32, device=dev), torch.zeros(1, device=dev))

    def _draft(self, mode: str, root: int, root_feature, backlog: DraftBacklog, m: Metrics):
        """(the drafter or None, the step's tree with every source's branches; None, None for a plain step)."""
        if mode == "plain":
            return None, None
        drafter = None
        if mode == "draft":
            backlog.feed(self.draft, self.adapter.device)
            drafter = TreeDrafter(self.draft, root, root_feature,
                                  keep_entropy=bool(getattr(self.recorder, "wants_entropy", False)))
            st = StepTree.of(self.strategy.build(drafter))
        else:
            st = StepTree.of(self._root_only(root))
        for src in self.sources:
            st = st.graft(src.propose(root))
        for k, n in st.added.items():
            m.source_nodes[SOURCE_NAMES[k]] = m.source_nodes.get(SOURCE_NAMES[k], 0) + n
        m.ngram_nodes += st.added.get(NGRAM, 0)
        return drafter, st

    def _observe(self, v: Verified, st: StepTree | None, sized: SizedTree | None, drafter, m: Metrics) -> None:
        """Everything that learns from a verdict: the sources, the cost rule, the recorder, the metrics."""
        for src in self.sources:
            src.observe(v.tree.tokens, v.logits)
        if st is not None:
            for k in st.source[v.path[1:].cpu()].tolist():
                m.source_accepted[SOURCE_NAMES[k]] = m.source_accepted.get(SOURCE_NAMES[k], 0) + 1
        if sized is not None:
            self.cost_rule.learn(sized, v.path)
        if self.recorder is not None and drafter is not None:
            self.recorder.on_step(drafter, v.path)
        m.steps += 1
        m.plain_steps += v.plain
        m.accepted.append(v.path.numel() - 1)
        m.draft_tokens.append(v.tree.tokens.numel() - 1)

    def _emit(self, v: Verified, max_new_tokens: int, m: Metrics) -> list[int]:
        """The step's tokens, up to a stop token or the budget."""
        out = []
        for tok in v.emitted:
            out.append(tok)
            if tok in self.stop or m.new_tokens + len(out) >= max_new_tokens:
                break
        m.new_tokens += len(out)
        return out

    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, tokenizer=None, baseline: bool = False,
                 logits_processor=None) -> Generation:
        """Generate up to ``max_new_tokens`` (arguments as ``stream``); with ``baseline`` also time the
        target's own greedy ``generate`` on the same prompt in this process for the speed-up."""
        m = Metrics()
        tokens = [t for chunk in self.stream(prompt, max_new_tokens, temperature, top_p, top_k, seed, tokenizer, m,
                                             logits_processor) for t in chunk]
        if baseline:
            m.baseline_time = self.time_autoregressive(prompt, len(tokens), tokenizer)
        return Generation(tokens, m)

    def time_autoregressive(self, prompt, n_tokens: int, tokenizer=None) -> float:
        """Seconds the target's own greedy ``generate()`` takes for exactly ``n_tokens`` new tokens."""
        ids = self._encode(prompt, tokenizer)
        t = time.perf_counter()
        self.adapter.generate(ids, n_tokens, exact_length=True)
        return time.perf_counter() - t

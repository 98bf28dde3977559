"""Lossless speculative generation (batch 1): draft a tree, verify it in one target pass through the
patched attention, accept with verify_greedy / verify_sample, compact the KV cache, emit.

Per step (docs/DESIGN.md, "Generation engine"): strategy.build(TreeDrafter) -> build_tree -> one target
pass over the tree (TargetAdapter.forward with the tree bits) -> verify -> compact_kv on the target cache
(the draft re-feeds the accepted path) -> accepted + bonus. Every transformers call goes through
``hf.adapter``.
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Iterator

import torch

from ..hf.adapter import TargetAdapter, check_tree_processors, encode_chat, sampling_probs
from ..hf.attention import check_supported, compact_dynamic_cache, is_patched, patch, unpatch
from ..kernels import ops
from . import defaults
from .cost import CostRule, load_costs
from .drafts import DraftProtocol
from .metrics import Generation, Metrics
from .drafts.datastore import Datastore
from .drafts.recycling import RecyclingTable
from .drafts.sources import NGRAM, SOURCE_NAMES, DatastoreSource, NgramSource, RecyclingSource, StepTree
from .processors import TreeProcessor
from .strategies import Strategy
from .tree import TreeDrafter


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


class SpeculativeGenerator:
    """``SpeculativeGenerator(target, draft)``: the target's exact output, faster; with no other argument it
    runs the main job's settings (``decoding.defaults``: C2T with the shipped classifier, trees sized by
    measured cost, n-gram branches).

    target: a Hugging Face causal LM of a supported family (patched here for tree verification).
    draft: any ``DraftProtocol``: ``EagleDraftHead`` (attached to the target) or ``DraftLM``.
    strategy: one of ``decoding.strategies`` (None: the default C2T). ``recorder``: an object with
    ``add_tree(P, H, d, label)`` (``training.tree_dataset.TreeRecorder``) that receives (P, H, d, accepted)
    for every drafted node of every step's full tree (classifier training data; recording leaves out the
    default n-gram branches and cost rule). ``ngram``: an ``NgramLookup`` (or its token count; 0 / None:
    none) whose continuations (prompt lookup in the prompt and the generated text) join each step's tree
    as extra branches (``decoding.ngram``). ``budget``: None verifies each tree the strategy grows as it
    is; ``"auto"`` (the default) sizes it by this machine's measured verification cost and falls back to
    plain decoding steps when no tree pays (``decoding.cost``; the profile is measured once and cached);
    or a ``CostRule``.
    """

    def __init__(self, target, draft: DraftProtocol | None, strategy: Strategy | None = None, eos_token_id=None,
                 stop_token_ids=(), recorder=None, ngram=defaults.DEFAULT, budget=defaults.DEFAULT,
                 datastore: Datastore | None = None, recycling: RecyclingTable | bool | None = None):
        # Everything is checked before the target is patched, so a refused construction changes nothing.
        check_supported(target)
        ngram = defaults.resolve_ngram(ngram, recording=recorder is not None)
        budget = defaults.resolve_budget(budget, recording=recorder is not None)
        if datastore is not None and not isinstance(datastore, Datastore):
            raise TypeError(f"datastore must be a c2t_fast.decoding.drafts.datastore.Datastore or None, got "
                            f"{type(datastore).__name__}")
        if recycling is True:
            from ..hf.adapter import vocab_size

            recycling = RecyclingTable(vocab_size(target))
        if recycling not in (None, False) and not isinstance(recycling, RecyclingTable):
            raise TypeError(f"recycling must be a RecyclingTable, True or None, got {type(recycling).__name__}")
        sources = [s for s in (NgramSource(ngram) if ngram is not None else None,
                               DatastoreSource(datastore) if datastore is not None else None,
                               RecyclingSource(recycling) if recycling not in (None, False) else None) if s]
        if (datastore is not None or recycling) and recorder is not None:
            raise ValueError("record trees without training-free sources: the classifier learns the draft's own nodes")
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
        if draft is not None and not isinstance(draft, DraftProtocol):
            missing = [m for m in ("check_target", "vocab_ids_on", "prefill", "root", "layer_logits", "commit", "extend")
                       if not callable(getattr(draft, m, None))]
            raise TypeError(f"draft must implement c2t_fast.decoding.drafts.DraftProtocol; {type(draft).__name__} "
                            f"lacks {', '.join(missing) or 'vocab_ids'}")
        if draft is not None:
            draft.check_target(target)
        self.target, self.draft, self.strategy, self.recorder, self.ngram = target, draft, strategy, recorder, ngram
        self.sources = sources
        self.adapter = TargetAdapter(target)
        self.stop = set(self.adapter.eos_ids(eos_token_id)) | set(stop_token_ids)
        self.max_positions = self.adapter.max_positions
        was_patched = is_patched(target)
        patch(target)
        try:
            self.cost_rule = CostRule(load_costs(target)) if budget == "auto" else budget
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
        if isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and prompt.shape[0] != 1:
            raise ValueError(f"batch size {prompt.shape[0]} > 1 is not supported: one tree per step (use batch 1)")
        _check_int("max_new_tokens", max_new_tokens, 1)
        _check_int("top_k", top_k, 0)
        if seed is not None:
            _check_int("seed", seed, 0)
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
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
        m = metrics if metrics is not None else Metrics()
        sample = temperature > 0
        gen = torch.Generator()
        if seed is None:
            gen.seed()  # no seed: fresh randomness on every call
        else:
            gen.manual_seed(seed)
        target, device = self.adapter, self.adapter.device

        with torch.no_grad():
            t_start = time.perf_counter()
            cache = target.new_cache()
            features = getattr(self.draft, "feature_layers", None)  # EAGLE-3: fused target layers
            hidden, logits = target.forward(ids.to(device), cache, feature_layers=features)
            context = ids.tolist()  # the processors' history: prompt and every emitted token
            first = logits[-1] if proc is None else proc.one(context, logits[-1])[0]
            if sample:
                probs0 = sampling_probs(first, temperature, top_k, top_p) if proc is None else torch.softmax(first, -1)[None]
                root = int(torch.multinomial(probs0[0].cpu(), 1, generator=gen))
            else:
                root = int(first.argmax())
            context.append(root)
            # The draft reads the prompt at the first speculative step, not here: under the cost rule a run
            # that never speculates never pays for it, and when it does the cost lands on that step's
            # account (the rule's probes pay for themselves).
            draft_prompt = (ids.to(device), hidden) if self.draft is not None else None
            root_feature = hidden[-1]
            m.prefill_time = time.perf_counter() - t_start
            m.new_tokens = 1
            for src in self.sources:
                src.start(ids.tolist() + [root])
            yield [root]
            if root in self.stop or max_new_tokens == 1:
                m.total_time = time.perf_counter() - t_start
                return
            # The tree lives on the target's device (TreeDrafter takes the draft's, checked equal at
            # construction) and every tree op runs there. Host syncs per step: the sizes of prune_tree /
            # rerank_tree outputs (C2T, EAGLE-2), the verdict (its kernels size the path on the host),
            # the accepted tokens and bonus (.tolist()), and compact_kv's bounds check of the path.
            # Uniforms are drawn on the CPU so a seed gives the same output on every device.
            rule = self.cost_rule
            if rule is not None:
                rule.reset()
            pending_tokens, pending_features = [], []  # context the draft has not seen (plain steps)
            while True:
                t0 = time.perf_counter()
                has_draft = self.draft is not None
                if rule is not None:
                    mode = rule.step_mode(has_draft, bool(self.sources))
                else:
                    mode = "draft" if has_draft else "sources"
                root_only = ops.Tree(torch.tensor([root], dtype=torch.int64, device=device),
                                     torch.tensor([-1], dtype=torch.int32, device=device), torch.zeros(1, device=device))
                d, st = None, None
                if mode == "plain":  # a plain decoding step: the root alone, no draft call
                    tree = root_only
                    sized = None
                else:
                    if mode == "draft":
                        if draft_prompt is not None:
                            self.draft.prefill(*draft_prompt)
                            draft_prompt = None
                        if pending_tokens:
                            self.draft.extend(torch.tensor(pending_tokens, dtype=torch.int64, device=device),
                                              torch.stack(pending_features))
                            pending_tokens, pending_features = [], []
                        d = TreeDrafter(self.draft, root, root_feature, record_features=self.recorder is not None)
                        st = StepTree.of(self.strategy.build(d))
                    else:
                        st = StepTree.of(root_only)
                    for src in self.sources:
                        st = st.graft(src.propose(root))
                    for k, v in st.added.items():
                        m.source_nodes[SOURCE_NAMES[k]] = m.source_nodes.get(SOURCE_NAMES[k], 0) + v
                    m.ngram_nodes += st.added.get(NGRAM, 0)
                    sized = (self._size_tree(d, st, time.perf_counter() - t0, backoff=mode == "draft")
                             if rule is not None else None)
                    if sized is not None:
                        st = sized[0]
                    tree = st.tree
                plain = tree.tokens.numel() == 1  # nothing (left) to verify: the model's causal fast path
                t1 = time.perf_counter()
                prefix = cache.get_seq_length()
                if plain:  # one token appended causally: the model's own fast path, no tree bits
                    hid, logits = target.forward(tree.tokens, cache, feature_layers=features)
                else:
                    b = ops.build_tree(tree.parents, prefix)
                    hid, logits = target.forward(tree.tokens, cache, b.position_ids, b.ancestor_bits, features)
                if proc is not None:  # every node's scores processed with its own history
                    logits = proc.one(context, logits) if plain else proc(context, tree.tokens, tree.parents.tolist(),
                                                                           logits)
                if sample:
                    probs = sampling_probs(logits, temperature, top_k, top_p) if proc is None else torch.softmax(logits, -1)
                    u = torch.rand(tree.tokens.numel(), dtype=torch.float64, generator=gen).to(device)
                    verdict = ops.verify_sample(tree.tokens, tree.parents, probs, u)
                else:
                    verdict = ops.verify_greedy(tree.tokens, tree.parents, logits.argmax(-1))
                path = verdict.path
                compact_dynamic_cache(cache, prefix, path)
                for src in self.sources:
                    src.observe(tree.tokens, logits)
                if st is not None:
                    for k in st.source[path[1:].cpu()].tolist():
                        m.source_accepted[SOURCE_NAMES[k]] = m.source_accepted.get(SOURCE_NAMES[k], 0) + 1
                t2 = time.perf_counter()
                accepted = tree.tokens[path[1:]]
                emitted = accepted.tolist() + [int(verdict.bonus)]
                if self.recorder is not None:
                    self._record(d, path)
                if sized is not None:  # calibrate the acceptance estimates on what was verified
                    label = torch.zeros(tree.tokens.numel(), dtype=torch.bool)
                    label[path.cpu()] = True
                    rule.learn(*sized[1], label)
                m.steps += 1
                m.plain_steps += plain
                m.accepted.append(path.numel() - 1)
                m.draft_tokens.append(tree.tokens.numel() - 1)
                m.draft_time += t1 - t0
                m.verify_time += t2 - t1
                out = []
                for tok in emitted:
                    out.append(tok)
                    if tok in self.stop or m.new_tokens + len(out) >= max_new_tokens:
                        break
                m.new_tokens += len(out)
                context += out
                if rule is not None:
                    rule.settle(time.perf_counter() - t0, len(emitted), plain, tree.tokens.numel())
                done = len(out) < len(emitted) or out[-1] in self.stop or m.new_tokens >= max_new_tokens
                for src in self.sources:
                    src.extend(out)
                if not done:
                    if has_draft and mode != "draft":  # the draft reads this text (token, predecessor's feature) later
                        pending_tokens += [root] + accepted.tolist()
                        pending_features += [root_feature] + list(hid[path[:-1]])
                    elif has_draft:
                        self.draft.commit(accepted, hid[path[:-1]])
                    root, root_feature = emitted[-1], hid[path[-1]]
                m.total_time = time.perf_counter() - t_start
                yield out
                if done:
                    return

    def _size_tree(self, d: TreeDrafter | None, st: StepTree, draft_s: float, backoff: bool = True):
        """The cost rule's cut of this step's tree: (the step tree to verify, then for its nodes what the
        rule learns from: draft scores, path scores or not, parents, sources, source scores, depths).
        ``backoff``: a draft step's promised rate decides the draft's next steps (``CostRule.after_step``)."""
        rule = self.cost_rule
        tree = st.tree
        n = tree.tokens.numel()
        parents = tree.parents.tolist()
        dl = [0] * n
        for i in range(1, n):  # topological order: a parent comes before its children
            dl[i] = dl[parents[i]] + 1
        depth = torch.tensor(dl, dtype=torch.int64)
        path_scores = d is not None and d.has_conf
        n_head = d.scores().numel() if path_scores else 0
        if path_scores:  # C2T: the classifier's path-level confidence (the draft's nodes come first)
            scores = torch.cat([d.scores().float().cpu(), torch.zeros(n - n_head)])
        else:  # the draft's probability of each node given its parent
            logp = tree.logp.float().cpu()
            scores = (logp - logp[torch.tensor([max(q, 0) for q in parents])]).exp()
            scores[0] = 1.0
        p = rule.estimate(scores, path_scores, parents, st.source, st.score, depth)
        keep, rate = rule.choose(p[1:], draft_s)
        if backoff:
            rule.after_step(rate)
        if keep < n - 1:
            scored = ops.Tree(tree.tokens, tree.parents, p.clamp(min=1e-30).log().to(tree.logp.device))
            sub, sel = ops.rerank_tree(scored, keep + 1)
            sel = sel.cpu()
            st = StepTree(ops.Tree(sub.tokens, sub.parents, tree.logp[sel.to(tree.logp.device)]), st.source[sel],
                          st.score[sel], st.added)
            scores, depth = scores[sel], depth[sel]
            parents = st.tree.parents.tolist()
        return st, (scores, path_scores, parents, st.source, st.score, depth)

    def _record(self, d: TreeDrafter, path: torch.Tensor) -> None:
        """(P, H, d, accepted) of every drafted node of this step's full tree (before any rerank)."""
        label = torch.zeros(d.size, dtype=torch.uint8)
        on_path = path if d.selected is None else d.selected[path]  # map reranked ids back to the full tree
        label[on_path.cpu()] = 1
        self.recorder.add_tree(d.logp[1:].exp().cpu(), d.entropy[1:].cpu(), d.depth[1:].cpu() - 1, label[1:])

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

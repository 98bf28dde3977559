"""Lossless speculative generation (batch 1): draft a tree, verify it in one target pass through the
patched attention, accept with verify_greedy / verify_sample, compact the KV cache, emit.

Per step (DESIGN.md): strategy.build(draft) -> build_tree -> target(tree, position_ids, tree bits) ->
verify -> compact_kv on the target cache (the draft re-feeds the accepted path) -> accepted + bonus.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import ops
from .attention import check_supported, compact_dynamic_cache, patch
from .drafts import Draft, cache_kwarg
from .strategies import Strategy, TreeDrafter


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


@dataclass
class Metrics:
    """tau: accepted draft tokens per step (bonus excluded); gamma: draft tokens verified (root excluded)."""

    steps: int = 0
    accepted: list = field(default_factory=list)
    draft_tokens: list = field(default_factory=list)
    new_tokens: int = 0
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    total_time: float = 0.0
    baseline_time: float | None = None  # plain autoregressive decoding of the same tokens

    @property
    def tau(self) -> float:
        return sum(self.accepted) / max(1, self.steps)

    @property
    def gamma(self) -> int:
        return sum(self.draft_tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_time if self.total_time else 0.0

    @property
    def speedup(self) -> float | None:
        return self.baseline_time / self.total_time if self.baseline_time and self.total_time else None

    def summary(self) -> dict:
        return {"steps": self.steps, "tau": round(self.tau, 4), "gamma": self.gamma,
                "gamma_per_step": round(self.gamma / max(1, self.steps), 2), "new_tokens": self.new_tokens,
                "draft_time_s": round(self.draft_time, 4), "verify_time_s": round(self.verify_time, 4),
                "total_time_s": round(self.total_time, 4), "tokens_per_s": round(self.tokens_per_s, 2),
                "baseline_time_s": None if self.baseline_time is None else round(self.baseline_time, 4),
                "speedup": None if self.speedup is None else round(self.speedup, 3)}


@dataclass
class Generation:
    tokens: list[int]
    metrics: Metrics


class SpeculativeGenerator:
    """``SpeculativeGenerator(target, draft, strategy)``: the target's exact output, faster.

    target: a Hugging Face causal LM of a supported family (patched here for tree verification).
    draft: ``drafts.EagleDraftHead`` (attached to the target) or ``drafts.DraftLM``.
    strategy: one of ``strategies``. ``recorder``: a ``classifier.TreeRecorder`` that receives
    (P, H, d, accepted) for every drafted node of every step (classifier training data).
    """

    def __init__(self, target, draft: Draft, strategy: Strategy, eos_token_id=None, stop_token_ids=(),
                 recorder=None):
        # Everything is checked before the target is patched, so a refused construction changes nothing.
        check_supported(target)
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a c2t_fast.strategies.Strategy, got {type(strategy).__name__}")
        draft.check_target(target)
        self.target, self.draft, self.strategy, self.recorder = target, draft, strategy, recorder
        self.base = target.get_decoder() if hasattr(target, "get_decoder") else target.model
        self.lm_head = target.get_output_embeddings()
        eos = eos_token_id if eos_token_id is not None else getattr(target.generation_config, "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.stop = set(eos) | set(stop_token_ids)
        self._cache_kw = cache_kwarg(self.base.forward)
        self.max_positions = getattr(target.config, "max_position_embeddings", None)
        patch(target)

    # -- target passes ---------------------------------------------------------------------------------

    def _target(self, ids, cache, position_ids=None, bits=None):
        kw = {self._cache_kw: cache}
        if bits is not None:
            kw["c2t_tree_bits"] = bits
        out = self.base(input_ids=ids, position_ids=position_ids, use_cache=True, **kw)
        h = out.last_hidden_state[0]
        return h, self.lm_head(h).float()

    @staticmethod
    def _probs(logits, temperature, top_k, top_p):
        """The target's sampling distribution, processed as transformers does (temperature, top-k, top-p)."""
        from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                            TopKLogitsWarper, TopPLogitsWarper)

        procs = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_k:
            procs.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
        rows = logits.view(-1, logits.shape[-1])
        return torch.softmax(procs(None, rows.clone()), -1)

    def _encode(self, prompt, tokenizer):
        if isinstance(prompt, torch.Tensor):
            ids = prompt.view(-1)
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            if tokenizer is None:
                raise ValueError("chat messages need a tokenizer")
            enc = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            ids = enc["input_ids"].view(-1)
        elif isinstance(prompt, (list, tuple)):
            ids = torch.tensor(prompt, dtype=torch.int64)
        else:
            raise ValueError(f"prompt must be token ids or chat messages, got {type(prompt).__name__}")
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError("prompt must be one non-empty sequence (batch size 1)")
        return ids

    def stream(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, tokenizer=None, metrics: Metrics | None = None
               ) -> Iterator[list[int]]:
        """Yields the tokens each step emits (the first yield is the prefill's token).

        Sampling (``temperature > 0``) draws from a generator seeded with ``seed``: the same seed gives
        the same output; ``seed=None`` draws fresh randomness on every call."""
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
        D = self.strategy.max_tree_depth
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
        device = self.lm_head.weight.device
        from transformers import DynamicCache

        with torch.no_grad():
            t_start = time.perf_counter()
            cache = DynamicCache()
            hidden, logits = self._target(ids[None].to(device), cache)
            if sample:
                root = int(torch.multinomial(self._probs(logits[-1], temperature, top_k, top_p)[0].cpu(), 1,
                                             generator=gen))
            else:
                root = int(logits[-1].argmax())
            self.draft.prefill(ids.to(device), hidden)
            root_feature = hidden[-1]
            m.prefill_time = time.perf_counter() - t_start
            m.new_tokens = 1
            yield [root]
            if root in self.stop or max_new_tokens == 1:
                m.total_time = time.perf_counter() - t_start
                return
            # The tree lives on the target's device (TreeDrafter takes the draft's, checked equal at
            # construction) and every tree op runs there. Host syncs per step: the sizes of prune_tree /
            # rerank_tree outputs (C2T, EAGLE-2), the verdict (its kernels size the path on the host),
            # the accepted tokens and bonus (.tolist()), and compact_kv's bounds check of the path.
            # Uniforms are drawn on the CPU so a seed gives the same output on every device.
            while True:
                t0 = time.perf_counter()
                d = TreeDrafter(self.draft, root, root_feature, record_features=self.recorder is not None)
                tree = self.strategy.build(d)
                t1 = time.perf_counter()
                prefix = cache.get_seq_length()
                b = ops.build_tree(tree.parents, prefix)
                hid, logits = self._target(tree.tokens[None], cache, b.position_ids[None], b.ancestor_bits)
                if sample:
                    probs = self._probs(logits, temperature, top_k, top_p)
                    u = torch.rand(tree.tokens.numel(), dtype=torch.float64, generator=gen).to(device)
                    verdict = ops.verify_sample(tree.tokens, tree.parents, probs, u)
                else:
                    verdict = ops.verify_greedy(tree.tokens, tree.parents, logits.argmax(-1))
                path = verdict.path
                compact_dynamic_cache(cache, prefix, path)
                t2 = time.perf_counter()
                accepted = tree.tokens[path[1:]]
                emitted = accepted.tolist() + [int(verdict.bonus)]
                if self.recorder is not None:
                    self._record(d, path)
                m.steps += 1
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
                done = len(out) < len(emitted) or out[-1] in self.stop or m.new_tokens >= max_new_tokens
                if not done:
                    self.draft.commit(accepted, hid[path[:-1]])
                    root, root_feature = emitted[-1], hid[path[-1]]
                m.total_time = time.perf_counter() - t_start
                yield out
                if done:
                    return

    def _record(self, d: TreeDrafter, path: torch.Tensor) -> None:
        """(P, H, d, accepted) of every drafted node of this step's full tree (before any rerank)."""
        full = getattr(self.strategy, "full_tree", None)
        n = d.size
        label = torch.zeros(n, dtype=torch.uint8)
        sel = getattr(self.strategy, "selected", None)
        on_path = path if sel is None or full is None else sel[path]  # map pruned ids back to the full tree
        label[on_path.cpu()] = 1
        self.recorder.add_tree(d.logp[1:].exp().cpu(), d.entropy[1:].cpu(), d.depth[1:].cpu() - 1, label[1:])

    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, tokenizer=None, baseline: bool = False) -> Generation:
        """Generate up to ``max_new_tokens``; with ``baseline`` also time the target's own greedy
        ``generate`` on the same prompt in this process for the speed-up."""
        m = Metrics()
        tokens = [t for chunk in self.stream(prompt, max_new_tokens, temperature, top_p, top_k, seed, tokenizer, m)
                  for t in chunk]
        if baseline:
            m.baseline_time = self.time_autoregressive(prompt, len(tokens), tokenizer)
        return Generation(tokens, m)

    def time_autoregressive(self, prompt, n_tokens: int, tokenizer=None) -> float:
        ids = self._encode(prompt, tokenizer)[None].to(self.lm_head.weight.device)
        with torch.no_grad():
            t = time.perf_counter()
            self.target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_tokens,
                                 min_new_tokens=n_tokens, eos_token_id=None, pad_token_id=0)
            return time.perf_counter() - t

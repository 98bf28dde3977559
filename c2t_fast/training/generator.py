"""The self-distillation generator: the target's own replies at the machine's speed, with the draft
head's training features and the target's top-k log-probabilities captured in the same forward passes.

Every slot of a :class:`hf.static_batch.StaticBatchLM` holds one conversation (a :class:`Job`); a
decoding step advances all slots by one token; a slot whose conversation is done is refilled at once
(continuous batching), so finished rows stop costing. A conversation answers its user turns in order:
after each reply the next turn is appended to the slot's cache (the target's own earlier replies are
the context, never re-encoded). Magpie-style prompt synthesis runs through the same slots: a
``magpie_prompt`` job feeds the chat template's user prefix and lets the target write the user turn.

Replies are greedy, or sampled (a share ``sample_share``, temperature drawn from ``temperatures``; each
reply has its own generator seeded by (seed, job, turn)). Held-out jobs are always greedy.

Storage (``out_dir``, meant to be committed: token ids only, a few MB per million tokens):

- ``meta.json``: settings, jobs committed, token counts, wall-clock and the sessions that produced them;
- ``shard_XXXXX/tokens.bin``: the committed conversations' token ids (little-endian uint16 when the
  vocabulary fits, else int32), ``shard_XXXXX/index.jsonl``: one line per job: ``job`` (its number),
  ``kind``, ``source_id``, ``split``, ``offset`` and ``length`` in the shard's tokens, ``replies``
  (``[start, end, temperature]`` of every span the target wrote as the assistant, 0 = greedy),
  ``skipped`` (why a job gave no tokens, else absent). Shard k holds jobs ``k * shard_jobs`` onwards;
- ``magpie_prompts.jsonl``: the synthesised user turns in order, ``kept`` or the filter's reason.

Features live on local disk only (``features_dir``, see :mod:`training.feature_store`): per token the
residual streams entering ``feature_layers`` (fp16) and the target's top-k log-probabilities of the
next token (where the next token is the target's own), aligned with each shard's tokens; when missing
(another machine, a feature budget reached) ``feature_store.recompute`` rebuilds them from the ids.

Resumable to the same bytes: a job's tokens depend on nothing but the job (every decoding-step GEMM has
the same shape whatever the other slots hold, attention reads each row's own cache, each reply has its
own random generator), so jobs are committed as they finish, whatever their order, and a rerun redoes
only those that were in flight. Once every job of a shard is in, the shard is sealed: rewritten in job
order, so that on the same machine and thread count it is byte for byte what an uninterrupted run
writes (``training.selfdistill``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..hf import adapter as hf
from ..hf.static_batch import StaticBatchLM
from . import feature_store
from .prompts import Job, PromptFilter, interleave, sharegpt_jobs


@dataclass
class GeneratorConfig:
    slots: int = 128  # conversations decoded together (the decoding step's GEMM rows)
    capacity: int = 2048  # tokens per conversation, context included
    max_new_tokens: int = 384  # per reply
    max_turn_tokens: int = 512  # a user turn longer than this ends its conversation (long pastes: 5% of turns)
    min_reply_room: int = 64  # a next turn is asked only when this many tokens remain for its reply
    sample_share: float = 0.25  # replies sampled (the rest greedy); held-out replies always greedy
    temperatures: tuple = (0.7, 0.8, 0.9, 1.0)
    top_logprobs: int = 16  # the target's top-k log-probabilities stored per position
    # the static cache's precision: float16 halves the bytes a step reads (1.25x faster here) and left 54 of 56
    # greedy 128-token replies token for token those of a float32 cache (bfloat16: 40 of 56)
    kv_dtype: str = "float16"
    linear: str = "auto"  # the decoding step's GEMM (StaticBatchLM)
    seed: int = 0
    magpie_prompts: int = 6000  # user turns the target writes itself (0: ShareGPT only)
    magpie_every: int = 4  # one Magpie job after every this many ShareGPT training jobs
    magpie_temperature: float = 1.0
    magpie_max_tokens: int = 192
    shard_jobs: int = 500
    store_hidden: bool = False  # also the post-norm last hidden state per position (EAGLE-1 training)

    def validate(self) -> None:
        for name in ("slots", "capacity", "max_new_tokens", "max_turn_tokens", "top_logprobs", "shard_jobs",
                     "magpie_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"GeneratorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.magpie_prompts < 0 or self.magpie_every < 1 or self.min_reply_room < 1:
            raise ValueError("GeneratorConfig: magpie_prompts >= 0, magpie_every >= 1, min_reply_room >= 1")
        if not 0 <= self.sample_share <= 1 or not self.temperatures or any(not 0 < t <= 2 for t in self.temperatures):
            raise ValueError("GeneratorConfig: sample_share in [0, 1], temperatures non-empty in (0, 2]")
        if not 0 < self.magpie_temperature <= 2:
            raise ValueError("GeneratorConfig.magpie_temperature must be in (0, 2]")
        if self.kv_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"GeneratorConfig.kv_dtype must be float32, float16 or bfloat16, got {self.kv_dtype!r}")
        if self.capacity <= self.min_reply_room + 8:
            raise ValueError("GeneratorConfig.capacity must exceed min_reply_room + 8")


def _hash01(*parts) -> float:
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2 ** 64


def reply_setting(cfg: GeneratorConfig, job: Job, turn: int) -> tuple[float, int]:
    """(temperature, seed) of a job's reply to turn ``turn``: 0.0 (greedy) unless sampled."""
    seed = int(_hash01(cfg.seed, job.key, turn, "seed") * 2 ** 62)
    if job.kind == "magpie_prompt":
        return cfg.magpie_temperature, seed
    if job.split == "heldout" or _hash01(cfg.seed, job.key, turn, "sample") >= cfg.sample_share:
        return 0.0, seed
    temps = list(cfg.temperatures)
    return float(temps[int(_hash01(cfg.seed, job.key, turn, "temp") * len(temps))]), seed


@dataclass
class _Slot:
    job: Job
    number: int
    seq: list = field(default_factory=list)
    spans: list = field(default_factory=list)
    turn: int = 0
    span_start: int = 0
    temperature: float = 0.0
    gen: torch.Generator | None = None
    limit: int = 0  # tokens this span may have


@dataclass
class Finished:
    """A job's result, in what the store writes: ``tokens`` int64 ``[n]``, ``spans`` ``[[s, e, t], ...]``
    (the target-written spans), ``features`` ``[n, F]`` fp16 / ``topk_ids`` / ``topk_logp`` (rows
    aligned with tokens; zero where not computed), ``skipped`` (reason) or None."""
    job: Job
    number: int
    tokens: np.ndarray
    spans: list
    features: np.ndarray | None = None
    hidden: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    topk_logp: np.ndarray | None = None
    skipped: str | None = None


class SlotScheduler:
    """Runs jobs through a :class:`StaticBatchLM`'s slots; yields :class:`Finished` jobs in job order."""

    def __init__(self, lm: StaticBatchLM, tokenizer, cfg: GeneratorConfig, capture: bool = True):
        self.lm, self.tok, self.cfg, self.capture = lm, tokenizer, cfg, capture
        self.stop_ids = hf.chat_stop_ids(tokenizer) or [tokenizer.eos_token_id]
        self.stops = set(self.stop_ids)
        self._user_prefix = hf.user_turn_prefix(tokenizer)
        self._opening = hf.assistant_opening(tokenizer)
        S, C, k = lm.slots, lm.capacity, cfg.top_logprobs
        self.slot: list[_Slot | None] = [None] * S
        width = lm.hidden * len(lm.feature_layers)
        self._feat = torch.zeros(S, C, width, dtype=torch.float16) if capture and width else None
        self._hid = torch.zeros(S, C, lm.hidden, dtype=torch.float16) if capture and cfg.store_hidden else None
        self._tki = torch.zeros(S, C, k, dtype=torch.int32) if capture else None
        self._tkl = torch.zeros(S, C, k, dtype=torch.float16) if capture else None
        self.reply_tokens = 0  # tokens the target wrote as the assistant (the throughput figure)
        self.steps = 0

    # -- one job's lifecycle ------------------------------------------------------------------------
    def _encode_turn(self, text: str) -> torch.Tensor:
        return hf.encode_chat(self.tok, text)

    def _start(self, s: int, job: Job, number: int):
        """Put ``job`` into slot ``s``; returns a :class:`Finished` when it gives nothing to generate."""
        self.lm.reset(s)
        st = _Slot(job, number)
        if job.kind == "magpie_prompt":
            st.seq = self._user_prefix.tolist()
            limit = self.cfg.magpie_max_tokens
        else:
            first = self._encode_turn(job.turns[0])
            if first.numel() > self.cfg.max_turn_tokens or first.numel() + self.cfg.min_reply_room > self.lm.capacity:
                return Finished(job, number, np.zeros(0, np.int64), [], skipped="first_turn_too_long")
            st.seq = first.tolist()
            limit = self.cfg.max_new_tokens
        self.slot[s] = st
        self._open_span(s, limit)
        return None

    def _open_span(self, s: int, limit: int) -> None:
        """Feed what the slot's cache lacks and draw the span's first token."""
        st = self.slot[s]
        st.temperature, seed = reply_setting(self.cfg, st.job, st.turn)
        st.gen = torch.Generator().manual_seed(seed) if st.temperature > 0 else None
        st.span_start = len(st.seq)
        st.limit = limit
        start = self.lm.lengths[s]
        fed = torch.tensor(st.seq[start:], dtype=torch.int64)
        out = self.lm.prefill(s, fed)
        if self.capture:
            self._store_features(torch.tensor([s]).expand(fed.numel()), torch.arange(start, start + fed.numel()), out)
        self._advance([s], out.logits, [start + fed.numel() - 1])

    def _store_features(self, slots: torch.Tensor, positions: torch.Tensor, out) -> None:
        if self._feat is not None:
            self._feat[slots, positions] = out.features.to(torch.float16)
        if self._hid is not None:
            self._hid[slots, positions] = out.hidden.to(torch.float16)

    def _advance(self, slots: list[int], logits: torch.Tensor, positions: list[int]) -> list[int]:
        """Draw the next token of each slot from its row of ``logits`` (fp32 ``[len(slots), V]``, computed at
        ``positions``); records the top-k; ends spans and jobs. Returns the slots that finished."""
        if self.capture:
            k = self.cfg.top_logprobs
            lse = torch.logsumexp(logits, -1, keepdim=True)
            vals, ids = logits.topk(k, -1)
            idx = torch.tensor(slots), torch.tensor(positions)
            self._tki[idx] = ids.to(torch.int32)
            self._tkl[idx] = (vals - lse).to(torch.float16)
        greedy = logits.argmax(-1).tolist()
        sampled = [row for row, s in enumerate(slots) if self.slot[s].gen is not None]
        drawn = {}
        if sampled:  # inverse CDF: one softmax and cumsum for every sampled row, one uniform from each row's own generator
            temps = torch.tensor([self.slot[slots[r]].temperature for r in sampled])[:, None]
            cdf = torch.softmax(logits[sampled] / temps, -1).double().cumsum(-1)
            u = torch.stack([torch.rand((), dtype=torch.float64, generator=self.slot[slots[r]].gen) for r in sampled])
            idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[1] - 1)
            drawn = dict(zip(sampled, idx[:, 0].tolist()))
        finished = []
        for row, s in enumerate(slots):
            st = self.slot[s]
            tok = greedy[row] if st.gen is None else drawn[row]
            st.seq.append(tok)
            self.reply_tokens += st.job.kind != "magpie_prompt"
            written = len(st.seq) - st.span_start
            if tok in self.stops or written >= st.limit or len(st.seq) >= self.lm.capacity:
                if self._end_span(s):
                    finished.append(s)
        return finished

    def _end_span(self, s: int) -> bool:
        """Close the slot's current span; open the next turn when there is one and room for it. True when
        the job is done."""
        st = self.slot[s]
        st.spans.append([st.span_start, len(st.seq), st.temperature])
        st.turn += 1
        if st.job.kind == "magpie_prompt" or st.turn >= len(st.job.turns):
            return True
        cont = hf.chat_continuation(self.tok, st.job.turns[st.turn])
        closing = [] if st.seq[-1] in self.stops else [self.stop_ids[0]]  # a reply cut short is closed
        if (cont.numel() > self.cfg.max_turn_tokens + 16
                or len(st.seq) + len(closing) + cont.numel() + self.cfg.min_reply_room > self.lm.capacity):
            return True
        st.seq += closing + cont.tolist()
        self._open_span(s, self.cfg.max_new_tokens)
        return False

    def _finish(self, s: int) -> Finished:
        st = self.slot[s]
        self.slot[s] = None
        n = len(st.seq)
        fin = Finished(st.job, st.number, np.asarray(st.seq, dtype=np.int64), st.spans)
        if self.capture:
            fed = self.lm.lengths[s]  # positions with features (the last drawn token is never fed)
            if self._feat is not None:
                f = torch.zeros(n, self._feat.shape[2], dtype=torch.float16)
                f[:fed] = self._feat[s, :fed]
                fin.features = f.numpy()
            if self._hid is not None:
                h = torch.zeros(n, self._hid.shape[2], dtype=torch.float16)
                h[:fed] = self._hid[s, :fed]
                fin.hidden = h.numpy()
            ti = torch.zeros(n, self.cfg.top_logprobs, dtype=torch.int32)
            tl = torch.zeros(n, self.cfg.top_logprobs, dtype=torch.float16)
            for a, b, _ in st.spans:  # the top-k is the teacher where the next token is the target's own
                ti[a - 1:b - 1] = self._tki[s, a - 1:b - 1]
                tl[a - 1:b - 1] = self._tkl[s, a - 1:b - 1]
            fin.topk_ids, fin.topk_logp = ti.numpy(), tl.numpy()
        return fin

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, jobs, should_stop=None):
        """Yield the :class:`Finished` jobs of ``jobs`` (an iterable of ``(number, Job)``) as they finish.
        ``should_stop()`` is asked after every decoding step; when it answers True the run ends there (the
        jobs in flight are dropped: a resumed run redoes them)."""
        it = iter(jobs)
        ready: list[Finished] = []
        exhausted = False

        def fill():
            nonlocal exhausted
            for s in range(self.lm.slots):
                while self.slot[s] is None and not exhausted:
                    item = next(it, None)
                    if item is None:
                        exhausted = True
                        break
                    done = self._start(s, item[1], item[0])
                    if done is not None:
                        ready.append(done)

        fill()
        while True:
            while ready:
                yield ready.pop(0)
            if should_stop is not None and should_stop():
                return
            active = [st is not None for st in self.slot]
            if not any(active):
                if exhausted:
                    break
                fill()
                continue
            toks = torch.tensor([st.seq[-1] if st else 0 for st in self.slot], dtype=torch.int64)
            positions = list(self.lm.lengths)
            out = self.lm.decode(toks, active)
            self.steps += 1
            rows = [s for s, a in enumerate(active) if a]
            if self.capture:
                idx = torch.tensor(rows)
                pos = torch.tensor([positions[s] for s in rows])
                if self._feat is not None:
                    self._feat[idx, pos] = out.features[idx].to(torch.float16)
                if self._hid is not None:
                    self._hid[idx, pos] = out.hidden[idx].to(torch.float16)
            for s in self._advance(rows, out.logits[rows], [positions[s] for s in rows]):
                ready.append(self._finish(s))
            fill()

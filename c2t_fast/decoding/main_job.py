"""The main job, ``c2t-fast generate``: one chat reply streamed from a speculative generator built on the
main job's defaults (or what the caller chose), with plain decoding's time beside it, under ``torchrun``
sharded over the ranks with rank 0 writing. The command line parses its flags into these arguments."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from . import defaults
from .metrics import Metrics


@dataclass
class MainJob:
    """What ``c2t-fast generate`` was asked (the CLI's flags, named as there): the target (``"smollm2"`` or a
    directory) and its device, the draft (None: the shipped head for the shipped target; ``"none"``: the
    training-free sources alone), the strategy and its parameters, the tree sizing (``budget``), the
    training-free sources, the sampling settings and transformers' processors (``processors``: name -> value,
    applied per tree node)."""

    prompt: str
    target: str = "smollm2"
    device: str | None = "auto"
    stock_linear: bool = False
    draft: str | None = None
    draft_full_vocab: bool = False
    strategy: str = defaults.STRATEGY
    classifier: str | None = None
    params: dict = field(default_factory=dict)
    ngram: int = defaults.NGRAM_TOKENS
    budget: str = defaults.BUDGET
    datastore: str | None = defaults.DEFAULT
    recycling: bool | str = defaults.DEFAULT
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    processors: dict = field(default_factory=dict)
    baseline: bool = True


def run_main_job(job: MainJob, write=print) -> Metrics | None:
    """Run ``job``, writing the reply as it is generated and a summary line through ``write`` (``print``'s
    signature; rank 0 only under torchrun). Returns the run's metrics (None for ``strategy="ar"``, plain
    decoding through the target's own ``generate()``)."""
    from ..hf.adapter import TargetAdapter, chat_stop_ids, encode_chat
    from ..hf.loading import launched_ranks, load_target
    from ..kernels.skinny_linear import fast_linear_installed
    from .defaults import load_sources
    from .drafts.loading import load_draft
    from .engine import SpeculativeGenerator

    rank, world = launched_ranks()  # under torchrun: the target sharded over the ranks, rank 0 writes
    echo = write if rank == 0 else (lambda *a, **k: None)
    target, tok = load_target(job.target, device=job.device, fast_linear=False if job.stock_linear else None,
                              tp_plan="auto" if world > 1 else None)
    try:
        ids = encode_chat(tok, job.prompt)
        stop = chat_stop_ids(tok)
        if job.strategy == "ar":
            t = time.perf_counter()
            new = TargetAdapter(target).generate(ids, job.max_new_tokens, stop_ids=stop, temperature=job.temperature,
                                                 top_p=job.top_p, top_k=job.top_k, **job.processors)
            dt = time.perf_counter() - t
            echo(tok.decode(new, skip_special_tokens=True))
            echo(json.dumps({"strategy": "ar", "new_tokens": new.numel(), "tokens_per_s": round(new.numel() / dt, 2)}))
            return None
        draft = load_draft(job.draft, target, job.draft_full_vocab)
        strategy = defaults.make_strategy(job.strategy, job.classifier, job.params)
        gen = SpeculativeGenerator(target, draft, strategy, stop_token_ids=stop, ngram=job.ngram,
                                   budget=None if job.budget == "none" else job.budget,
                                   **load_sources(job.datastore, job.recycling, target))
        m, tokens = Metrics(), []
        procs, sampling = None, dict(top_p=job.top_p, top_k=job.top_k)
        if job.processors:  # transformers' own processors, in generate()'s order, applied per tree node
            from ..hf.adapter import logits_processors

            procs = logits_processors(target, ids.numel(), eos=stop, temperature=job.temperature,
                                      top_k=job.top_k or None, top_p=job.top_p, **job.processors)
            sampling = dict(top_p=1.0, top_k=0)
        for chunk in gen.stream(ids, job.max_new_tokens, temperature=job.temperature, seed=job.seed, metrics=m,
                                logits_processor=procs, **sampling):
            tokens += chunk
            echo(tok.decode(chunk, skip_special_tokens=True), end="", flush=True)
        echo()
        if job.baseline:
            m.baseline_time = gen.time_autoregressive(ids, len(tokens))
        echo(summary_line(m, job, fast_linear_installed(target), world))
        return m
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def summary_line(m: Metrics, job: MainJob, skinny: bool, world: int = 1) -> str:
    """The line ``c2t-fast generate`` ends with: tau, gamma, tokens/s, the sources' and the cost rule's share,
    the speed-up over plain decoding."""
    s = m.summary()
    return (f"tau {s['tau']:.2f} | gamma {s['gamma']} ({s['gamma_per_step']}/step) | {s['tokens_per_s']} tokens/s"
            + (f" | n-gram nodes {s['ngram_nodes']}" if job.ngram else "")
            + (f" | plain steps {s['plain_steps']}/{s['steps']} (cost rule)" if job.budget != "none" else "")
            + (f" | speed-up {s['speedup']:.2f}x over plain decoding" if s["speedup"] else "")
            + (" (linear layers: skinny kernel)" if s["speedup"] and skinny else "")
            + (f" | tensor parallel over {world} ranks" if world > 1 else ""))

"""``model.generate(..., custom_generate=c2t_fast.generate[, draft=..., strategy=...])``: transformers
prepares the inputs and the generation config, then hands the decoding loop to the engine, which runs
the main job's settings (``decoding.defaults``) unless told otherwise.

transformers 5.x forwards a callable ``custom_generate`` only the arguments its own sampling loop does
not take, and ``streamer`` is one it takes (so it never arrives): pass a streamer as ``text_streamer=``
through ``model.generate``. ``streamer=`` is accepted too, for a direct call with a ``generation_config``.
"""

from __future__ import annotations

import torch

from ..hf.adapter import generation_settings
from ..hf.shipped import is_shipped_target
from . import defaults
from .engine import SpeculativeGenerator
from .drafts.loading import load_draft


def generate(model, input_ids: torch.Tensor, logits_processor=None, stopping_criteria=None, generation_config=None,
             draft=None, strategy=None, text_streamer=None, seed: int | None = None, streamer=None,
             budget=defaults.DEFAULT, ngram=defaults.DEFAULT, datastore=defaults.DEFAULT, recycling=defaults.DEFAULT,
             **model_kwargs) -> torch.Tensor:
    """The target's own output for ``input_ids int64 [B, n]``, decoded with token trees: greedy output
    equals ``generate(do_sample=False)`` token for token; sampling follows the target's distribution
    under the call's temperature / top-k / top-p. Returns ``[B, n + new]`` like ``generate`` (rows that
    stopped early padded with the pad token). B > 1 or left padding (``attention_mask`` with zeros before
    the ones): a tree per sequence, all verified in one pass (``decoding.batch``; Llama / Qwen2 / Mistral
    targets; no streamer and no logits processors beyond temperature / top-k / top-p there).

    ``draft``: a ``DraftProtocol`` (``c2t_fast.load_draft``; for the shipped SmolLM2 the shipped head by
    default); ``strategy``, ``budget``, ``ngram``, ``datastore``, ``recycling``: as ``SpeculativeGenerator``
    takes them, by default the main job's (``decoding.defaults``); ``seed``: the sampling seed (default: drawn from torch's global
    generator, so ``torch.manual_seed`` repeats a run).
    The call's logits processors (repetition_penalty, no_repeat_ngram_size, min_new_tokens, bad_words_ids,
    min_p, typical_p, ...) apply to every tree node with its own history, as ``generate()`` applies them.
    Refused with an error: right padding, beams, several sequences per prompt, processors that keep state or
    need another model, stopping criteria other than length and EOS."""
    if draft is None and not is_shipped_target(model):
        raise ValueError("c2t_fast.generate needs draft=... for this target: a head or small causal LM loaded with "
                         "c2t_fast.load_draft(path, model) (the shipped head is the default only for the shipped "
                         "SmolLM2)")
    if generation_config is None:
        generation_config = model.generation_config
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] < 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"c2t_fast.generate: input_ids must be [B, n], got {shape}")
    s = generation_settings(generation_config, logits_processor, stopping_criteria, input_ids.shape[1])
    mask = model_kwargs.get("attention_mask")
    padded = mask is not None and not bool((mask == 1).all())
    if input_ids.shape[0] > 1 or padded:
        if s["processors"] is not None:
            raise ValueError("c2t_fast.generate with a batch (B > 1 or padding) applies temperature / top-k / top-p "
                             "only; decode one sequence at a time for the other logits processors")
        if streamer is not None or text_streamer is not None:
            raise ValueError("c2t_fast.generate streams one sequence; a batch (B > 1 or padding) takes no streamer")
    if s["max_new_tokens"] < 1:
        return input_ids
    if s["temperature"] > 0 and seed is None:
        seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    if draft is None:
        draft = load_draft(None, model)
    if input_ids.shape[0] > 1 or padded:
        return _generate_batch(model, input_ids, mask, draft, strategy, s, seed, generation_config, budget=budget,
                               ngram=ngram, datastore=datastore, recycling=recycling)
    gen = SpeculativeGenerator(model, draft, strategy, eos_token_id=s["eos"], budget=budget, ngram=ngram,
                               datastore=datastore, recycling=recycling)
    out = streamer if text_streamer is None else text_streamer
    if out is not None:
        out.put(input_ids.cpu())  # the prompt first, as generate() does (skip_prompt relies on it)
    tokens = []
    procs = s["processors"]  # the call's whole list when it has more than temperature / top-k / top-p
    for chunk in gen.stream(input_ids[0], s["max_new_tokens"], temperature=s["temperature"],
                            top_p=1.0 if procs is not None else s["top_p"], top_k=0 if procs is not None else s["top_k"],
                            seed=seed, logits_processor=procs):
        tokens += chunk
        if out is not None:
            out.put(torch.tensor(chunk, dtype=torch.int64))
    if out is not None:
        out.end()
    new = torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids, new], 1)


def _generate_batch(model, input_ids, mask, draft, strategy, s: dict, seed, generation_config, **sources) -> torch.Tensor:
    """``[B, n + new]``: each row's continuation from the batched engine, padded on the right as ``generate``
    pads rows that stopped early."""
    from .batch import BatchSpeculativeGenerator

    gen = BatchSpeculativeGenerator(model, draft, strategy, eos_token_id=s["eos"], **sources)
    out = gen.generate(input_ids, mask, s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                       top_k=s["top_k"], seed=seed)
    pad = generation_config.pad_token_id
    if pad is None:
        eos = s["eos"]
        pad = (eos[0] if isinstance(eos, (list, tuple)) and eos else eos) if eos is not None else 0
    width = max(len(t) for t in out.tokens)
    new = torch.full((input_ids.shape[0], width), int(pad), dtype=input_ids.dtype)
    for i, t in enumerate(out.tokens):
        new[i, :len(t)] = torch.tensor(t, dtype=input_ids.dtype)
    return torch.cat([input_ids, new.to(input_ids.device)], 1)

"""What c2t_fast needs to know about a transformers causal LM, in one place: its decoder and LM head,
its KV cache, how it samples, its chat encoding and stop tokens, and its own ``generate()``.

The layers above (``decoding``, ``training``, ``bench``) call a ``TargetAdapter`` and the functions
here; none of them imports transformers. When transformers renames something (the cache argument did,
twice), this module is the one that changes.
"""

from __future__ import annotations

import inspect

import torch

# End-of-turn tokens of the chat templates in use (ChatML, Llama-3, Phi-3); a chat reply stops there even
# when the model's generation config names only the end-of-text token.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>")


def cache_kwarg(fn) -> str:
    """Name of the KV-cache argument of a transformers forward (it changed across versions)."""
    params = inspect.signature(fn).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    return "past_key_values"


def new_cache():
    """An empty KV cache of the kind tree verification and ``compact_dynamic_cache`` work on."""
    from transformers import DynamicCache

    return DynamicCache()


def crop_cache(cache, length: int) -> None:
    """Cut a transformers cache back to its first ``length`` positions."""
    cur = cache.get_seq_length()
    if cur > length:
        cache.crop(-(cur - length))  # negative: drop that many trailing slots (every transformers version)


def decoder_of(model) -> torch.nn.Module:
    """The base decoder of a causal LM (the module whose output is the post-norm hidden state)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    return dec if isinstance(dec, torch.nn.Module) else getattr(model, "model", model)


def text_config(model):
    """The text model's config (multimodal wrappers keep it one level down)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lm_head(model) -> torch.nn.Module:
    """The output projection (hidden -> vocabulary logits)."""
    return model.get_output_embeddings()


def final_norm(model) -> torch.nn.Module | None:
    """The decoder's final norm (applied before the LM head), None when the model has none."""
    return getattr(decoder_of(model), "norm", None)


def token_embedding(model) -> torch.nn.Module:
    """The input token embedding."""
    return model.get_input_embeddings()


_REPLICA = "_c2t_fast_replica"


def replicated(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (an ``nn.Embedding`` or ``nn.Linear`` of a target) itself when its weights are plain tensors;
    when they are a tensor-parallel target's shards (DTensors), a frozen plain copy with the full weights on
    the shard's device, gathered once and kept on the module: what a draft head replicated on every rank
    reads (the target's own module keeps its sharded forward)."""
    weight = module.weight
    if not hasattr(weight, "full_tensor"):
        return module
    copy = getattr(module, _REPLICA, None)
    if copy is None:
        full = weight.full_tensor().detach()
        if isinstance(module, torch.nn.Embedding):
            copy = torch.nn.Embedding.from_pretrained(full, freeze=True, padding_idx=module.padding_idx)
        elif isinstance(module, torch.nn.Linear):
            bias = module.bias
            copy = torch.nn.Linear(full.shape[1], full.shape[0], bias=bias is not None, device=full.device,
                                   dtype=full.dtype)
            with torch.no_grad():
                copy.weight.copy_(full)
                if bias is not None:
                    copy.bias.copy_(bias.full_tensor() if hasattr(bias, "full_tensor") else bias)
            copy.requires_grad_(False)
        else:
            raise TypeError(f"cannot replicate a sharded {type(module).__name__} (only Embedding and Linear)")
        object.__setattr__(module, _REPLICA, copy)  # not a submodule: the target's state dict is unchanged
    return copy


def vocab_size(model) -> int:
    """Rows of the LM head: the ids a draft for ``model`` must cover."""
    return lm_head(model).weight.shape[0]


def device_of(model) -> torch.device:
    """The device of the model's logits (its LM head)."""
    return lm_head(model).weight.device


def encode_chat(tokenizer, messages, add_generation_prompt: bool = True) -> torch.Tensor:
    """Token ids ``int64 [n]`` of a chat: ``messages`` is one user turn (str) or a list of
    ``{"role", "content"}`` dicts, encoded with the tokenizer's chat template; with
    ``add_generation_prompt`` the assistant's turn is opened (a prompt), without it the conversation is
    encoded as it stands (training text)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_tensors="pt", return_dict=True)
    return enc["input_ids"][0]


_SENTINEL = "\u2063c2t-sentinel\u2063"


def _rendered_around_sentinel(tokenizer, messages, add_generation_prompt: bool) -> tuple[str, str]:
    """The chat template's text before and after a sentinel message content."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    i = text.index(_SENTINEL)
    return text[:i], text[i + len(_SENTINEL):]


def _text_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def chat_continuation(tokenizer, user_text: str) -> torch.Tensor:
    """Token ids ``int64 [n]`` that follow an assistant reply's end-of-turn token and open the next user
    turn ``user_text`` and the assistant's answer to it (ChatML: ``"\n<|im_start|>user\n...<|im_end|>\n
    <|im_start|>assistant\n"``): a multi-turn conversation grows by these after each reply the model
    wrote itself, with no re-encoding of its own tokens."""
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL},
            {"role": "user", "content": user_text}]
    _, after = _rendered_around_sentinel(tokenizer, msgs, True)
    return _text_ids(tokenizer, _without_end_of_turn(after))  # the reply's own end-of-turn token is in already


def user_turn_prefix(tokenizer) -> torch.Tensor:
    """Token ids ``int64 [n]`` of a conversation up to where its first user turn's text begins (the
    template's default system prompt included): what Magpie-style prompt synthesis feeds the model, so
    that it writes a user turn itself."""
    before, _ = _rendered_around_sentinel(tokenizer, [{"role": "user", "content": _SENTINEL}], False)
    return _text_ids(tokenizer, before)


def assistant_opening(tokenizer) -> torch.Tensor:
    """Token ids that follow a user turn's end-of-turn token and open the assistant's reply."""
    _, after = _rendered_around_sentinel(tokenizer, [{"role": "user", "content": _SENTINEL}], True)
    return _text_ids(tokenizer, _without_end_of_turn(after))


def _without_end_of_turn(text: str) -> str:
    stops = [t for t in _END_OF_TURN if text.startswith(t)]
    return text[len(stops[0]):] if stops else text


def chat_stop_ids(tokenizer) -> list[int]:
    """The end-of-turn token ids this tokenizer knows (``<|im_end|>`` for SmolLM2), to stop a chat reply."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in _END_OF_TURN if t in vocab]


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The target's sampling distribution ``[n, V]`` from logits ``[..., V]``, processed exactly as
    transformers' ``generate`` processes them (temperature, then top-k, then top-p)."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    rows = logits.view(-1, logits.shape[-1])
    return torch.softmax(procs(None, rows.clone()), -1)


class TargetAdapter:
    """One causal LM seen by the engine: batch-1 passes that return the post-norm hidden states and
    fp32 logits, its cache, its end-of-sequence ids and context length, and its stock ``generate()``
    for baselines. Holds no state between calls (the cache is the caller's)."""

    def __init__(self, model):
        self.model = model
        self.decoder = decoder_of(model)
        self.lm_head = lm_head(model)
        self._cache_kw = cache_kwarg(self.decoder.forward)
        self.max_positions = getattr(text_config(model), "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def eos_ids(self, eos_token_id=None) -> list[int]:
        """``eos_token_id`` (int or list) if given, else the model's generation config's."""
        eos = eos_token_id
        if eos is None:
            eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def new_cache(self):
        return new_cache()

    def forward(self, ids: torch.Tensor, cache, position_ids: torch.Tensor | None = None,
                tree_bits: torch.Tensor | None = None, feature_layers: tuple | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids ``int64 [n]`` appended to ``cache`` -> (features, logits fp32 ``[n, V]``).
        ``position_ids [n]`` and ``tree_bits`` (ancestor bits ``int64 [n, ceil(n/64)]``) make it one tree
        pass through the patched attention (``hf.attention.patch``). Features: the post-norm last hidden
        state ``[n, H]``, or with ``feature_layers`` the residual streams entering those decoder layers,
        concatenated ``[n, len(feature_layers) * H]`` (EAGLE-3's fused features)."""
        kw = {self._cache_kw: cache}
        if tree_bits is not None:
            kw["c2t_tree_bits"] = tree_bits
        h, feats = self._run(ids, position_ids, feature_layers, use_cache=True, **kw)
        return (feats if feature_layers else h), self.lm_head(h).float()

    def _run(self, ids, position_ids, feature_layers, **kw):
        """(post-norm last hidden state ``[n, H]``, the residual streams entering ``feature_layers``
        concatenated ``[n, len * H]`` or None)."""
        captured, hooks = {}, []
        for i in feature_layers or ():
            def grab(module, args, kwargs, i=i):
                captured[i] = args[0] if args else kwargs["hidden_states"]
            hooks.append(self.decoder.layers[i].register_forward_pre_hook(grab, with_kwargs=True))
        try:
            out = self.decoder(input_ids=ids[None], position_ids=None if position_ids is None else position_ids[None],
                               **kw)
        finally:
            for h in hooks:
                h.remove()
        feats = torch.cat([captured[i][0] for i in feature_layers], -1) if feature_layers else None
        return out.last_hidden_state[0], feats

    def hidden_and_features(self, ids: torch.Tensor, feature_layers: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(post-norm last hidden states ``[n, H]``, the residual streams entering ``feature_layers``
        concatenated ``[n, len(feature_layers) * H]``) of ``ids int64 [n]`` (no cache kept): what an
        EAGLE-3 head is trained on (its input and, through the LM head, its teacher)."""
        return self._run(ids, None, tuple(feature_layers), use_cache=False)

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """Post-norm last hidden states ``[n, H]`` of ``ids int64 [n]`` (no cache kept)."""
        return self.decoder(input_ids=ids[None]).last_hidden_state[0]

    def generate(self, ids: torch.Tensor, max_new_tokens: int, *, exact_length: bool = False, stop_ids=None,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 prompt_lookup_tokens: int = 0, **settings) -> torch.Tensor:
        """New token ids ``[m]`` of the model's own ``generate()`` on ``ids int64 [n]`` (the baselines).

        ``exact_length``: exactly ``max_new_tokens`` tokens (for timing the same number of tokens as a
        speculative run); ``stop_ids``: ids that end the reply (None: the generation config's);
        ``prompt_lookup_tokens > 0``: transformers' prompt-lookup assisted decoding; ``settings``: further
        generation settings (repetition_penalty, ...)."""
        ids = ids.view(1, -1).to(self.device)
        kw = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
        if exact_length:
            kw.update(min_new_tokens=max_new_tokens, eos_token_id=None)
        elif stop_ids is not None:
            kw["eos_token_id"] = list(stop_ids) or None
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
        if prompt_lookup_tokens:
            kw["prompt_lookup_num_tokens"] = prompt_lookup_tokens
        kw.update(settings)
        with torch.no_grad():
            out = self.model.generate(ids, **kw)
        return out[0, ids.shape[1]:]


def generate_batch(model, prompts: list, max_new_tokens: int, pad_id: int, stop_ids=(), temperature: float = 0.0,
                   top_p: float = 1.0) -> list:
    """Replies (int64 ``[m_i]``, cut after the first stop id, which is kept) of the model's own
    ``generate()`` to several prompts (int64 ``[n_i]``) at once, left-padded into one batch. Greedy at
    ``temperature`` 0, else sampled (torch's global generator)."""
    n = max(p.numel() for p in prompts)
    dev = lm_head(model).weight.device
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(prompts), n, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, n - p.numel():], mask[i, n - p.numel():] = p, 1
    kw = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=pad_id,
              eos_token_id=list(stop_ids) or None)
    if temperature > 0:
        kw.update(temperature=temperature, top_p=top_p, top_k=None)
    with torch.no_grad():
        out = model.generate(ids.to(dev), attention_mask=mask.to(dev), **kw)[:, n:].cpu()
    replies, stops = [], set(stop_ids)
    for row in out.tolist():
        end = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        replies.append(torch.tensor(row[:end], dtype=torch.int64))
    return replies


class CausalLMRunner:
    """A small causal LM driven with an explicit 4D mask and positions (``DraftLM``'s model)."""

    def __init__(self, model):
        self.model = model.eval()
        self._cache_kw = cache_kwarg(model.forward)

    @property
    def vocab_size(self) -> int:
        return vocab_size(self.model)

    def logits(self, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        """ids ``[n]``, additive mask ``[1, 1, n, past + n]``, positions ``[n]`` -> fp32 logits ``[n, V]``."""
        out = self.model(input_ids=ids.view(1, -1), attention_mask=mask, position_ids=position_ids.view(1, -1),
                         use_cache=True, **{self._cache_kw: cache})
        return out.logits[0].float()


# transformers adds these for the sampling settings the engine applies itself (sampling_probs)
_SAMPLING_PROCESSORS = {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"}
# processors whose output is a function of (input_ids, scores) alone (no state between calls, no second
# model): safe to apply to every tree node with that node's own history (decoding.processors)
TREE_SAFE_PROCESSORS = _SAMPLING_PROCESSORS | {
    "RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor",
    "SequenceBiasLogitsProcessor", "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
    "PrefixConstrainedLogitsProcessor", "ForcedEOSTokenLogitsProcessor", "ForcedBOSTokenLogitsProcessor",
    "InfNanRemoveLogitsProcessor", "ExponentialDecayLengthPenalty", "SuppressTokensLogitsProcessor",
    "SuppressTokensAtBeginLogitsProcessor", "MinPLogitsWarper", "TypicalLogitsWarper", "EpsilonLogitsWarper",
    "EtaLogitsWarper", "TopHLogitsWarper", "LogitNormalization"}
# and these stopping criteria for max_new_tokens / eos, which the engine honours itself
_LENGTH_CRITERIA = {"MaxLengthCriteria", "MaxNewTokensCriteria", "EosTokenCriteria", "MaxTimeCriteria"}


def check_tree_processors(processors) -> None:
    """NotImplementedError naming every processor that cannot be applied per tree node losslessly (one that
    keeps state between calls, needs a second model or an encoder, or that this module does not know)."""
    bad = sorted({type(p).__name__ for p in processors or ()} - TREE_SAFE_PROCESSORS)
    if bad:
        raise NotImplementedError(f"logits processors {bad} cannot be applied along a token tree losslessly (they keep "
                                  "state between calls, need a second model, or are not known to be functions of the "
                                  "sequence and the scores alone); supported: " + ", ".join(sorted(TREE_SAFE_PROCESSORS)))


def logits_processors(model, prompt_len: int, eos=(), **settings):
    """transformers' own ``LogitsProcessorList`` for generation settings (``temperature``, ``top_k``,
    ``top_p``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``, ``bad_words_ids``,
    ``min_p``, ``typical_p``, ... as ``GenerationConfig`` names them; sampling when ``temperature`` > 0),
    in the order ``generate()`` applies them. ``prompt_len``: where new tokens start (min_new_tokens)."""
    from transformers import GenerationConfig

    temp = settings.pop("temperature", 0.0) or 0.0
    fields = {k: v for k, v in settings.items() if v is not None}
    gc = GenerationConfig(do_sample=temp > 0, temperature=temp if temp > 0 else None,
                          eos_token_id=list(eos) or None, pad_token_id=(list(eos) or [0])[0], **fields)
    if gc.top_k is None:
        gc.top_k = 0
    model._prepare_special_tokens(gc, kwargs_has_attention_mask=True, device=device_of(model), batch_size=1)
    procs = model._get_logits_processor(generation_config=gc, input_ids_seq_length=prompt_len,
                                        device=str(device_of(model)))
    check_tree_processors(procs)
    return procs


def generation_settings(generation_config, logits_processor, stopping_criteria, prompt_len: int) -> dict:
    """What a ``generate()`` call asks of speculative decoding: ``max_new_tokens``, ``eos`` (list of ids),
    ``temperature`` (0: greedy), ``top_k``, ``top_p``, and ``processors``: the call's processors when it
    asks for any beyond temperature / top-k / top-p (the whole list, warpers included, in transformers'
    order: the engine applies it per tree node), else None. Raises NotImplementedError naming whatever it
    asks that lossless tree decoding here cannot do (beams, several sequences, stateful logits processors,
    other stopping criteria, a dict output)."""
    gc = generation_config
    refused = []
    if getattr(gc, "num_beams", 1) not in (None, 1):
        refused.append(f"num_beams={gc.num_beams}")
    if getattr(gc, "num_return_sequences", 1) not in (None, 1):
        refused.append(f"num_return_sequences={gc.num_return_sequences}")
    if getattr(gc, "return_dict_in_generate", False):
        refused.append("return_dict_in_generate=True")
    stops = sorted({type(c).__name__ for c in stopping_criteria or ()} - _LENGTH_CRITERIA)
    if stops:
        refused.append(f"stopping criteria {stops}")
    if refused:
        raise NotImplementedError("c2t_fast.generate does not support " + ", ".join(refused) + " (batch-1 lossless "
                                  "tree decoding)")
    check_tree_processors(logits_processor)
    names = {type(p).__name__ for p in logits_processor or ()}
    sample = bool(getattr(gc, "do_sample", False))
    eos = gc.eos_token_id
    return {"max_new_tokens": int(gc.max_length) - prompt_len,
            "eos": [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos],
            "temperature": float(gc.temperature if gc.temperature is not None else 1.0) if sample else 0.0,
            "top_k": int(gc.top_k or 0) if sample else 0, "top_p": float(gc.top_p or 1.0) if sample else 1.0,
            "processors": logits_processor if names - _SAMPLING_PROCESSORS else None}

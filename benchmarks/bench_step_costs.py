"""What one speculative step costs on this machine, SmolLM2-135M-Instruct (fp32) with the shipped head:
the target's tree verification pass as a function of the tree size T (prefix 256, patched attention,
LM head included) with each candidate GEMM for its linear layers, and one draft-head call with the
8,192-id draft vocabulary vs the full 49,152-id LM head. These curves set the speed-up any tree can
reach: tokens per step (1 + τ) against t_verify(T) + t_draft, with t_verify(1) the cost of one plain
decoding step.

The GEMM candidates for the target's few-row linear layers ("impl"), side by side:
- ``skinny``: ``c2t_fast.skinny_linear`` (our C++ kernel; the default on the CPU, ``hf.fast_linear``),
- ``onednn``: oneDNN with weights pre-packed once (``torch.ops.mkldnn._linear_pointwise``),
- ``torch``: ``F.linear`` (MKL sgemm, the stock path),
- ``inductor`` (linear layers alone): ``torch.compile(mode="max-autotune")`` with frozen weights.

Run: pytest benchmarks/bench_step_costs.py --benchmark-enable --benchmark-json=steps.json
     python benchmarks/report.py steps.json
"""

import types

import pytest
import torch
import torch.nn.functional as F

from c2t_fast import ops
from c2t_fast.kernels.skinny_linear import install_fast_linear, remove_fast_linear

PREFIX = 256
TREE_SIZES = [1, 2, 4, 8, 16, 32, 64]
IMPLS = ["skinny", "onednn", "torch"]
ROUNDS = 25


def _onednn_forward(self, x):
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self._c2t_bench_packed, self.bias, "none", [],
                                           "")
    return y.view(*x.shape[:-1], y.shape[-1])


def _route(model, impl: str) -> None:
    """Every linear layer of ``model`` through one candidate (and only that one)."""
    remove_fast_linear(model)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and "forward" in vars(m):  # a previous onednn routing
            del m.forward
    if impl == "skinny":
        install_fast_linear(model)
    elif impl == "onednn":
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                if not hasattr(m, "_c2t_bench_packed"):
                    m._c2t_bench_packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None)
                m.forward = types.MethodType(_onednn_forward, m)


@pytest.fixture(scope="module")
def smollm2():
    from transformers import DynamicCache

    from c2t_fast import patch, unpatch
    from c2t_fast.decoding.drafts.loading import load_draft
    from support import load_smollm2

    model, _ = load_smollm2()
    remove_fast_linear(model)  # the benchmark routes each candidate itself
    patch(model)
    base = model.get_decoder()
    cache = DynamicCache()
    ids = torch.randint(0, 40000, (1, PREFIX), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = base(input_ids=ids, cache=cache, use_cache=True).last_hidden_state[0]
    yield model, cache, ids[0], hidden, load_draft(None, model)
    _route(model, "torch")
    unpatch(model)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", TREE_SIZES)
def bench_target_tree_verification(benchmark, smollm2, T, impl):
    model, cache, _, _, _ = smollm2
    _route(model, impl)
    base, head = model.get_decoder(), model.get_output_embeddings()
    b = ops.build_tree(torch.arange(-1, T - 1, dtype=torch.int32), PREFIX)  # a chain: the shape does not matter
    tokens = torch.randint(0, 40000, (1, T), generator=torch.Generator().manual_seed(T))

    def verify():
        with torch.no_grad():
            h = base(input_ids=tokens, position_ids=b.position_ids[None], cache=cache, use_cache=True,
                     c2t_tree_bits=b.ancestor_bits).last_hidden_state[0]
            out = head(h).argmax(-1)
        cache.crop(-T)
        return out

    benchmark.group = f"SmolLM2 target verification pass, prefix {PREFIX}, T={T}"
    # a fixed, larger number of rounds: this VM's noise comes in bursts of a second or more
    benchmark.pedantic(verify, rounds=ROUNDS, warmup_rounds=2)
    assert cache.get_seq_length() == PREFIX


@pytest.mark.parametrize("impl", ["draft_vocab", "full_vocab"])
@pytest.mark.parametrize("n", [1, 15])
def bench_draft_head_layer(benchmark, smollm2, impl, n):
    model, _, ids, hidden, head = smollm2
    vocab = head.vocab_ids
    assert vocab is not None and vocab.numel() == 8192  # the shipped head drafts over its training ids
    if impl == "full_vocab":
        head.restrict_vocab(None)
    try:
        with torch.no_grad():
            head.prefill(ids, hidden)
            head.root(int(ids[-1]), hidden[-1])
        visible = torch.cat([torch.ones(n, 1, dtype=torch.bool), torch.eye(n, dtype=torch.bool)], 1)
        tokens = torch.arange(100, 100 + n)

        def layer():
            with torch.no_grad():
                out = head.layer_logits(tokens, torch.zeros(n, dtype=torch.int64), visible)
            head._crop(head.n_stable + 1)  # drop the layer again: every round feeds the same one
            head.n_tree, head._outputs = 1, head._outputs[:1]
            return out

        assert layer().shape == (n, 8192 if impl == "draft_vocab" else 49152)
        benchmark.group = f"draft head call (decoder layer + LM head), {n} node(s)"
        benchmark(layer)
    finally:
        head.restrict_vocab(vocab)


# The linear layers alone: SmolLM2's five weight shapes, each as many times as the model has it
# (weights too large for the caches together, as in a forward pass).
SHAPES = [((576, 576), 60), ((192, 576), 60), ((1536, 576), 60), ((576, 1536), 30), ((49152, 576), 1)]


@pytest.fixture(scope="module")
def linear_weights():
    g = torch.Generator().manual_seed(0)
    return {s: [torch.randn(s, generator=g) * 0.02 for _ in range(n)] for s, n in SHAPES}


@pytest.mark.parametrize("impl", ["skinny", "onednn", "torch", "inductor"])
@pytest.mark.parametrize("M", [1, 4, 16, 64])
def bench_linear_layers(benchmark, linear_weights, M, impl):
    x = {K: torch.randn(M, K, generator=torch.Generator().manual_seed(M)) for K in (576, 1536)}
    if impl == "skinny":
        calls = [(lambda w=w: ops.skinny_linear(x[w.shape[1]], w)) for ws in linear_weights.values() for w in ws]
    elif impl == "onednn":
        packed = [(w.shape[1], torch.ops.mkldnn._reorder_linear_weight(w, None))
                  for ws in linear_weights.values() for w in ws]
        calls = [(lambda k=k, p=p: torch.ops.mkldnn._linear_pointwise(x[k], p, None, "none", [], "")) for k, p in packed]
    elif impl == "torch":
        calls = [(lambda w=w: F.linear(x[w.shape[1]], w)) for ws in linear_weights.values() for w in ws]
    else:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights as constants: what lets max-autotune pre-pack them
        calls = []
        for ws in linear_weights.values():
            for w in ws:
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).eval()
                lin.weight.data = w
                f = torch.compile(lin, mode="max-autotune", dynamic=False)
                calls.append(lambda f=f, k=w.shape[1]: f(x[k]))
        with torch.no_grad():
            for c in calls:  # compile outside the timed rounds
                c()

    def run():
        with torch.no_grad():
            for c in calls:
                c()

    benchmark.group = f"SmolLM2's 211 linear layers, {M} row(s)"
    benchmark(run)

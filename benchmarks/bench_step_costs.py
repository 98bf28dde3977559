"""What one speculative step costs on this machine, SmolLM2-135M-Instruct (fp32) with the shipped head:
the target's tree verification pass as a function of the tree size T (prefix 256, patched attention,
LM head included), and one draft-head call with the 8,192-id draft vocabulary vs the full 49,152-id
LM head. These two curves set the speed-up any tree can reach: tokens per step (1 + τ) against
t_verify(T) + t_draft, with t_verify(1) the cost of one plain decoding step.

Run: pytest benchmarks/bench_step_costs.py --benchmark-enable --benchmark-json=steps.json
     python benchmarks/report.py steps.json
"""

import pytest
import torch

from c2t_fast import ops

PREFIX = 256


@pytest.fixture(scope="module")
def smollm2():
    from transformers import DynamicCache

    from c2t_fast import patch, unpatch
    from c2t_fast.decoding.loading import load_draft
    from support import load_smollm2

    model, _ = load_smollm2()
    patch(model)
    base = model.get_decoder()
    cache = DynamicCache()
    ids = torch.randint(0, 40000, (1, PREFIX), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = base(input_ids=ids, cache=cache, use_cache=True).last_hidden_state[0]
    yield model, cache, ids[0], hidden, load_draft(None, model)
    unpatch(model)


@pytest.mark.parametrize("T", [1, 2, 4, 8, 16, 32])
def bench_target_tree_verification(benchmark, smollm2, T):
    model, cache, _, _, _ = smollm2
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

    benchmark.group = f"SmolLM2 target verification pass, prefix {PREFIX}"
    benchmark(verify)
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

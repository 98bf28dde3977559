"""hf.static_batch.StaticBatchLM: the slot-batched static-cache forward equals the model's own forward
(logits, the residual streams entering the feature layers, the last hidden state) for Llama, Qwen2
(biases) and Mistral, through prefill, batched decoding of slots at different lengths, a next turn
appended to a slot, and slot reuse; every GEMM choice agrees; unsupported models and bad calls refused."""

import pytest
import torch

from c2t_fast.hf.static_batch import StaticBatchLM
from support import tiny_causal_lm, tiny_extra_lm

FAMILIES = ["llama", "qwen2", "mistral"]


def _reference(model, ids):
    with torch.no_grad():
        out = model(ids[None], output_hidden_states=True)
    return out.logits[0], out.hidden_states


@pytest.mark.parametrize("kv_dtype", [None, torch.float16])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_decode_and_next_turn_equal_the_models_forward(family, kv_dtype):
    model = tiny_causal_lm(family, heads=6, kv_heads=2, layers=3)
    lm = StaticBatchLM(model, 3, 64, feature_layers=(0, 2), kv_dtype=kv_dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if kv_dtype is None else dict(rtol=2e-2, atol=2e-2)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (12, 20, 7)]
    cut = [5, 11, 2]  # prefill this much, append a "next turn" prefill of 2, decode the rest one by one
    decoded = {s: [] for s in range(3)}
    for s, ids in enumerate(seqs):
        out = lm.prefill(s, ids[:cut[s]])
        logits, hs = _reference(model, ids[:cut[s]])
        torch.testing.assert_close(out.logits[0], logits[-1], **tol)
        torch.testing.assert_close(out.features, torch.cat([hs[0][0], hs[2][0]], -1), **tol)
        out = lm.prefill(s, ids[cut[s]:cut[s] + 2], logits_at=torch.tensor([0, 1]))
        torch.testing.assert_close(out.logits, _reference(model, ids[:cut[s] + 2])[0][-2:], **tol)
    steps = max(len(x) - c - 2 for x, c in zip(seqs, cut))
    for j in range(steps):
        pos = [cut[s] + 2 + j for s in range(3)]
        active = [p < len(seqs[s]) for s, p in enumerate(pos)]
        toks = torch.tensor([seqs[s][p] if a else 0 for s, (p, a) in enumerate(zip(pos, active))])
        out = lm.decode(toks, active)
        for s, a in enumerate(active):
            if a:
                decoded[s].append((pos[s], out.logits[s], out.features[s], out.hidden[s]))
    for s, ids in enumerate(seqs):
        logits, hs = _reference(model, ids)
        for p, lg, feat, _ in decoded[s]:
            torch.testing.assert_close(lg, logits[p], **tol)
            torch.testing.assert_close(feat, torch.cat([hs[0][0, p], hs[2][0, p]]), **tol)
        assert lm.lengths[s] == len(ids)
    # a slot is reused after reset: the new conversation sees nothing of the old one
    lm.reset(1)
    ids = torch.randint(0, 97, (9,), generator=g)
    out = lm.prefill(1, ids)
    torch.testing.assert_close(out.logits[0], _reference(model, ids)[0][-1], **tol)


def test_last_hidden_state_is_post_norm():
    model = tiny_causal_lm("llama")
    lm = StaticBatchLM(model, 1, 32)
    ids = torch.randint(0, 97, (10,))
    with torch.no_grad():
        want = model.model(ids[None]).last_hidden_state[0]
    torch.testing.assert_close(lm.prefill(0, ids).hidden, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("linear", ["torch", "skinny", "mkl_packed", "auto"])
def test_every_gemm_choice_agrees(linear):
    from c2t_fast.hf.static_batch import _gemm_candidates

    if linear not in _gemm_candidates() + ("auto",):
        pytest.skip(f"{linear} is not in this torch build")
    model = tiny_causal_lm("qwen2")
    lm = StaticBatchLM(model, 4, 32, linear=linear)
    ref = StaticBatchLM(model, 4, 32, linear="torch")
    for s in range(4):
        ids = torch.randint(0, 97, (3 + s,))
        lm.prefill(s, ids)
        ref.prefill(s, ids)
    toks = torch.randint(0, 97, (4,))
    torch.testing.assert_close(lm.decode(toks).logits, ref.decode(toks).logits, rtol=1e-4, atol=1e-4)
    again = StaticBatchLM(model, 4, 32, linear=lm.linear_choice())  # an earlier run's choice is taken as given
    assert again.linear_choice() == lm.linear_choice()


def test_a_slots_row_does_not_depend_on_the_other_slots():
    """Bit for bit: a job restarted next to other jobs writes the same tokens."""
    model = tiny_causal_lm("llama", layers=2)
    ids = torch.randint(0, 97, (6,))
    rows = []
    for other in range(2):
        lm = StaticBatchLM(model, 3, 32, feature_layers=(1,), linear="mkl_packed" if torch._C.has_mkl else "torch")
        lm.prefill(1, ids)
        for s in (0, 2):
            lm.prefill(s, torch.randint(0, 97, (4 + 5 * other + s,)))
        out = lm.decode(torch.tensor([5 + other, 7, 11 - other]))
        rows.append((out.logits[1], out.features[1]))
    assert torch.equal(rows[0][0], rows[1][0]) and torch.equal(rows[0][1], rows[1][1])


def test_refusals():
    with pytest.raises(ValueError, match="model_type"):
        StaticBatchLM(tiny_extra_lm("gemma3"), 2, 16)
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="slots"):
        StaticBatchLM(model, 0, 16)
    with pytest.raises(ValueError, match="feature_layers"):
        StaticBatchLM(model, 2, 16, feature_layers=(5,))
    with pytest.raises(ValueError, match="linear"):
        StaticBatchLM(model, 2, 16, linear="fastest")
    with pytest.raises(ValueError, match="kv_dtype"):
        StaticBatchLM(model, 2, 16, kv_dtype=torch.int8)
    lm = StaticBatchLM(model, 2, 16)
    with pytest.raises(ValueError, match="slot"):
        lm.prefill(2, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="ids"):
        lm.prefill(0, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="capacity"):
        lm.prefill(0, torch.zeros(17, dtype=torch.int64))
    with pytest.raises(ValueError, match="tokens"):
        lm.decode(torch.zeros(3, dtype=torch.int64))
    lm.prefill(0, torch.zeros(16, dtype=torch.int64))
    with pytest.raises(ValueError, match="full"):
        lm.decode(torch.zeros(2, dtype=torch.int64))
    assert lm.lengths == [16, 0]  # nothing advanced by the refused calls

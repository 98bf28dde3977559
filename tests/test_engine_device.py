"""The engine keeps every tensor of a step on the target's device: run on a simulated GPU
(tests/device_check.py: tensors that report ``cuda`` and hold CPU data; any op that would mix devices on
a real GPU raises), every strategy and draft gives exactly the CPU output, greedy and sampled."""

import copy

import pytest
import torch

from c2t_fast.decoding.drafts import DraftLM, EagleDraftHead
from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.decoding.strategies import Chain
from device_check import DeviceMismatch, OnDevice, SimulatedCuda, to_simulated_cuda
from support import tiny_causal_lm, tiny_strategies

PROMPT = torch.randint(0, 97, (10,), generator=torch.Generator().manual_seed(3))


def _strategy(name):
    return tiny_strategies(k=3, depth=2, total=10)[name]


def _pair(draft_kind, vocab_restricted=False):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    if draft_kind == "head":
        draft = EagleDraftHead(target.config).attach(target)
        if vocab_restricted:
            draft.restrict_vocab(torch.arange(0, 97, 2))
    else:
        draft = DraftLM(tiny_causal_lm("llama", 4, 2, seed=2))
    return target, draft


def _run(target, draft, strategy, **kw):
    gen = SpeculativeGenerator(target, draft, strategy, eos_token_id=[], budget=None, ngram=None)
    return gen.generate(PROMPT, max_new_tokens=14, **kw).tokens


@pytest.mark.parametrize("draft_kind", ["head", "head_vocab", "lm"])
@pytest.mark.parametrize("strategy", ["chain", "chain_c2t", "static", "eagle2", "c2t"])
def test_engine_on_a_simulated_gpu_equals_the_cpu_run(draft_kind, strategy):
    target, draft = _pair(draft_kind.split("_")[0], vocab_restricted=draft_kind == "head_vocab")
    greedy = _run(target, draft, _strategy(strategy))
    sampled = _run(target, draft, _strategy(strategy), temperature=1.0, seed=5)
    gpu_target, gpu_draft = copy.deepcopy((target, draft))
    if isinstance(gpu_draft, EagleDraftHead):
        gpu_draft.attach(gpu_target)
    to_simulated_cuda(gpu_target)
    to_simulated_cuda(gpu_draft)
    assert isinstance(gpu_target.lm_head.weight, OnDevice)
    with torch.no_grad(), SimulatedCuda() as mode:
        if isinstance(gpu_draft, EagleDraftHead) and gpu_draft.vocab_ids is not None:
            gpu_draft.restrict_vocab(gpu_draft.vocab_ids)  # re-copy the LM-head rows from the moved head
        assert _run(gpu_target, gpu_draft, _strategy(strategy)) == greedy
        assert _run(gpu_target, gpu_draft, _strategy(strategy), temperature=1.0, seed=5) == sampled
    assert mode.calls_checked > 1000  # the whole step ran under the checks


def test_the_simulated_gpu_catches_device_mixing():
    target, _ = _pair("lm")
    to_simulated_cuda(target)
    with torch.no_grad(), SimulatedCuda():
        ids = PROMPT[None]
        with pytest.raises(DeviceMismatch):
            target(input_ids=ids)  # CPU ids into a "GPU" model
        x = torch.zeros(3).to("cuda")
        with pytest.raises(DeviceMismatch):
            torch.ops.c2t_fast.verify_greedy(torch.zeros(2, dtype=torch.long).to("cuda"),
                                             torch.tensor([-1, 0], dtype=torch.int32), x.long()[:2])
        assert (x + torch.tensor(1.0)).device.type == "cuda"  # a 0-dim CPU tensor is fine, as on CUDA


def test_a_draft_on_another_device_is_refused_at_construction():
    target, draft = _pair("lm")
    to_simulated_cuda(target)
    with torch.no_grad(), SimulatedCuda():
        with pytest.raises(ValueError, match="move the draft"):
            SpeculativeGenerator(target, draft, Chain(3), budget=None, ngram=None)

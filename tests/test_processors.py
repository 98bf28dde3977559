"""transformers' logits processors along the tree: every node's scores processed with its own history,
so greedy decoding equals stock ``generate()`` with the same processors token for token (engine, door, CLI
settings), sampling follows the processed law (chi-square), and processors that cannot be lossless are
refused by name."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import c2t_fast
from c2t_fast.decoding.drafts import DraftLM, EagleDraftHead
from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.decoding.processors import TreeProcessor
from c2t_fast.decoding.strategies import Eagle2
from c2t_fast.hf.adapter import logits_processors
from support import tiny_causal_lm, tiny_strategies

PROMPT = torch.tensor([3, 17, 3, 17, 3, 22, 5, 61, 9])
SETTINGS = [  # greedy: each alone, and together
    {"repetition_penalty": 1.8},
    {"no_repeat_ngram_size": 2},
    {"min_new_tokens": 12},
    {"bad_words_ids": [[17], [40, 41]]},
    {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "bad_words_ids": [[5]], "min_new_tokens": 6},
]


def _twins():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    return target, DraftLM(tiny_causal_lm("llama", 6, 2, seed=1))  # the target's twin: long accepted paths


def _stock(target, settings, n, eos):
    with torch.no_grad():
        out = target.generate(PROMPT[None], do_sample=False, max_new_tokens=n, pad_token_id=0, eos_token_id=eos,
                              **settings)
    return out[0, PROMPT.numel():].tolist()


def test_tree_processor_gives_each_node_its_own_history():
    seen = []

    def proc(ids, scores):
        seen.extend(map(tuple, ids.tolist()))
        return scores + ids[:, -1:].float()  # depends on the node's last token

    tokens = torch.tensor([7, 1, 2, 3, 4])
    parents = [-1, 0, 0, 1, 3]
    logits = torch.zeros(5, 10)
    out = TreeProcessor(proc)([9, 7], tokens, parents, logits)
    assert sorted(seen) == sorted([(9, 7), (9, 7, 1), (9, 7, 2), (9, 7, 1, 3), (9, 7, 1, 3, 4)])
    assert out[:, 0].tolist() == [7, 1, 2, 3, 4]


@pytest.mark.parametrize("strategy", ["chain", "eagle2", "c2t"])
@pytest.mark.parametrize("settings", SETTINGS)
def test_greedy_equals_stock_generate_with_the_same_processors(settings, strategy):
    target, draft = _twins()
    eos = [11]
    want = _stock(target, settings, 24, eos)
    procs = logits_processors(target, PROMPT.numel(), eos=eos, **settings)
    gen = SpeculativeGenerator(target, draft, tiny_strategies(k=3, depth=3, total=12)[strategy], eos_token_id=eos,
                               budget=None, ngram=4)
    got = gen.generate(PROMPT, 24, logits_processor=procs).tokens
    assert got == want
    plain = gen.generate(PROMPT, 24).tokens  # without them the tokens differ (the processors matter here)
    assert plain != want or settings == {"min_new_tokens": 12}


def test_the_door_applies_the_calls_processors():
    target, _ = _twins()
    head = EagleDraftHead(target.config).attach(target).eval()
    kw = dict(do_sample=False, max_new_tokens=20, pad_token_id=0, repetition_penalty=1.5, no_repeat_ngram_size=2,
              min_new_tokens=5, eos_token_id=11)
    want = target.generate(PROMPT[None], **kw)
    got = target.generate(PROMPT[None], **kw, custom_generate=c2t_fast.generate, draft=head)  # default settings
    assert got.tolist() == want.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{"repetition_penalty": 2.0}, {"min_p": 0.15}, {"typical_p": 0.6},
                                      {"no_repeat_ngram_size": 2}])
def test_sampling_follows_the_processed_law(settings):
    V, N = 5, 1500
    target = tiny_causal_lm("llama", 4, 2, seed=3, vocab=V)
    draft = DraftLM(tiny_causal_lm("llama", 4, 2, seed=4, vocab=V))
    prompt = torch.tensor([1, 2, 3, 4, 0, 1])
    procs = logits_processors(target, prompt.numel(), temperature=0.9, **settings)
    # the law of the first two tokens under the processed distribution, computed with the processors themselves
    with torch.no_grad():
        p1 = torch.softmax(procs(prompt[None], target(prompt[None]).logits[0, -1:].float()), -1)[0]
        joint = []
        for a in range(V):
            ctx = torch.cat([prompt, torch.tensor([a])])
            p2 = torch.softmax(procs(ctx[None], target(ctx[None]).logits[0, -1:].float()), -1)[0]
            joint.append(p1[a] * p2)
    joint = torch.cat(joint).double().numpy()
    gen = SpeculativeGenerator(target, draft, Eagle2(top_k=2, depth=2, total_tokens=5), eos_token_id=[], budget=None,
                               ngram=None)
    counts = np.zeros(V * V)
    for seed in range(N):
        a, b = gen.generate(prompt, 2, temperature=0.9, seed=seed, logits_processor=procs).tokens[:2]
        counts[a * V + b] += 1
    keep = joint > 0
    assert counts[~keep].sum() == 0  # nothing the processors forbid
    assert chisquare(counts[keep], joint[keep] / joint[keep].sum() * N).pvalue > 1e-3


def test_what_cannot_be_lossless_is_refused_by_name():
    target, draft = _twins()
    gen = SpeculativeGenerator(target, draft, Eagle2(top_k=2, depth=2, total_tokens=5), budget=None, ngram=None)

    class Stateful:
        def __call__(self, ids, scores):
            return scores

    with pytest.raises(NotImplementedError, match="Stateful"):
        gen.generate(PROMPT, 4, logits_processor=[Stateful()])
    procs = logits_processors(target, PROMPT.numel(), temperature=0.7, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        gen.generate(PROMPT, 4, temperature=0.7, top_k=5, logits_processor=procs)
    head = EagleDraftHead(target.config).attach(target).eval()
    with pytest.raises(NotImplementedError, match="UnbatchedClassifierFreeGuidance"):
        target.generate(PROMPT[None], max_new_tokens=4, pad_token_id=0, guidance_scale=1.5,
                        custom_generate=c2t_fast.generate, draft=head)


def test_the_cli_applies_the_processor_flags(capsys):
    from c2t_fast.cli import main
    from support import load_smollm2

    model, tok = load_smollm2()
    prompt = "List three fruits."
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    want = model.generate(ids, do_sample=False, max_new_tokens=16, pad_token_id=0, repetition_penalty=1.6,
                          no_repeat_ngram_size=2, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    assert main(["generate", "--prompt", prompt, "--max-new-tokens", "16", "--repetition-penalty", "1.6",
                 "--no-repeat-ngram-size", "2", "--budget", "none", "--no-baseline"]) == 0
    text = capsys.readouterr().out.split("\ntau ")[0]  # the streamed text, then the metrics line
    assert text == tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True)

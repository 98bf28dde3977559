"""``model.generate(..., custom_generate=c2t_fast.generate, draft=..., strategy=...)``: the same tokens as
the engine and as the target's own greedy generate(), the call's settings honoured, what it cannot do
refused."""

import pytest
import torch

import c2t_fast
from c2t_fast.decoding.drafts import EagleDraftHead
from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.decoding.strategies import Chain
from support import load_smollm2, tiny_causal_lm, tiny_strategies

PROMPT = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(7))


class Recorder:
    """A streamer (transformers' BaseStreamer interface: put, end)."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.view(-1).tolist())

    def end(self):
        self.ended = True


def _pair():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    torch.manual_seed(0)
    return target, EagleDraftHead(target.config).attach(target).eval()


@pytest.mark.parametrize("strategy", ["chain", "chain_c2t", "static", "eagle2", "c2t"])
def test_greedy_generate_returns_the_targets_own_output(strategy):
    target, head = _pair()
    strategy = tiny_strategies(k=3, depth=2, total=10)[strategy]
    want = target.generate(PROMPT, do_sample=False, max_new_tokens=14, pad_token_id=0)
    got = target.generate(PROMPT, do_sample=False, max_new_tokens=14, pad_token_id=0, custom_generate=c2t_fast.generate,
                          draft=head, strategy=strategy)
    assert got.tolist() == want.tolist() and got.shape == (1, 9 + 14)


def test_eos_and_the_streamer_are_honoured():
    target, head = _pair()
    plain = target.generate(PROMPT, do_sample=False, max_new_tokens=14, pad_token_id=0)[0, 9:].tolist()
    eos = plain[5]
    want = target.generate(PROMPT, do_sample=False, max_new_tokens=14, pad_token_id=0, eos_token_id=eos)
    rec = Recorder()
    got = target.generate(PROMPT, do_sample=False, max_new_tokens=14, pad_token_id=0, eos_token_id=eos,
                          custom_generate=c2t_fast.generate, draft=head, strategy=Chain(3), text_streamer=rec)
    assert got.tolist() == want.tolist() and got[0, -1].item() == eos
    assert rec.chunks[0] == PROMPT[0].tolist() and sum(rec.chunks[1:], []) == got[0, 9:].tolist() and rec.ended


def test_sampling_uses_the_calls_settings_and_torch_seed():
    target, head = _pair()
    kw = dict(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=12, pad_token_id=0,
              custom_generate=c2t_fast.generate, draft=head, strategy=Chain(2), budget=None, ngram=None)
    torch.manual_seed(3)
    a = target.generate(PROMPT, **kw)
    torch.manual_seed(3)
    b = target.generate(PROMPT, **kw)
    assert a.tolist() == b.tolist()
    # the same run through the engine, with the seed the front door drew and the call's warpers
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    gen = SpeculativeGenerator(target, head, Chain(2), eos_token_id=target.generation_config.eos_token_id, budget=None, ngram=None)
    out = gen.generate(PROMPT[0], max_new_tokens=12, temperature=0.7, top_k=5, top_p=0.9, seed=seed).tokens
    assert a[0, 9:].tolist() == out


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"guidance_scale": 1.5}, NotImplementedError, "UnbatchedClassifierFreeGuidanceLogitsProcessor"),
    ({"num_return_sequences": 2, "do_sample": True}, NotImplementedError, "num_return_sequences=2"),
    ({"return_dict_in_generate": True}, NotImplementedError, "return_dict_in_generate"),
    ({"stop_strings": ["x"]}, ValueError, "stop strings"),  # transformers' own refusal (no tokenizer given)
    ({"draft": None}, ValueError, "needs draft="),
])
def test_what_it_cannot_do_is_refused(kwargs, error, needle):
    target, head = _pair()
    call = {"do_sample": False, "max_new_tokens": 5, "pad_token_id": 0, "custom_generate": c2t_fast.generate,
            "draft": head, "strategy": Chain(2), **kwargs}
    with pytest.raises(error, match=needle):
        target.generate(PROMPT, **call)


def test_a_left_padded_batch_decodes_each_row_as_stock_generate():
    target, head = _pair()
    rows = [PROMPT[0].tolist(), PROMPT[0, 3:].tolist(), [5, 6, 7, 8]]
    n = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=9, pad_token_id=0)
    want = target.generate(ids, **kw)
    got = target.generate(ids, custom_generate=c2t_fast.generate, draft=head, strategy=Chain(2), budget=None,
                          ngram=None, **kw)
    assert got.tolist() == want.tolist()
    one = target.generate(ids[1:2], attention_mask=mask[1:2], custom_generate=c2t_fast.generate, draft=head,
                          strategy=Chain(2), budget=None, ngram=None, do_sample=False, max_new_tokens=9, pad_token_id=0)
    assert one.tolist() == target.generate(ids[1:2], attention_mask=mask[1:2], do_sample=False, max_new_tokens=9,
                                           pad_token_id=0).tolist()  # one padded row: the batched engine too


def test_what_a_batch_cannot_do_is_refused():
    target, head = _pair()
    kw = dict(do_sample=False, max_new_tokens=5, pad_token_id=0, custom_generate=c2t_fast.generate, draft=head,
              strategy=Chain(2), budget=None, ngram=None)
    with pytest.raises(ValueError, match="temperature / top-k / top-p only"):
        target.generate(PROMPT.repeat(2, 1), repetition_penalty=1.3, **kw)
    with pytest.raises(ValueError, match="takes no streamer"):
        target.generate(PROMPT.repeat(2, 1), text_streamer=Recorder(), **kw)
    mask = torch.ones_like(PROMPT)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        target.generate(PROMPT, attention_mask=mask, **kw)


def test_transformers_text_streamers_receive_the_reply():
    from threading import Thread

    from transformers import TextIteratorStreamer, TextStreamer

    tok = load_smollm2()[1]
    target, head = _pair()
    kw = dict(do_sample=False, max_new_tokens=12, pad_token_id=0, custom_generate=c2t_fast.generate, draft=head,
              strategy=Chain(3))
    out = target.generate(PROMPT, **kw)
    want = tok.decode(out[0, 9:], skip_special_tokens=True)
    it = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    worker = Thread(target=target.generate, args=(PROMPT,), kwargs={**kw, "text_streamer": it})
    worker.start()
    text = "".join(it)
    worker.join()
    assert text == want

    printed = []

    class Capture(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            printed.append(text)

    target.generate(PROMPT, **kw, text_streamer=Capture(tok, skip_prompt=True, skip_special_tokens=True))
    assert "".join(printed) == want

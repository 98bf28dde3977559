"""wisca_fast.apply on real model families, optimizer state, LoRA, schedule and callback."""

import copy
import logging

import pytest
import torch
import transformers

import wisca_fast
from support import tiny_causal_lm, tiny_extra_lm

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _pair_norms(model):
    spec = wisca_fast.find_attention(model)
    return [(lay.q.weight().abs().sum().item(), lay.k.weight().abs().sum().item(),
             lay.v.weight().abs().sum().item(), lay.o.weight().abs().sum().item()) for lay in spec.layers]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_function_preserved(family, heads, granularity):
    model = tiny_causal_lm(family, *heads, seed=sum(heads))
    before = _logits(model)
    factors = wisca_fast.apply(model, granularity=granularity)
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    g = heads[0] // heads[1]
    assert factors.shape == ((2, 2) if granularity == "tensor" else (2, 2, heads[1], 16))
    if granularity == "tensor":
        for q, k, v, o in _pair_norms(model):
            assert abs(q - k) / q < 1e-5 and abs(v - o) / v < 1e-5
        if g == 8:  # equal-std init: s ~ sqrt(1/g), t ~ sqrt(g) (wisca-method.md 3.4)
            assert 0.2 < factors[:, 0].mean() < 0.6 and 1.5 < factors[:, 1].mean() < 4.5


def test_qwen2_biases_are_scaled():
    model = tiny_causal_lm("qwen2", 6, 2, seed=1)
    bq = model.model.layers[0].self_attn.q_proj.bias.clone()
    f = wisca_fast.apply(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.bias, bq * f[0, 0], rtol=1e-6, atol=1e-7)


def test_gemma3_skips_qk_with_one_warning(caplog):
    model = tiny_extra_lm("gemma3")
    before = _logits(model)
    wk = model.model.layers[0].self_attn.k_proj.weight.clone()
    with caplog.at_level(logging.WARNING, logger="wisca_fast"):
        f = wisca_fast.apply(model)
        wisca_fast.apply(model)
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, wk)  # Q/K untouched
    assert (f[:, 0] == 1).all() and (f[:, 1] != 1).all()
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)
    assert sum("QK-norm" in r.message for r in caplog.records) <= 1


def test_phi3_fused_qkv():
    model = tiny_extra_lm("phi3")
    before = _logits(model)
    wisca_fast.apply(model)
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    for q, k, v, o in _pair_norms(model):
        assert abs(q - k) / q < 1e-5 and abs(v - o) / v < 1e-5


def test_unsupported_model_error():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="found: .*attn"):
        wisca_fast.apply(gpt2)


def _adam_step(model, opt):
    loss = model(IDS, labels=IDS).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("fused", [None, "foreach", "fused"])
def test_optimizer_state_rescale_keeps_adam_steps(fused):
    """After a transition with state 'rescale' the next AdamW update of every weight equals the update
    it would have had without the transition; with 'keep' it does not."""
    kw = {"foreach": True} if fused == "foreach" else {"fused": True} if fused == "fused" else {}
    base = tiny_causal_lm("llama", 8, 2, seed=3)
    opt = torch.optim.AdamW(base.parameters(), lr=1e-2, weight_decay=0.0, eps=1e-12, **kw)
    _adam_step(base, opt)
    runs = {}
    for mode in ("none", "rescale", "keep"):
        model = copy.deepcopy(base)
        o = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, eps=1e-12, **kw)
        o.load_state_dict(copy.deepcopy(opt.state_dict()))  # state tensors would be shared otherwise
        if mode != "none":
            wisca_fast.apply(model, o, optimizer_state=mode)
        w0 = model.model.layers[0].self_attn.q_proj.weight.clone()
        _adam_step(model, o)
        runs[mode] = model.model.layers[0].self_attn.q_proj.weight - w0
    torch.testing.assert_close(runs["rescale"], runs["none"], rtol=1e-3, atol=1e-6)
    assert not torch.allclose(runs["keep"], runs["none"], rtol=1e-2, atol=1e-6)


def test_optimizer_state_reset_and_bad_optimizer():
    model = tiny_causal_lm("llama", seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _adam_step(model, opt)
    wisca_fast.apply(model, opt, optimizer_state="reset")
    q = model.model.layers[0].self_attn.q_proj.weight
    assert (opt.state[q]["exp_avg"] == 0).all()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    _adam_step(model, sgd)
    with pytest.raises(ValueError, match="Adam-family state"):
        wisca_fast.apply(model, sgd)
    with pytest.raises(ValueError, match="optimizer_state must be"):
        wisca_fast.apply(model, opt, optimizer_state="drop")


def _lora_model(zero_b=False):
    from peft import LoraConfig, get_peft_model

    model = tiny_causal_lm("llama", 8, 2, seed=5)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"]))
    if not zero_b:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return peft_model


def test_lora_effective_weights():
    model = _lora_model()
    before = _logits(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _adam_step(model, opt)
    before = _logits(model)
    f = wisca_fast.apply(model, opt, lora="effective")
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    spec = wisca_fast.find_attention(model)
    for lay in spec.layers:  # the effective pairs are balanced
        eff = {n: (p.weight() + p.lora[0].scaling * p.lora[0].B.weight @ p.lora[0].A.weight).abs().sum().item()
               for n, p in (("q", lay.q), ("k", lay.k), ("v", lay.v), ("o", lay.o))}
        assert abs(eff["q"] - eff["k"]) / eff["q"] < 1e-4 and abs(eff["v"] - eff["o"]) / eff["v"] < 1e-4
    assert f.shape == (2, 2)


def test_lora_adapter_balancing_skips_zero_b():
    model = _lora_model(zero_b=True)
    f = wisca_fast.apply(model, lora="adapter")
    assert (f == 1).all()  # every B is still zero: nothing to balance
    model = _lora_model()
    before = _logits(model)
    f = wisca_fast.apply(model, lora="adapter")
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    spec = wisca_fast.find_attention(model)
    ad = spec.layers[0].q.lora[0]
    assert abs(ad.A.weight.abs().sum() - ad.B.weight.abs().sum()) / ad.A.weight.abs().sum() < 1e-4
    assert (f != 1).all()


def test_scheduler_counts_steps():
    model = tiny_causal_lm("llama", seed=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = wisca_fast.WiscaScheduler(model, opt, every=3)
    for _ in range(7):
        _adam_step(model, opt)
        sched.step()
    assert [s for s, _ in sched.history] == [0, 3, 6]
    with pytest.raises(ValueError, match="every must be"):
        wisca_fast.WiscaScheduler(model, opt, every=-1)


def test_trainer_callback_counts_optimizer_steps(tmp_path):
    model = tiny_causal_lm("llama", seed=7)
    model.config.pad_token_id = 0
    data = [{"input_ids": IDS[0], "labels": IDS[0]} for _ in range(32)]
    cb = wisca_fast.WiscaCallback(every=2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=3, learning_rate=1e-3, report_to=[],
                                          use_cpu=True, save_strategy="no", logging_steps=100, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    assert cb.transitions == [0, 2, 4]
    logged = [h for h in trainer.state.log_history if "wisca/s_mean" in h]
    assert [h["step"] for h in logged] == [0, 2, 4]

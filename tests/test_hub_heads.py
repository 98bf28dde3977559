"""Published EAGLE heads, without a download: synthetic checkpoints written in exactly the hub layouts
(this file documents every key and shape), loaded for tiny targets of each supported family, and
checked against an independent forward of each architecture written here from the papers' equations.

EAGLE-1/2 (``yuhuili/EAGLE-*``), H = hidden size, D = head dim, Hq / Hkv heads, I = MLP width:
    config.json: one-layer LlamaForCausalLM config (+ ``bias``: fc bias, ``qkv_bias``: q/k/v biases)
    fc.weight [H, 2H], fc.bias [H]
    layers.0.self_attn.q_proj.weight [Hq*D, H]   k_proj / v_proj [Hkv*D, H]   o_proj [H, Hq*D]
    layers.0.self_attn.{q,k,v}_proj.bias         (qkv_bias only)
    layers.0.mlp.gate_proj / up_proj [I, H], down_proj [H, I]
    layers.0.post_attention_layernorm.weight [H]  (no input_layernorm: the input norm is the identity)
    embed_tokens.weight [V, H]                    (optional; else the target's)
EAGLE-3 (``yuhuili/EAGLE3-*``; ``layers.0.`` instead of ``midlayer.`` in vLLM's speculators format):
    config.json: + draft_vocab_size, target_hidden_size (Ht)
    fc.weight [H, 3*Ht]
    midlayer.input_layernorm.weight [H], midlayer.hidden_norm.weight [H], midlayer.post_attention_layernorm [H]
    midlayer.self_attn.q_proj.weight [Hq*D, 2H]  k_proj / v_proj [Hkv*D, 2H]  o_proj [H, Hq*D]
    midlayer.mlp.gate_proj / up_proj [I, H], down_proj [H, I]
    norm.weight [H], lm_head.weight [draft_vocab, H]
    d2t int64 [draft_vocab] (target id = i + d2t[i]), t2d bool [V]
"""

import json
import math

import pytest
import torch

from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.decoding.drafts.hub import Eagle3DraftHead, head_format
from c2t_fast.decoding.drafts.loading import load_draft
from c2t_fast.decoding.strategies import C2T, Chain, Eagle2
from c2t_fast.hf.adapter import TargetAdapter
from support import tiny_causal_lm

FAMILIES = ["llama", "qwen2", "mistral"]
EPS = 1e-6


def _cfg(target, **extra):
    tc = target.config
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": tc.hidden_size,
            "intermediate_size": 48, "num_attention_heads": tc.num_attention_heads,
            "num_key_value_heads": tc.num_key_value_heads, "num_hidden_layers": 1, "vocab_size": tc.vocab_size,
            "rms_norm_eps": EPS, "rope_theta": 10000.0, "max_position_embeddings": 512, "hidden_act": "silu",
            **extra}


def _r(*shape, gen, s=0.2):
    return torch.randn(*shape, generator=gen) * s


def _attn_weights(prefix, cfg, in_dim, gen, qkv_bias=False):
    H, hq, hkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = H // hq
    w = {f"{prefix}self_attn.q_proj.weight": _r(hq * D, in_dim, gen=gen), f"{prefix}self_attn.k_proj.weight":
         _r(hkv * D, in_dim, gen=gen), f"{prefix}self_attn.v_proj.weight": _r(hkv * D, in_dim, gen=gen),
         f"{prefix}self_attn.o_proj.weight": _r(H, hq * D, gen=gen)}
    if qkv_bias:
        for p, n in (("q", hq), ("k", hkv), ("v", hkv)):
            w[f"{prefix}self_attn.{p}_proj.bias"] = _r(n * D, gen=gen)
    I = cfg["intermediate_size"]
    w.update({f"{prefix}mlp.gate_proj.weight": _r(I, H, gen=gen), f"{prefix}mlp.up_proj.weight": _r(I, H, gen=gen),
              f"{prefix}mlp.down_proj.weight": _r(H, I, gen=gen),
              f"{prefix}post_attention_layernorm.weight": 1 + _r(H, gen=gen)})
    return w


def write_eagle1(path, target, qkv_bias=False, own_embed=False, fmt="safetensors", seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = _cfg(target, bias=True, **({"qkv_bias": True} if qkv_bias else {}))
    H = cfg["hidden_size"]
    w = {"fc.weight": _r(H, 2 * H, gen=gen), "fc.bias": _r(H, gen=gen), **_attn_weights("layers.0.", cfg, H, gen, qkv_bias)}
    if own_embed:
        w["embed_tokens.weight"] = _r(cfg["vocab_size"], H, gen=gen, s=1.0)
    _save(path, cfg, w, fmt)
    return cfg, w


def write_eagle3(path, target, draft_vocab=None, prefix="midlayer.", own_embed=False, layers=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    V, H = target.config.vocab_size, target.config.hidden_size
    dv = draft_vocab or V
    cfg = _cfg(target, draft_vocab_size=dv, target_hidden_size=H,
               architectures=["LlamaForCausalLMEagle3"], **({"eagle_aux_hidden_state_layer_ids": layers} if layers else {}))
    w = {"fc.weight": _r(H, 3 * H, gen=gen), **_attn_weights(prefix, cfg, 2 * H, gen),
         f"{prefix}input_layernorm.weight": 1 + _r(H, gen=gen), f"{prefix}hidden_norm.weight": 1 + _r(H, gen=gen),
         "norm.weight": 1 + _r(H, gen=gen), "lm_head.weight": _r(dv, H, gen=gen, s=1.0)}
    hot = torch.randperm(V, generator=gen)[:dv].sort().values  # the draft vocabulary, as EAGLE-3 trains it
    w["d2t"] = hot - torch.arange(dv)
    w["t2d"] = torch.zeros(V, dtype=torch.bool).index_fill_(0, hot, True)
    if own_embed:
        w["embed_tokens.weight"] = _r(V, H, gen=gen, s=1.0)
    _save(path, cfg, w, "safetensors")
    return cfg, w


def _save(path, cfg, w, fmt):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in w.items()}, str(path / "model.safetensors"))
    else:
        torch.save(w, str(path / "pytorch_model.bin"))


# -- an independent forward of each architecture ------------------------------------------------------

def _rms(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def _rope(x, pos, D, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2).double() / D)
    f = pos[:, None].double() * inv[None]
    cos, sin = torch.cat([f, f], -1).cos()[:, None], torch.cat([f, f], -1).sin()[:, None]
    return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin


def _layer(x_attn, residual, w, p, cfg, pos):
    """Causal attention over x_attn [n, Din] (+ residual), then the Llama MLP; fp64."""
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg["hidden_size"] // hq
    n = x_attn.shape[0]

    def proj(name, heads):
        y = x_attn @ w[f"{p}self_attn.{name}_proj.weight"].double().T
        if f"{p}self_attn.{name}_proj.bias" in w:
            y = y + w[f"{p}self_attn.{name}_proj.bias"].double()
        return y.view(n, heads, D)

    q, k, v = _rope(proj("q", hq), pos, D), _rope(proj("k", hkv), pos, D), proj("v", hkv)
    k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    s = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(D)
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    a = torch.einsum("hij,jhd->ihd", s.softmax(-1), v).reshape(n, hq * D) @ w[f"{p}self_attn.o_proj.weight"].double().T
    h = residual + a
    m = _rms(h, w[f"{p}post_attention_layernorm.weight"].double())
    gate, up = m @ w[f"{p}mlp.gate_proj.weight"].double().T, m @ w[f"{p}mlp.up_proj.weight"].double().T
    return h + (torch.nn.functional.silu(gate) * up) @ w[f"{p}mlp.down_proj.weight"].double().T


def ref_eagle1(w, cfg, emb, lm_head, tokens, feats):
    """EAGLE-1: x = fc([emb(t); f]); out = layer(x) with an identity input norm; logits = lm_head(out).
    Returns (logits, out) at every position; ``feats`` rows are target or own features alike."""
    x = torch.cat([emb[tokens].double(), feats.double()], -1) @ w["fc.weight"].double().T + w["fc.bias"].double()
    out = _layer(x, x, w, "layers.0.", cfg, torch.arange(len(tokens)))
    return out @ lm_head.double().T, out


def ref_eagle3(w, cfg, emb, tokens, feats, from_target):
    """EAGLE-3: hidden = fc(f) for target features, the head's own pre-norm output otherwise; attention
    reads [rms(emb); rms(hidden)]; logits = lm_head(rms(out)) over the draft vocabulary."""
    hidden = torch.stack([f.double() @ w["fc.weight"].double().T if t else f.double() for f, t in zip(feats, from_target)])
    p = "midlayer."
    x = torch.cat([_rms(emb[tokens].double(), w[p + "input_layernorm.weight"].double()),
                   _rms(hidden, w[p + "hidden_norm.weight"].double())], -1)
    out = _layer(x, hidden, w, p, cfg, torch.arange(len(tokens)))
    return _rms(out, w["norm.weight"].double()) @ w["lm_head.weight"].double().T, out


def _root_and_child(head, ids, feats, root, child):
    """The head's logits for the root (after a prompt of ids / target features) and for one child of it."""
    with torch.no_grad():
        head.prefill(ids, feats)
        got_root = head.root(root, feats[-1])
        got_child = head.layer_logits(torch.tensor([child]), torch.tensor([0]), torch.ones(1, 2, dtype=torch.bool))
    return got_root, got_child


def _target(family, layers=2):
    return tiny_causal_lm(family, 6, 2, seed=1, layers=layers)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["plain", "qkv_bias+own_embed", "bin"])
def test_eagle1_head_logits_equal_the_reference_forward(tmp_path, family, variant):
    target = _target(family)
    cfg, w = write_eagle1(tmp_path / "h", target, qkv_bias="qkv_bias" in variant, own_embed="own_embed" in variant,
                          fmt="bin" if variant == "bin" else "safetensors")
    assert head_format(str(tmp_path / "h")) == "eagle1"
    head = load_draft(str(tmp_path / "h"), target)
    assert type(head).__name__ == "EagleDraftHead" and head.own_embedding == ("own_embed" in variant)
    emb = w["embed_tokens.weight"] if "own_embed" in variant else target.get_input_embeddings().weight.detach()
    lm = target.get_output_embeddings().weight.detach()
    gen = torch.Generator().manual_seed(2)
    ids, feats = torch.randint(0, 97, (6,), generator=gen), torch.randn(6, 96, generator=gen)
    root, child = 7, 11
    got_root, got_child = _root_and_child(head, ids, feats, root, child)
    toks = torch.cat([ids[1:], torch.tensor([root])])
    with torch.no_grad():
        want, out = ref_eagle1(w, cfg, emb, lm, toks, feats)
        want_child, _ = ref_eagle1(w, cfg, emb, lm, torch.cat([toks, torch.tensor([child])]),
                                   torch.cat([feats, out[-1:].float()]))
    torch.testing.assert_close(got_root.double(), want[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_child[0].double(), want_child[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["midlayer", "layers.0", "full_vocab+own_embed"])
def test_eagle3_head_logits_equal_the_reference_forward(tmp_path, family, variant):
    target = _target(family, layers=6)
    full = "full_vocab" in variant
    cfg, w = write_eagle3(tmp_path / "h", target, draft_vocab=None if full else 40,
                          prefix="layers.0." if variant == "layers.0" else "midlayer.", own_embed="own_embed" in variant)
    assert head_format(str(tmp_path / "h")) == "eagle3"
    head = load_draft(str(tmp_path / "h"), target)
    assert isinstance(head, Eagle3DraftHead) and head.feature_layers == (2, 3, 3)  # 2, N/2, N-3 of 6 layers
    if full:
        assert head.vocab_ids is None  # d2t is the identity: no restriction
    else:
        torch.testing.assert_close(head.vocab_ids, torch.arange(40) + w["d2t"])
    if variant == "layers.0":  # the reference reads the midlayer names
        w = {k.replace("layers.0.", "midlayer."): v for k, v in w.items()}
    emb = w["embed_tokens.weight"] if "own_embed" in variant else target.get_input_embeddings().weight.detach()
    gen = torch.Generator().manual_seed(3)
    ids, feats = torch.randint(0, 97, (6,), generator=gen), torch.randn(6, 3 * 96, generator=gen)
    root, child = 5, 9
    got_root, got_child = _root_and_child(head, ids, feats, root, child)
    toks = torch.cat([ids[1:], torch.tensor([root])])
    with torch.no_grad():
        want, out = ref_eagle3(w, cfg, emb, toks, list(feats), [True] * 6)
        want_child, _ = ref_eagle3(w, cfg, emb, torch.cat([toks, torch.tensor([child])]), list(feats) + [out[-1]],
                                   [True] * 6 + [False])
    torch.testing.assert_close(got_root.double(), want[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_child[0].double(), want_child[-1], rtol=1e-4, atol=1e-4)


def test_eagle3_features_are_the_residual_streams_entering_the_layers():
    target = _target("llama", layers=6)
    adapter = TargetAdapter(target)
    ids = torch.randint(0, 97, (5,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats, logits = adapter.forward(ids, adapter.new_cache(), feature_layers=(2, 3, 3))
        out = target(ids[None], output_hidden_states=True)
    hs = out.hidden_states  # hidden_states[i] enters layer i
    torch.testing.assert_close(feats, torch.cat([hs[2][0], hs[3][0], hs[3][0]], -1))
    torch.testing.assert_close(logits, out.logits[0])


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_engine_is_lossless_with_a_published_head(tmp_path, kind, family):
    from c2t_fast.decoding.classifier import C2TClassifier

    target = _target(family, layers=6)
    (write_eagle1 if kind == "eagle1" else write_eagle3)(tmp_path / "h", target)
    head = load_draft(str(tmp_path / "h"), target)
    prompt = torch.randint(0, 97, (8,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = target.generate(prompt[None], do_sample=False, max_new_tokens=12, min_new_tokens=12,
                               pad_token_id=0)[0, 8:].tolist()
    torch.manual_seed(0)
    clf = C2TClassifier()  # the classifier's features are model-agnostic: any target/head pair
    for strategy in (Chain(3), Eagle2(top_k=3, depth=2, total_tokens=8), C2T(clf, beta=0.2, top_k=3, d_max=3)):
        gen = SpeculativeGenerator(target, head, strategy, eos_token_id=[], budget=None, ngram=None)
        assert gen.generate(prompt, max_new_tokens=12).tokens == want


def test_a_published_head_is_never_loaded_as_a_causal_lm_with_new_weights(tmp_path):
    target = _target("llama")
    write_eagle1(tmp_path / "h", target)
    assert type(load_draft(str(tmp_path / "h"), target)).__name__ == "EagleDraftHead"


def _rewrite(path, mutate_cfg=None, mutate_w=None):
    from safetensors.torch import load_file, save_file

    cfg = json.loads((path / "config.json").read_text())
    w = load_file(str(path / "model.safetensors"))
    if mutate_cfg:
        mutate_cfg(cfg)
    if mutate_w:
        mutate_w(w)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in w.items()}, str(path / "model.safetensors"))


@pytest.mark.parametrize("case,error,needle", [
    ("eagle1_fc_shape", ValueError, "fc.weight has shape"),
    ("eagle1_unknown", ValueError, "unknown tensors ['layers.0.surprise']"),
    ("eagle1_missing", ValueError, "missing tensors ['layers.0.mlp.up_proj.weight']"),
    ("eagle1_hidden", ValueError, "hidden_size is 48 but the target's is 96"),
    ("eagle1_vocab", ValueError, "vocab_size is 50 but the target's is 97"),
    ("eagle3_target_hidden", ValueError, "target_hidden_size is 64 but the target's is 96"),
    ("eagle3_layers", ValueError, "eagle_aux_hidden_state_layer_ids"),
    ("eagle3_d2t", ValueError, "d2t has 3 entries"),
    ("no_weights", FileNotFoundError, "no weights"),
])
def test_a_head_that_does_not_fit_is_refused_by_name(tmp_path, case, error, needle):
    target = _target("llama", layers=6)
    path = tmp_path / "h"
    (write_eagle3 if case.startswith("eagle3") else write_eagle1)(path, target)
    if case == "eagle1_fc_shape":
        _rewrite(path, mutate_w=lambda w: w.update({"fc.weight": torch.zeros(96, 100)}))
    elif case == "eagle1_unknown":
        _rewrite(path, mutate_w=lambda w: w.update({"layers.0.surprise": torch.zeros(3)}))
    elif case == "eagle1_missing":
        _rewrite(path, mutate_w=lambda w: w.pop("layers.0.mlp.up_proj.weight"))
    elif case == "eagle1_hidden":
        _rewrite(path, mutate_cfg=lambda c: c.update({"hidden_size": 48}))
    elif case == "eagle1_vocab":
        _rewrite(path, mutate_cfg=lambda c: c.update({"vocab_size": 50}))
    elif case == "eagle3_target_hidden":
        _rewrite(path, mutate_cfg=lambda c: c.update({"target_hidden_size": 64}))
    elif case == "eagle3_layers":
        _rewrite(path, mutate_cfg=lambda c: c.update({"eagle_aux_hidden_state_layer_ids": [1, 2, 9]}))
    elif case == "eagle3_d2t":
        _rewrite(path, mutate_w=lambda w: w.update({"d2t": torch.zeros(3, dtype=torch.int64)}))
    elif case == "no_weights":
        (path / "model.safetensors").unlink()
        (path / "config.json").write_text(json.dumps({**_cfg(target), "bias": True}))
    with pytest.raises(error) as err:
        load_draft(str(path), target)
    assert needle in str(err.value), str(err.value)


def test_a_classifier_for_your_own_pair_in_three_commands(tmp_path, capsys):
    """README's recipe for any local target + published head: collect-trees, train-classifier, generate."""
    import transformers

    from c2t_fast import cli
    from support import load_smollm2

    tok = load_smollm2()[1]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=64, num_hidden_layers=6,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                                   eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    target = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a target that always says token 0, and a head that drafts it first: some acceptances
        target.model.norm.weight.zero_()
    target.save_pretrained(tmp_path / "target")
    tok.save_pretrained(tmp_path / "target")
    write_eagle3(tmp_path / "head", target, draft_vocab=256)
    _rewrite(tmp_path / "head", mutate_w=lambda w: (w["lm_head.weight"].zero_(), w["d2t"].__setitem__(0, 0)))
    (tmp_path / "prompts.txt").write_text("Say hello.\nCount to three.\n")
    base = ["--target", str(tmp_path / "target"), "--draft", str(tmp_path / "head"), "--device", "cpu"]
    assert cli.main(["collect-trees", *base, "--prompts", str(tmp_path / "prompts.txt"), "--out",
                     str(tmp_path / "trees"), "--top-k-tree", "3", "--depth", "2", "--max-new-tokens", "6"]) == 0
    assert cli.main(["train-classifier", "--data", str(tmp_path / "trees"), "--out", str(tmp_path / "clf"),
                     "--epochs", "1", "--min-steps", "3", "--batch-size", "8", "--val-fraction", "0.5"]) == 0
    assert cli.main(["generate", *base, "--classifier", str(tmp_path / "clf"), "--prompt", "Hi", "--beta", "0.1",
                     "--max-new-tokens", "6", "--no-baseline"]) == 0
    assert "tau" in capsys.readouterr().out

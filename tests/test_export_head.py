"""`c2t-fast export-head`: an EAGLE-3 head written in SGLang's and the speculators layouts reads back as the
same function (same tensors, same drafts, the same feature layers under each engine's layer-id rule);
heads an engine would compute differently are refused before anything is written."""

import json
import os

import pytest
import torch

from c2t_fast.decoding.drafts import EagleDraftHead
from c2t_fast.decoding.drafts.export import export_head, sglang_layer_ids
from c2t_fast.decoding.drafts.loading import load_draft
from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.decoding.strategies import Chain
from c2t_fast.training.eagle3_head import new_eagle3_head
from support import tiny_causal_lm

N_LAYERS = 6  # default feature layers (2, 3, 3)


@pytest.fixture(scope="module")
def target():
    return tiny_causal_lm("llama", 6, 2, seed=1, layers=N_LAYERS)


def _head(target, layers=None, extra=0, seed=0):
    torch.manual_seed(seed)
    head = new_eagle3_head(target, torch.arange(0, 97, 2), layers, extra_layers=extra)
    with torch.no_grad():  # every tensor random: a key mapped to the wrong place cannot go unnoticed
        for p in head.parameters():
            if p is not head.embed_tokens.weight:
                p.copy_(torch.randn_like(p) * 0.3)
    return head.eval()


def _same_function(a, b, target):
    sa = {k: v for k, v in a.state_dict().items() if not k.startswith(("rotary.", "embed_tokens."))}
    sb = {k: v for k, v in b.state_dict().items() if not k.startswith(("rotary.", "embed_tokens."))}
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    assert a.feature_layers == b.feature_layers
    prompt = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(3))
    outs = [SpeculativeGenerator(target, h, Chain(3), eos_token_id=[], budget=None, ngram=None)
            .generate(prompt, 12).metrics.accepted for h in (a, b)]
    assert outs[0] == outs[1]  # the same drafts are accepted step by step


@pytest.mark.parametrize("fmt", ["sglang", "speculators"])
@pytest.mark.parametrize("layers", [None, (2, 4, 5)])
def test_an_exported_head_reads_back_as_the_same_head(tmp_path, target, fmt, layers):
    head = _head(target, layers)
    out = str(tmp_path / fmt)
    assert export_head(head, out, fmt, N_LAYERS, "fp32", verifier="tiny") == ["config.json", "model.safetensors"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert "draft_type" not in cfg and cfg.get("tie_word_embeddings", cfg.get("transformer_layer_config", {})
                                                  .get("tie_word_embeddings")) is False
    if fmt == "sglang":
        assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
        # SGLang: absent = the default (ours); explicit = layer outputs, shifted by one when the first is 1
        assert cfg.get("eagle_aux_hidden_state_layer_ids") == (None if layers is None else [1, 3, 4])
    else:
        assert cfg["speculators_model_type"] == "eagle3" and cfg["norm_before_residual"] is False
        assert cfg["eagle_aux_hidden_state_layer_ids"] == list(head.feature_layers)
        assert cfg["speculators_config"]["verifier"]["name_or_path"] == "tiny"
        assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    _same_function(head, load_draft(out, target), target)


def test_bf16_export_rounds_the_weights_only(tmp_path, target):
    head = _head(target)
    export_head(head, str(tmp_path / "h"), "sglang", N_LAYERS, "bf16")
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "h" / "model.safetensors"))
    assert w["fc.weight"].dtype == torch.bfloat16 and w["d2t"].dtype == torch.int64 and w["t2d"].dtype == torch.bool
    torch.testing.assert_close(w["fc.weight"].float(), head.fc.weight.bfloat16().float(), rtol=0, atol=0)
    assert load_draft(str(tmp_path / "h"), target).feature_layers == head.feature_layers


def test_a_two_layer_head_exports_to_speculators_only(tmp_path, target):
    head = _head(target, extra=1)
    with pytest.raises(ValueError, match="one-layer heads"):
        export_head(head, str(tmp_path / "s"), "sglang", N_LAYERS)
    assert not os.path.exists(tmp_path / "s")
    export_head(head, str(tmp_path / "v"), "speculators", N_LAYERS, "fp32", verifier="tiny")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "v" / "model.safetensors")).keys()
    assert "layers.1.self_attn.q_proj.weight" in keys and "layers.0.hidden_norm.weight" in keys
    assert json.load(open(tmp_path / "v" / "config.json"))["transformer_layer_config"]["num_hidden_layers"] == 2
    _same_function(head, load_draft(str(tmp_path / "v"), target), target)


def test_layer_ids_sglang_cannot_say_are_refused():
    assert sglang_layer_ids((2, 15, 27), 30) is None
    assert sglang_layer_ids((2, 10, 20), 30) == [1, 9, 19]
    with pytest.raises(ValueError, match="first is 1"):
        sglang_layer_ids((3, 10, 20), 30)


@pytest.mark.parametrize("bad, match", [
    (dict(fmt="onnx"), "fmt"), (dict(dtype="int8"), "dtype"), (dict(speculative_tokens=0), "speculative_tokens"),
    (dict(num_target_layers=0), "num_target_layers"), (dict(fmt="speculators", verifier=None), "verifier"),
    (dict(layers=(3, 4, 5)), "first is 1"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, target, bad, match):
    args = dict(fmt="sglang", dtype="bf16", speculative_tokens=3, num_target_layers=N_LAYERS, verifier="tiny")
    layers = bad.pop("layers", None)
    args.update(bad)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=match):
        export_head(_head(target, layers), out, args.pop("fmt"), args.pop("num_target_layers"), **args)
    assert not os.path.exists(out)


def test_an_eagle1_head_and_a_used_directory_are_refused(tmp_path, target):
    with pytest.raises(ValueError, match="only EAGLE-3"):
        export_head(EagleDraftHead(target.config).attach(target), str(tmp_path / "e1"), "sglang", N_LAYERS)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ValueError, match="not an empty directory"):
        export_head(_head(target), str(tmp_path / "full"), "sglang", N_LAYERS)
    assert os.listdir(tmp_path / "full") == ["x"]


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.pop("norm_before_residual"), "absent"),
    (lambda c: c.update(norm_before_residual=True), "norm_before_residual is true"),
    (lambda c: c.update(norm_output=True), "norm_output"),
    (lambda c: c.update(speculators_model_type="eagle"), "not an EAGLE-3"),
])
def test_speculators_variants_this_head_does_not_compute_are_refused(tmp_path, target, mutate, match):
    out = tmp_path / "v"
    export_head(_head(target), str(out), "speculators", N_LAYERS, "fp32", verifier="tiny")
    cfg = json.loads((out / "config.json").read_text())
    mutate(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_draft(str(out), target)


def test_the_cli_exports_and_names_bad_input(tmp_path, target, capsys, monkeypatch):
    from c2t_fast import cli

    head = _head(target)
    head.save_pretrained(str(tmp_path / "trained"))
    monkeypatch.setattr("c2t_fast.hf.loading.load_target", lambda *a, **k: (target, None))
    out = tmp_path / "served"
    assert cli.main(["export-head", "--draft", str(tmp_path / "trained"), "--format", "speculators", "--out", str(out),
                     "--dtype", "fp32", "--verifier", "tiny"]) == 0
    _same_function(head, load_draft(str(out), target), target)
    assert cli.main(["export-head", "--draft", str(tmp_path / "trained"), "--format", "sglang", "--out",
                     str(out)]) == 2
    assert "not an empty directory" in capsys.readouterr().err

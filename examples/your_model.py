"""Use c2t_fast with your own model, offline, end to end on a tiny model this script creates:

1. a local transformers model directory (a random 4-layer Llama: stands in for yours);
2. a draft head in the published EAGLE-1 layout (``fc.weight [H, 2H]``, ``layers.0.*`` without an input
   norm, ``config.json`` of a one-layer Llama) — what you would download from the hub;
3. ``c2t_fast.load_target`` / ``c2t_fast.load_draft`` read both directories; the shipped C2T classifier
   works for any target/head pair;
4. ``model.generate(..., custom_generate=c2t_fast.generate, draft=..., strategy=...)`` decodes with
   classifier-pruned token trees and returns exactly the model's own greedy output.

Run: python examples/your_model.py [--dir DIR]
"""

import argparse
import json
import os
import tempfile

import torch


def make_model(path: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(path)


def make_published_eagle1_head(path: str, model) -> None:
    """A head with the target's widths, saved under the names a yuhuili/EAGLE-* checkpoint uses."""
    from safetensors.torch import save_file

    import c2t_fast

    head = c2t_fast.EagleDraftHead(model.config, input_norm=False)
    state = {("layers.0." + k[len("layer."):] if k.startswith("layer.") else k): v.contiguous()
             for k, v in head.state_dict().items() if k.startswith(("fc.", "layer."))}
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "model.safetensors"))
    cfg = {k: getattr(model.config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                  "num_key_value_heads", "vocab_size", "rms_norm_eps",
                                                  "max_position_embeddings")}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
                   "bias": True, **cfg}, f)


def main(argv=None) -> int:
    import c2t_fast
    from c2t_fast.hf.loading import load_causal_lm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="where to write the model and the head (default: a temp dir)")
    args = p.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="c2t_fast_example_")
    model_dir, head_dir = os.path.join(root, "model"), os.path.join(root, "eagle_head")
    make_model(model_dir)
    model = load_causal_lm(model_dir)  # your model: c2t_fast.load_target(DIR) also loads its tokenizer
    make_published_eagle1_head(head_dir, model)

    draft = c2t_fast.load_draft(head_dir, model)  # recognised as a published EAGLE-1 head by its layout
    strategy = c2t_fast.C2T(c2t_fast.load_classifier(None), beta=0.3, top_k=4, d_max=4)
    prompt = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    plain = model.generate(prompt, do_sample=False, max_new_tokens=32, pad_token_id=0)
    trees = model.generate(prompt, do_sample=False, max_new_tokens=32, pad_token_id=0,
                           custom_generate=c2t_fast.generate, draft=draft, strategy=strategy)
    print(f"draft: {type(draft).__name__} from {head_dir}")
    print("plain greedy :", plain[0, 16:].tolist())
    print("token trees  :", trees[0, 16:].tolist())
    same = trees.tolist() == plain.tolist()
    print("identical    :", same, "(a random head: lossless, but it speeds nothing up; use a trained one)")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The README's recipe: ``torchrun --nproc-per-node 2 -m c2t_fast.cli generate ...`` shards the target over
the ranks (transformers' ``tp_plan="auto"``, gloo on this CPU), replicates the draft head on each (it reads
full copies of the target's embedding and LM head), prints once (rank 0), and writes what the unsharded
command writes; widths the ranks cannot split are refused before any weight is loaded."""

import os
import socket
import subprocess
import sys

import pytest

from support import tiny_smollm2_twin

PROMPT = "Name three colours."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _target_and_head(tmp_path):
    from c2t_fast.decoding.drafts import EagleDraftHead

    model, tok = tiny_smollm2_twin(layers=2, seed=3)
    target = tmp_path / "target"
    model.save_pretrained(target)
    tok.save_pretrained(target)
    head = EagleDraftHead(model.config).attach(model)  # random weights: drafts that are often wrong, still lossless
    head.save_pretrained(str(tmp_path / "head"))
    return str(target), str(tmp_path / "head")


def _run(cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{cmd}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.mark.parametrize("draft", ["head", "none"])
def test_torchrun_generate_prints_once_what_the_unsharded_command_prints(tmp_path, draft):
    target, head = _target_and_head(tmp_path)
    args = ["generate", "--target", target, "--draft", head if draft == "head" else "none", "--prompt", PROMPT,
            "--max-new-tokens", "16", "--budget", "none", "--no-baseline", "--device", "cpu"]
    plain = _run([sys.executable, "-m", "c2t_fast.cli", *args])
    sharded = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(_free_port()), "-m", "c2t_fast.cli", *args])
    text = plain.splitlines()[0]
    assert text.strip() and sharded.count(text) == 1, (plain, sharded)  # the same reply, printed by rank 0 only
    assert "tensor parallel over 2 ranks" in sharded and "tensor parallel" not in plain


def test_widths_the_ranks_cannot_split_are_refused_before_loading(tmp_path, monkeypatch):
    import transformers

    from c2t_fast.hf.loading import load_target

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=3, num_key_value_heads=3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"num_attention_heads = 3.*nproc-per-node in \[3\]"):
        load_target(str(tmp_path), tp_plan="auto")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="torchrun"):
        load_target(str(tmp_path), tp_plan="auto")

"""The multi-GPU part of the GPU run: a tiny Llama target sharded with transformers' tensor parallelism
(``tp_plan="auto"``, NCCL) decodes, on every rank, exactly what the unsharded target's
``generate(do_sample=False)`` does, with every strategy, the cost rule (``budget="auto"``) and n-gram
branches; then what one agreement point costs over NCCL. Run under torchrun with 2 or more GPUs:

    torchrun --nproc-per-node 2 benchmarks/gpu/tensor_parallel.py

Exit status 1 (on every rank) when any rank's output differs. Without CUDA it runs the same check on CPU
processes over gloo (``torchrun --nproc-per-node 2`` here too)."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

PROMPT = [1, 5, 7, 9, 11, 3, 5, 7]
NEW = 32


def _tiny(seed: int, layers: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).eval()


def main() -> int:
    import transformers

    from c2t_fast.decoding import engine
    from c2t_fast.decoding.agreement import RankAgreement
    from c2t_fast.decoding.classifier import C2TClassifier
    from c2t_fast.decoding.drafts import DraftLM
    from c2t_fast.decoding.strategies import C2T, Chain, Eagle2

    local = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local)
    else:  # the same check on CPU processes (gloo), so the script is exercised where no GPU is lent
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", local) if gpu else torch.device("cpu")
    model_dir = os.path.join(tempfile.gettempdir(), "c2t_fast_tp_target")
    if rank == 0:
        _tiny(1, 4).save_pretrained(model_dir)
    dist.barrier()
    target = transformers.AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev).eval()
    ids = torch.tensor(PROMPT, device=dev)
    with torch.no_grad():
        want = ref.generate(ids[None], do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                            pad_token_id=0)[0, len(PROMPT):].tolist()
    torch.manual_seed(0)
    clf = C2TClassifier().to(dev)
    strategies = {"chain": Chain(4), "eagle2": Eagle2(top_k=4, depth=3, total_tokens=20),
                  "c2t": C2T(clf, beta=0.3, top_k=4, d_max=4, top_m=50)}
    ok = True
    for name, strategy in strategies.items():
        draft = DraftLM(_tiny(2, 1).to(dev))
        gen = engine.SpeculativeGenerator(target, draft, strategy, eos_token_id=[], budget="auto", ngram=4)
        got = gen.generate(ids, NEW).tokens
        same = got == want
        ok &= same
        print(f"rank {rank}/{world} {name}: {'equal to unsharded generate' if same else 'DIFFERS'} "
              f"(agreement: {type(gen.agreement).__name__})", flush=True)
    agree = RankAgreement()
    for _ in range(20):
        agree.share([0.0])
    times = []
    for i in range(500):
        t0 = time.perf_counter()
        agree.share([float(i)])
        times.append(time.perf_counter() - t0)
    if rank == 0:
        print(f"agreement point over {dist.get_backend()}, {world} ranks: median {statistics.median(times) * 1e6:.0f} us", flush=True)
    flags = torch.tensor([0.0 if ok else 1.0], device=dev)
    dist.all_reduce(flags)
    dist.destroy_process_group()
    return 1 if flags.item() else 0


if __name__ == "__main__":
    raise SystemExit(main())

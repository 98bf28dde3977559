"""wisca_fast.apply under torch.distributed: DDP and FSDP2 on two CPU processes (gloo) give the
single-process factors and logits."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(__file__)


def _worker(rank, world, init_file, mode, out_dir, granularity):
    sys.path.insert(0, HERE)
    import wisca_fast
    from support import tiny_causal_lm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_causal_lm("llama", 8, 2, seed=11)
        ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
        if mode == "ddp":
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            factors = wisca_fast.apply(ddp.module, granularity=granularity)
            with torch.no_grad():
                logits = ddp(ids).logits
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
            factors = wisca_fast.apply(model, granularity=granularity)
            with torch.no_grad():
                logits = model(ids).logits
        torch.save({"factors": factors, "logits": logits}, os.path.join(out_dir, f"{mode}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_distributed_matches_single_process(mode, granularity, tmp_path):
    import wisca_fast
    from support import tiny_causal_lm

    model = tiny_causal_lm("llama", 8, 2, seed=11)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    factors = wisca_fast.apply(model, granularity=granularity)
    with torch.no_grad():
        logits = model(ids).logits
    mp.spawn(_worker, args=(2, str(tmp_path / "rdzv"), mode, str(tmp_path), granularity), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"{mode}-{rank}.pt")
        torch.testing.assert_close(got["factors"], factors, rtol=1e-6, atol=0)
        torch.testing.assert_close(got["logits"], logits, rtol=1e-5, atol=1e-5)

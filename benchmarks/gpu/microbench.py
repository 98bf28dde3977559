"""GPU microbenchmarks with triton.testing.do_bench (median ms), printed as one markdown table.

Each section compares our kernel with its baselines on the same device in the same process; the
copy bandwidth measured first is the roofline for the memory-bound ops.
"""

from __future__ import annotations

import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

import c2t_fast  # noqa: E402
from c2t_fast import reference as ref  # noqa: E402
from support import random_parents  # noqa: E402

ROWS: list[tuple[str, str, float, str]] = []


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbs() -> float:
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def tree_ops() -> None:
    ops = torch.ops.c2t_fast
    for T in (16, 64, 256):
        gen = torch.Generator().manual_seed(T)
        parents = random_parents(T, "wide", gen).cuda()
        tokens = torch.randint(0, 49152, (T,), generator=gen).cuda()
        logits = torch.randn(T, 49152, generator=gen).cuda()
        caches = [torch.randn(1, 3, 512 + T, 64, device="cuda") for _ in range(60)]
        acc = (torch.tensor([0, 1, 3, 6, 9, 12]) * (T // 16)).cuda()
        cases = {
            "build_tree": (lambda: ops.build_tree(parents, 512), lambda: ref.build_tree(parents, 512)),
            "verify_greedy (logits)": (lambda: ops.verify_greedy(tokens, parents, logits),
                                       lambda: ref.verify_greedy(tokens, parents, logits)),
            "compact_kv (60 tensors)": (lambda: ops.compact_kv(caches, 512, acc),
                                        lambda: ref.compact_kv(caches, 512, acc)),
        }
        for name, (ours, base) in cases.items():
            a, b = bench(ours), bench(base)
            ROWS.append((f"{name} T={T}", "CUDA kernel vs torch reference", a, f"{b / a:.1f}x"))


def main() -> None:
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth_gbs()
    print(f"Device: {dev}; torch {torch.__version__}; measured copy bandwidth {bw:.0f} GB/s\n")
    tree_ops()
    print("| benchmark | comparison | ours (ms) | speed-up / notes |")
    print("|---|---|---|---|")
    for name, what, ms, note in ROWS:
        print(f"| {name} | {what} | {ms:.4f} | {note} |")


if __name__ == "__main__":
    main()

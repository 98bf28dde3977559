"""Compile every Triton kernel for sm_80 and sm_90 without a GPU (Triton lowers to PTX and runs ptxas
offline): catches code that the CPU interpreter accepts but the compiler rejects. Run as a script
(TRITON_INTERPRET must be unset); prints one line per kernel and exits non-zero on failure."""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from c2t_fast.kernels.triton import score_children as sc  # noqa: E402
from c2t_fast.kernels.triton import tree_attention as ta  # noqa: E402


def _sig(pointers: dict, ints: list, floats: list, consts: dict) -> dict:
    sig = dict(pointers)
    sig.update({n: "i32" for n in ints})
    sig.update({n: "fp32" for n in floats})
    sig.update({n: "constexpr" for n in consts})
    return sig


def cases():
    split_ints = ["sqb", "sqh", "sqt", "sqd", "skb", "skh", "sks", "skd", "svb", "svh", "svs", "svd", "sbb", "sbt",
                  "sbw", "sob", "soh", "sos", "som", "prefix_len", "T", "G", "HKV", "num_prefix_splits",
                  "keys_per_split"]
    for dt, upcast in (("bf16", False), ("fp16", False), ("fp32", True)):
        for D in (64, 80, 128, 256):
            bd = triton.next_power_of_2(D)
            consts = {"D": D, "BLOCK_D": bd, "BLOCK_M": 64, "BLOCK_N": 64 if D < 256 else 32, "UPCAST": upcast}
            yield (f"tree_attention split {dt} D={D}", ta._tree_attn_split_kernel.fn,
                   _sig({"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "BITS": "*i64", "OUT_P": "*fp32",
                         "LSE_P": "*fp32"}, split_ints, ["scale_log2e"], consts), consts)
        consts = {"D": 128, "BLOCK_D": 128, "BLOCK_M": 64}
        yield (f"tree_attention merge {dt}", ta._tree_attn_merge_kernel,
               _sig({"OUT_P": "*fp32", "LSE_P": "*fp32", "OUT": f"*{dt}"},
                    ["sob", "soh", "sos", "som", "s_out_b", "s_out_t", "s_out_h", "T", "G", "HKV", "n_splits"], [],
                    consts), consts)
        for log_p in (False, True):
            consts = {"LOG_P": log_p, "BLOCK_V": 4096, "BLOCK_M": 1024, "BLOCK_K": 16, "BLOCK_H": 64}
            yield (f"score_children {dt} log_p={log_p}", sc._score_children_kernel,
                   _sig({"LOGITS": f"*{dt}", "TOPV": f"*{dt}", "TOPI": "*i64", "PARENT_LP": "*fp32", "W1": "*fp32",
                         "B1": "*fp32", "W2": "*fp32", "B2": "*fp32", "CONF": "*fp32", "KEEP": "*i8", "TOK": "*i64",
                         "CHILD_LP": "*fp32", "ENT": "*fp32"}, ["s_l", "s_tv", "s_ti", "V", "M", "K", "H"],
                        ["depth", "beta"], consts), consts)


def main() -> int:
    failed = 0
    for arch in (80, 90):
        for name, fn, sig, consts in cases():
            try:
                triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32))
                print(f"ok   sm_{arch} {name}")
            except Exception as exc:  # report every failure, then fail
                failed += 1
                print(f"FAIL sm_{arch} {name}: {type(exc).__name__}: {str(exc)[:400]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Fused tree-mask attention for speculative-decoding verification (Triton).

Memory-bound regime: T (<= a few hundred) tree queries against a long KV cache. Design:
- one program owns BLOCK_M query rows of one KV head: all T*G rows of a GQA group share each
  K/V tile, so a KV byte is read once per KV head (per row block when T*G > BLOCK_M);
- the prefix (keys < prefix_len) needs no mask and is split across programs (flash-decoding);
  the tree block (the last T keys) is one more split, masked with the ancestor bits;
- each split writes fp32 partial outputs and log2-sum-exp; a second kernel merges them.
No [T, S] mask is ever materialised.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Keys per prefix split are a multiple of this, the largest autotuned BLOCK_N.
SPLIT_QUANTUM = 128


def _configs():
    if INTERPRET:  # the CPU interpreter: one small config, no tuning
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3)
    ]


@triton.autotune(configs=_configs(), key=["D", "BLOCK_M", "T"])
@triton.jit
def _tree_attn_split_kernel(
    Q, K, V, BITS, OUT_P, LSE_P,
    sqb, sqh, sqt, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sbb, sbt, sbw,
    sob, soh, sos, som,
    prefix_len, T, G, HKV, num_prefix_splits, keys_per_split, scale_log2e,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = g * T + t
    row_ok = rows < G * T
    g = rows // T
    t = rows % T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + t[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    # Splits below num_prefix_splits own a chunk of the prefix; the last one owns the tree block, whose
    # key j sits at cache position prefix_len + j. (Runtime values in both branches, no ternaries on
    # them: they must compile, not only interpret.)
    tree = pid_s >= num_prefix_splits
    if tree:
        n_lo = 0
        n_hi = T
        key_off = prefix_len
    else:
        n_lo = pid_s * keys_per_split
        n_hi = tl.minimum(n_lo + keys_per_split, prefix_len)
        key_off = 0
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_hi
        key_pos = offs_n + key_off
        k = tl.load(k_base + key_pos[None, :] * sks + offs_d[:, None] * skd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + key_pos[:, None] * svs + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k) * scale_log2e
        allowed = n_ok[None, :] & row_ok[:, None]
        if tree:
            words = tl.load(BITS + b * sbb + t[:, None] * sbt + (offs_n // 64)[None, :] * sbw,
                            mask=allowed, other=0)
            allowed = allowed & (((words >> (offs_n % 64).to(tl.int64)[None, :]) & 1) != 0)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_base = OUT_P + b * sob + h * soh + pid_s * sos
    tl.store(o_base + rows[:, None] * som + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE_P + ((b * HKV + h) * (num_prefix_splits + 1) + pid_s) * (G * T) + rows, lse, mask=row_ok)


@triton.jit
def _tree_attn_merge_kernel(
    OUT_P, LSE_P, OUT,
    sob, soh, sos, som,
    s_out_b, s_out_t, s_out_h,
    T, G, HKV, n_splits,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    lse_base = LSE_P + (b * HKV + h) * n_splits * (G * T)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for sp in range(0, n_splits):
        m = tl.maximum(m, tl.load(lse_base + sp * (G * T) + rows, mask=row_ok, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for sp in range(0, n_splits):
        w = tl.exp2(tl.load(lse_base + sp * (G * T) + rows, mask=row_ok, other=float("-inf")) - m)
        part = tl.load(OUT_P + b * sob + h * soh + sp * sos + rows[:, None] * som + offs_d[None, :],
                       mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        den += w
        acc += w[:, None] * part
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    g = rows // T
    t = rows % T
    ptrs = OUT + b * s_out_b + t[:, None] * s_out_t + (h * G + g)[:, None] * s_out_h + offs_d[None, :]
    tl.store(ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: torch.Tensor,
                   prefix_len: int, scale: float, num_prefix_splits: int | None = None) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, prefix_len + T, D] (any strides), bits [B, T, W] (stride 0 on
    B allowed) -> out [B, T, Hq, D] in q's dtype. Arguments are validated by c2t_fast.ops."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    M = G * T
    BLOCK_M = max(16, min(64, triton.next_power_of_2(M)))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    m_blocks = triton.cdiv(M, BLOCK_M)
    if num_prefix_splits is None:
        # enough programs to fill the GPU twice over, each split at least SPLIT_QUANTUM keys
        want = triton.cdiv(2 * _num_sms(q.device), B * Hkv * m_blocks)
        num_prefix_splits = max(1, min(want, triton.cdiv(prefix_len, SPLIT_QUANTUM)))
    keys_per_split = triton.cdiv(triton.cdiv(max(prefix_len, 1), num_prefix_splits), SPLIT_QUANTUM) * SPLIT_QUANTUM
    num_prefix_splits = max(1, triton.cdiv(prefix_len, keys_per_split))
    n_splits = num_prefix_splits + 1
    out_p = torch.empty(B, Hkv, n_splits, M, D, device=q.device, dtype=torch.float32)
    lse_p = torch.empty(B, Hkv, n_splits, M, device=q.device, dtype=torch.float32)
    out = torch.empty(B, T, Hq, D, device=q.device, dtype=q.dtype)
    LOG2E = 1.4426950408889634
    upcast = INTERPRET or q.dtype == torch.float32
    _tree_attn_split_kernel[(B * Hkv, m_blocks, n_splits)](
        q, k, v, bits, out_p, lse_p,
        *q.stride(), *k.stride(), *v.stride(), *bits.stride(),
        *out_p.stride()[:4],
        prefix_len, T, G, Hkv, num_prefix_splits, keys_per_split, scale * LOG2E,
        D=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, UPCAST=upcast,
    )
    _tree_attn_merge_kernel[(B * Hkv, m_blocks)](
        out_p, lse_p, out, *out_p.stride()[:4], out.stride(0), out.stride(1), out.stride(2),
        T, G, Hkv, n_splits, D=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
    )
    return out

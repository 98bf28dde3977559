"""Batched C2T classifier scoring for one tree layer (Triton): one program per frontier row.

Per row: log-sum-exp over the full vocabulary (the only pass over V), the entropy of the row's top-M
probabilities, then for the row's top-K children their joint log-prob, the features (P or log P,
H, d), the 3 -> h -> 1 MLP, the sigmoid confidence and the keep flag. One launch per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _score_children_kernel(
    LOGITS, TOPV, TOPI, PARENT_LP, W1, B1, W2, B2,
    CONF, KEEP, TOK, CHILD_LP, ENT,
    s_l, s_tv, s_ti,
    V, M, K, H, depth, beta,
    LOG_P: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    # log-sum-exp over the vocabulary, online (one read of the row)
    offs_v = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(LOGITS + row * s_l + v0 + offs_v, mask=v0 + offs_v < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))

    # entropy of the top-M probabilities, not renormalised; p = 0 contributes 0
    offs_m = tl.arange(0, BLOCK_M)
    ent = tl.zeros([BLOCK_M], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        lp = tl.load(TOPV + row * s_tv + m0 + offs_m, mask=m0 + offs_m < M, other=float("-inf")).to(tl.float32) - lse
        p = tl.exp(lp)
        ent += -p * tl.where(p > 0.0, lp, 0.0)
    entropy = tl.sum(ent, 0)

    # the K children: features -> MLP -> confidence
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    clp = tl.load(PARENT_LP + row).to(tl.float32) + \
        tl.load(TOPV + row * s_tv + offs_k, mask=k_ok, other=0.0).to(tl.float32) - lse
    f0 = clp if LOG_P else tl.exp(clp)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    w_p = tl.load(W1 + offs_h * 3 + 0, mask=h_ok, other=0.0)
    w_h = tl.load(W1 + offs_h * 3 + 1, mask=h_ok, other=0.0)
    w_d = tl.load(W1 + offs_h * 3 + 2, mask=h_ok, other=0.0)
    b1 = tl.load(B1 + offs_h, mask=h_ok, other=0.0)
    w2 = tl.load(W2 + offs_h, mask=h_ok, other=0.0)
    hidden = f0[:, None] * w_p[None, :] + (entropy * w_h + depth * w_d + b1)[None, :]
    hidden = tl.maximum(hidden, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.relu
    z = tl.sum(hidden * w2[None, :], 1) + tl.load(B2)
    conf = 1.0 / (1.0 + tl.exp(-z))
    out = row * K + offs_k
    tl.store(CONF + out, conf, mask=k_ok)
    tl.store(KEEP + out, (conf >= beta).to(tl.int8), mask=k_ok)
    tl.store(TOK + out, tl.load(TOPI + row * s_ti + offs_k, mask=k_ok, other=0), mask=k_ok)
    tl.store(CHILD_LP + out, clp, mask=k_ok)
    tl.store(ENT + row, entropy)


def score_children(logits, top_values, top_indices, parent_logp, depth, k, w1, b1, w2, b2, beta, log_p):
    """See c2t_fast.ops.score_children (arguments validated there)."""
    n, V = logits.shape
    M = top_values.shape[1]
    h = w1.shape[0]
    conf = torch.empty(n, k, device=logits.device, dtype=torch.float32)
    keep = torch.empty(n, k, device=logits.device, dtype=torch.int8)
    tok = torch.empty(n, k, device=logits.device, dtype=torch.int64)
    clp = torch.empty(n, k, device=logits.device, dtype=torch.float32)
    ent = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n:
        _score_children_kernel[(n,)](
            logits, top_values, top_indices, parent_logp, w1, b1, w2, b2, conf, keep, tok, clp, ent,
            logits.stride(0), top_values.stride(0), top_indices.stride(0),
            V, M, k, h, float(depth), float(beta),
            LOG_P=bool(log_p), BLOCK_V=min(4096, triton.next_power_of_2(V)),
            BLOCK_M=min(1024, max(16, triton.next_power_of_2(M))), BLOCK_K=max(16, triton.next_power_of_2(k)),
            BLOCK_H=max(16, triton.next_power_of_2(h)),
        )
    return conf, keep.bool(), tok, clp, ent

"""WISCA's factor math (wisca-method.md sections 3 and 8), shared by the pure-torch reference of the op
and by ``apply``'s path for LoRA and sharded weights (the fused C++/CUDA op computes the same in
``csrc/wisca/rescale_common.cpp``).

Per layer with W_q ``[Hq*D, C]``, W_k / W_v ``[Hkv*D, C]``, W_o ``[C, Hq*D]``: the row sums of W_q,
W_k, W_v and column sums of W_o of ``|w|`` (l1) or ``w^2`` (fro) give the factors (tensor: s =
sqrt(|W_k| / |W_q|), t = sqrt(|W_o| / |W_v|); channel: per KV head and channel, summed over the g
query heads of a group and tied over RoPE pairs), and the factors give fp64 multipliers for W_q's,
W_k's and W_v's rows and W_o's columns. Sums are partial for sharded weights, so they can be
all-reduced before the factors are taken.
"""

from __future__ import annotations

import torch

GRANULARITIES = ("tensor", "channel")
NORMS = ("l1", "fro")


def row_norm_parts(w: torch.Tensor, norm: str, dim: int) -> torch.Tensor:
    """Per-row (dim=1) or per-column (dim=0) sums of |w| (l1) or w^2 (fro), in float64."""
    w = w.double()
    return (w.abs() if norm == "l1" else w * w).sum(dim)


def finish_norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    """A norm from its summed parts: the L1 sum as it is, the Frobenius sum of squares rooted."""
    return x if norm == "l1" else x.sqrt()


def factor(num, den, eps, clamp, pow2):
    """sqrt(num / den) (1 where either is below ``eps``), then the optional clamp and power-of-two rounding."""
    ok = (num >= eps) & (den >= eps)
    f = torch.where(ok, torch.sqrt(num / torch.where(ok, den, torch.ones_like(den))), torch.ones_like(num))
    if clamp is not None:
        f = f.clamp(clamp[0], clamp[1])
    if pow2:
        f = torch.exp2(torch.round(torch.log2(f)))
    return f


def pair_sum(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """[..., D] -> [..., D] where both channels of a rotary pair hold the pair's sum."""
    D = x.shape[-1]
    if interleaved:
        p = x.view(*x.shape[:-1], D // 2, 2).sum(-1, keepdim=True)
        return p.expand(*x.shape[:-1], D // 2, 2).reshape(x.shape)
    p = x[..., : D // 2] + x[..., D // 2:]
    return torch.cat([p, p], -1)


def layer_sums(wq, wk, wv, wo, norm="l1"):
    """Row sums of W_q, W_k, W_v and column sums of W_o of |w| (l1) or w^2 (fro), fp64. For sharded
    weights these are the partial sums that get all-reduced."""
    return (row_norm_parts(wq, norm, 1), row_norm_parts(wk, norm, 1), row_norm_parts(wv, norm, 1),
            row_norm_parts(wo, norm, 0))


def multipliers_from_sums(rq, rk, rv, co, Hq, Hkv, D, granularity="tensor", norm="l1", rope_interleaved=False,
                          qk=True, vo=True, eps=1e-12, clamp=None, pow2=False):
    """Row multipliers (m_q [Hq*D], m_k [Hkv*D], m_v [Hkv*D]), column multipliers m_o [Hq*D], and the
    layer's factors: (s, t) or [2, Hkv, D] tables."""
    g = Hq // Hkv
    rq, rk, rv, co = rq.view(Hkv, g, D), rk.view(Hkv, D), rv.view(Hkv, D), co.view(Hkv, g, D)
    for name, x in (("W_q", rq), ("W_k", rk), ("W_v", rv), ("W_o", co)):
        if not torch.isfinite(x).all():
            raise ValueError(f"rescale_attention_: non-finite values in {name}; nothing was rescaled")
    if granularity == "tensor":
        s = factor(finish_norm(rk.sum(), norm), finish_norm(rq.sum(), norm), eps, clamp, pow2)
        t = factor(finish_norm(co.sum(), norm), finish_norm(rv.sum(), norm), eps, clamp, pow2)
        s_tab, t_tab = s.expand(Hkv, D), t.expand(Hkv, D)
    else:
        nq = pair_sum(rq.sum(1), rope_interleaved)
        nk = pair_sum(rk, rope_interleaved)
        s_tab = factor(finish_norm(nk, norm), finish_norm(nq, norm), eps, clamp, pow2)
        t_tab = factor(finish_norm(co.sum(1), norm), finish_norm(rv, norm), eps, clamp, pow2)
    if not qk:
        s_tab = torch.ones_like(s_tab)
    if not vo:
        t_tab = torch.ones_like(t_tab)
    return multipliers_from_factors(s_tab, t_tab, g), (
        torch.stack([s_tab[0, 0], t_tab[0, 0]]) if granularity == "tensor" else torch.stack([s_tab, t_tab])).float()


def multipliers_from_factors(s_tab, t_tab, g):
    """[Hkv, D] factor tables -> (m_q, m_k, m_v, m_o) in fp64."""
    s_tab, t_tab = s_tab.double(), t_tab.double()
    Hkv, D = s_tab.shape
    mq = s_tab[:, None, :].expand(Hkv, g, D).reshape(-1)
    mo = (1.0 / t_tab)[:, None, :].expand(Hkv, g, D).reshape(-1)
    return mq, (1.0 / s_tab).reshape(-1), t_tab.reshape(-1), mo


def layer_multipliers(wq, wk, wv, wo, Hq, Hkv, D, granularity="tensor", norm="l1", rope_interleaved=False,
                      qk=True, vo=True, eps=1e-12, clamp=None, pow2=False):
    """``multipliers_from_sums`` of one layer's (unsharded) weights."""
    return multipliers_from_sums(*layer_sums(wq, wk, wv, wo, norm), Hq, Hkv, D, granularity, norm, rope_interleaved,
                                 qk, vo, eps, clamp, pow2)

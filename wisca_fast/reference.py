"""Pure-torch reference of wisca_fast::rescale_attention_ (wisca-method.md sections 3 and 8).

Per layer l with W_q [Hq*D, C], W_k, W_v [Hkv*D, C], W_o [C, Hq*D] (nn.Linear layout):
- tensor granularity: s = sqrt(|W_k| / |W_q|), t = sqrt(|W_o| / |W_v|) with entry-wise L1 norms
  (or Frobenius norms); W_q *= s, W_k /= s, W_v *= t, W_o /= t;
- channel granularity: s per (KV head h, channel j), summed over the g query heads of the group and
  tied over RoPE pairs ((j, j + D/2) for rotate_half, (2j, 2j+1) interleaved); t per (h, j) with W_o's
  columns of all g heads; rows of W_q / W_k / W_v and columns of W_o scaled accordingly;
- biases b_q, b_k, b_v follow their rows; the o_proj bias is never touched;
- a norm below eps gives factor 1; optional clamp, optional rounding to powers of two;
- Adam state of a tensor scaled by c: exp_avg /= c, exp_avg_sq /= c^2; fp32 masters' low-precision
  shadows are rewritten from the scaled masters.
Non-finite norms raise before anything is written.
"""

from __future__ import annotations

import torch

GRANULARITIES = ("tensor", "channel")
NORMS = ("l1", "fro")


def _row_norm_parts(w: torch.Tensor, norm: str, dim: int) -> torch.Tensor:
    """Per-row (dim=1) or per-column (dim=0) sums of |w| (l1) or w^2 (fro), in float64."""
    w = w.double()
    return (w.abs() if norm == "l1" else w * w).sum(dim)


def _finish(x: torch.Tensor, norm: str) -> torch.Tensor:
    return x if norm == "l1" else x.sqrt()


def _factor(num, den, eps, clamp, pow2):
    ok = (num >= eps) & (den >= eps)
    f = torch.where(ok, torch.sqrt(num / torch.where(ok, den, torch.ones_like(den))), torch.ones_like(num))
    if clamp is not None:
        f = f.clamp(clamp[0], clamp[1])
    if pow2:
        f = torch.exp2(torch.round(torch.log2(f)))
    return f


def _pair_sum(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
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
    return (_row_norm_parts(wq, norm, 1), _row_norm_parts(wk, norm, 1), _row_norm_parts(wv, norm, 1),
            _row_norm_parts(wo, norm, 0))


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
        s = _factor(_finish(rk.sum(), norm), _finish(rq.sum(), norm), eps, clamp, pow2)
        t = _factor(_finish(co.sum(), norm), _finish(rv.sum(), norm), eps, clamp, pow2)
        s_tab, t_tab = s.expand(Hkv, D), t.expand(Hkv, D)
    else:
        nq = _pair_sum(rq.sum(1), rope_interleaved)
        nk = _pair_sum(rk, rope_interleaved)
        s_tab = _factor(_finish(nk, norm), _finish(nq, norm), eps, clamp, pow2)
        t_tab = _factor(_finish(co.sum(1), norm), _finish(rv, norm), eps, clamp, pow2)
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
    return multipliers_from_sums(*layer_sums(wq, wk, wv, wo, norm), Hq, Hkv, D, granularity, norm, rope_interleaved,
                                 qk, vo, eps, clamp, pow2)


def _scale_(t: torch.Tensor, mult: torch.Tensor, dim: int) -> None:
    """t *= mult along rows (dim 0) or columns (dim 1), in float64 then cast back."""
    shape = [-1, 1] if dim == 0 else [1, -1]
    m = mult.view(shape) if t.dim() == 2 else mult
    t.copy_((t.double() * m).to(t.dtype))


def rescale_attention_(weights, biases, exp_avg, exp_avg_sq, shadows, num_heads, num_kv_heads, head_dim,
                       granularity="tensor", norm="l1", rope_interleaved=False, qk=True, vo=True,
                       clamp_lo=0.0, clamp_hi=0.0, pow2=False, eps=1e-12):
    """Lists as the op: weights 4L (q, k, v, o per layer); biases 3L, exp_avg / exp_avg_sq 7L
    (q, k, v, o weights then q, k, v biases), shadows 4L; empty tensors mark absent entries."""
    L = len(weights) // 4
    clamp = (clamp_lo, clamp_hi) if clamp_hi > 0 else None
    plans = [layer_multipliers(*weights[4 * l:4 * l + 4], num_heads, num_kv_heads, head_dim, granularity, norm,
                               rope_interleaved, qk, vo, eps, clamp, pow2) for l in range(L)]  # all checks first
    for l, ((mq, mk, mv, mo), _) in enumerate(plans):
        mults = (mq, mk, mv, mo)
        for i in range(4):
            dim = 1 if i == 3 else 0
            _scale_(weights[4 * l + i], mults[i], dim)
            if exp_avg and exp_avg[7 * l + i].numel():
                _scale_(exp_avg[7 * l + i], 1.0 / mults[i], dim)
                _scale_(exp_avg_sq[7 * l + i], 1.0 / mults[i] ** 2, dim)
            if shadows and shadows[4 * l + i].numel():
                shadows[4 * l + i].copy_(weights[4 * l + i])
        for i in range(3):
            if biases and biases[3 * l + i].numel():
                _scale_(biases[3 * l + i], mults[i], 0)
                if exp_avg and exp_avg[7 * l + 4 + i].numel():
                    _scale_(exp_avg[7 * l + 4 + i], 1.0 / mults[i], 0)
                    _scale_(exp_avg_sq[7 * l + 4 + i], 1.0 / mults[i] ** 2, 0)
    return torch.stack([f for _, f in plans])

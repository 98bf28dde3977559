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

from .factors import GRANULARITIES, NORMS, layer_multipliers  # noqa: F401  (re-exported)
from .layout import BIASES, WEIGHTS, OpLists

def _scale_(t: torch.Tensor, mult: torch.Tensor, dim: int) -> None:
    """t *= mult along rows (dim 0) or columns (dim 1), in float64 then cast back."""
    shape = [-1, 1] if dim == 0 else [1, -1]
    m = mult.view(shape) if t.dim() == 2 else mult
    t.copy_((t.double() * m).to(t.dtype))


def rescale_attention_(weights, biases, exp_avg, exp_avg_sq, shadows, num_heads, num_kv_heads, head_dim,
                       granularity="tensor", norm="l1", rope_interleaved=False, qk=True, vo=True,
                       clamp_lo=0.0, clamp_hi=0.0, pow2=False, eps=1e-12):
    """Lists as the op (``layout.OpLists``): weights 4L, biases 3L, exp_avg / exp_avg_sq 7L, shadows 4L;
    empty tensors mark absent entries."""
    lists = OpLists(weights, biases, exp_avg, exp_avg_sq, shadows)
    layers = [lists.layer(l) for l in range(lists.num_layers)]
    clamp = (clamp_lo, clamp_hi) if clamp_hi > 0 else None
    plans = [layer_multipliers(*lay.weights, num_heads, num_kv_heads, head_dim, granularity, norm, rope_interleaved,
                               qk, vo, eps, clamp, pow2) for lay in layers]  # all checks before any write
    for lay, (mults, _) in zip(layers, plans):
        for key, w, mult in zip(WEIGHTS, lay.weights, mults):
            dim = 1 if key == "o" else 0  # W_o scales along its columns
            _scale_(w, mult, dim)
            if key in lay.exp_avg:
                _scale_(lay.exp_avg[key], 1.0 / mult, dim)
                _scale_(lay.exp_avg_sq[key], 1.0 / mult ** 2, dim)
            if key in lay.shadows:
                lay.shadows[key].copy_(w)
        for key, b, mult in zip(BIASES, lay.biases, mults):
            if b is not None:
                _scale_(b, mult, 0)
                if key in lay.exp_avg:
                    _scale_(lay.exp_avg[key], 1.0 / mult, 0)
                    _scale_(lay.exp_avg_sq[key], 1.0 / mult ** 2, 0)
    return torch.stack([f for _, f in plans])

"""``wisca_fast.apply``: one WISCA transition of a whole model (all attention layers at once)."""

from __future__ import annotations

import logging

import torch

from . import factors, moments, ops
from .models import AttentionSpec, find_attention

log = logging.getLogger("wisca_fast")
_warned_qk_norm = False

OPTIMIZER_STATES = moments.OPTIMIZER_STATES
LORA_MODES = ("effective", "adapter")


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _rows(t, rows):
    return t if rows is None or t is None else t[rows]


def apply(model, optimizer=None, granularity: str = "tensor", norm: str = "l1", qk: bool = True, vo: bool = True,
          optimizer_state: str = "rescale", lora: str = "effective", clamp=None, pow2: bool = False) -> torch.Tensor:
    """Rescale every attention layer of ``model`` in place (outputs unchanged) and return the factors:
    float32 ``[L, 2]`` (s for Q/K, t for V/O) or ``[L, 2, Hkv, D]`` for ``granularity="channel"``.

    ``optimizer_state``: "rescale" (Adam m /= c, v /= c^2, so the next steps are the ones the optimizer
    would have taken), "keep", or "reset" (zero the moments of rescaled tensors).
    ``lora`` (peft models): "effective" scales the effective weights W0 + BA (factors pushed into the
    frozen base and B, or A for o_proj); "adapter" balances each adapter's A and B instead (skipping
    adapters whose B is still zero). Works under DDP (identical factors on every rank) and FSDP2
    (partial norms of DTensor shards are all-reduced before scaling).
    """
    if lora not in LORA_MODES:
        raise ValueError(f"lora must be one of {LORA_MODES}, got {lora!r}")
    # checked here as well as by the fused op: the LoRA / sharded path scales tensor by tensor
    if granularity not in ("tensor", "channel"):
        raise ValueError(f"granularity must be 'tensor' or 'channel', got {granularity!r}")
    if norm not in ("l1", "fro"):
        raise ValueError(f"norm must be 'l1' or 'fro', got {norm!r}")
    if clamp is not None and not (len(clamp) == 2 and 0 < clamp[0] <= clamp[1] < float("inf")):
        raise ValueError(f"clamp must be (lo, hi) with 0 < lo <= hi < inf, got {clamp!r}")
    moments.check_optimizer(optimizer, optimizer_state)
    spec = find_attention(model)
    qk = _qk_allowed(spec, qk)
    has_lora = any(p.lora for lay in spec.layers for p in (lay.q, lay.k, lay.v, lay.o))
    with torch.no_grad():
        if has_lora and lora == "adapter":
            return _balance_adapters(spec, optimizer, optimizer_state)
        if has_lora or any(_is_dtensor(lay.q.linear.weight) for lay in spec.layers):
            return _apply_unfused(spec, optimizer, granularity, norm, qk, vo, optimizer_state, clamp, pow2)
        return _apply_fused(spec, optimizer, granularity, norm, qk, vo, optimizer_state, clamp, pow2)


def _qk_allowed(spec: AttentionSpec, qk: bool) -> bool:
    global _warned_qk_norm
    norms = {lay.qk_norm for lay in spec.layers}
    if qk and True in norms:
        if len(norms) > 1:
            raise ValueError("some attention layers have q/k norms and some do not; apply qk=False explicitly")
        if not _warned_qk_norm:
            _warned_qk_norm = True
            log.warning("this model normalises q and k after their projections (QK-norm): a Q/K rescale would be "
                        "absorbed by the norm, so only the V/O pair is rescaled")
        return False
    return qk


def _apply_fused(spec, optimizer, granularity, norm, qk, vo, optimizer_state, clamp, pow2):
    """Plain (or fused-QKV) weights: one call of the fused op for every layer."""
    layers, touched = [], []
    for lay in spec.layers:
        t = ops.AttentionTensors(lay.q.weight(), lay.k.weight(), lay.v.weight(), lay.o.weight(),
                                 lay.q.bias(), lay.k.bias(), lay.v.bias())
        for key, proj in (("q", lay.q), ("k", lay.k), ("v", lay.v), ("o", lay.o)):
            for pkey, param in ((key, proj.linear.weight), ("b" + key, proj.linear.bias)):
                if param is None or pkey == "bo":
                    continue
                mom = moments.adam_moments(optimizer, param)
                if mom is None:
                    continue
                touched.append(mom)
                if optimizer_state == "rescale":
                    rows = proj.rows
                    t.exp_avg[pkey], t.exp_avg_sq[pkey] = _rows(mom[0], rows), _rows(mom[1], rows)
        layers.append(t)
    out = ops.rescale_attention_(layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, granularity, norm,
                                 spec.rope_interleaved, qk, vo, clamp, pow2)
    if optimizer_state == "reset":
        for mom in touched:
            moments.reset(mom)
    return out


# --- LoRA and sharded (DTensor) weights: same math, in torch ops, with all-reduced partial sums ----------

def _local(t):
    return t.to_local() if _is_dtensor(t) else t


def _global_rows(t):
    """(local tensor, global row offset, global rows) of a weight; DTensors are sharded on dim 0."""
    if not _is_dtensor(t):
        return t, 0, t.shape[0]
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not isinstance(p, Shard) or p.dim != 0 for p in t.placements if type(p).__name__ != "Replicate"):
        raise ValueError(f"only row (dim 0) sharding of DTensor weights is supported, got {t.placements}")
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), offset[0], t.shape[0]


def _effective(proj) -> torch.Tensor:
    w = proj.weight().double()
    for ad in proj.lora:
        w = w + ad.scaling * (ad.B.weight.double() @ ad.A.weight.double())
    return w


def _sums_rows(t, norm):
    """Full-length fp64 row sums of a (possibly row-sharded) matrix, zeros outside the local rows."""
    local, off, n = _global_rows(t)
    out = torch.zeros(n, dtype=torch.float64, device=local.device)
    out[off:off + local.shape[0]] = factors.row_norm_parts(local, norm, 1)
    return out


def _sums_cols(t, norm):
    local = _local(t)
    return factors.row_norm_parts(local, norm, 0)


def _all_reduce(x, t):
    """Sum partial norms over the shards of a row-sharded DTensor (replicated weights: nothing to do)."""
    if _is_dtensor(t) and any(type(p).__name__ == "Shard" for p in t.placements):
        import torch.distributed as dist

        group = t.device_mesh.get_group()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _scale_param(param, rows, mult, by_row, optimizer, optimizer_state):
    """param (or its row slice) *= mult along rows/cols; Adam moments follow."""
    local, off, _ = _global_rows(param)
    if rows is not None:
        local = local[rows]
        off = 0
    n = local.shape[0] if by_row else local.shape[-1]
    m = mult[off:off + n] if by_row else mult
    shape = (-1, 1) if (by_row and local.dim() == 2) else (-1,) if local.dim() == 1 else (1, -1)
    local.copy_((local.double() * m.view(shape)).to(local.dtype))
    moments.follow_scale(optimizer, param, optimizer_state, m.view(shape), rows)


def _apply_unfused(spec, optimizer, granularity, norm, qk, vo, optimizer_state, clamp, pow2):
    out = []
    clamp_t = tuple(clamp) if clamp is not None else None
    for lay in spec.layers:
        if any(p.lora for p in (lay.q, lay.k, lay.v, lay.o)):
            eff = [_effective(p) for p in (lay.q, lay.k, lay.v, lay.o)]
            sums = factors.layer_sums(*eff, norm)
        else:
            sums = (_all_reduce(_sums_rows(lay.q.weight(), norm), lay.q.weight()),
                    _all_reduce(_sums_rows(lay.k.weight(), norm), lay.k.weight()),
                    _all_reduce(_sums_rows(lay.v.weight(), norm), lay.v.weight()),
                    _all_reduce(_sums_cols(lay.o.weight(), norm), lay.o.weight()))
        (mq, mk, mv, mo), f = factors.multipliers_from_sums(
            *sums, spec.num_heads, spec.num_kv_heads, spec.head_dim, granularity, norm, spec.rope_interleaved, qk, vo,
            1e-12, clamp_t, pow2)
        out.append(f)
        for proj, mult, by_row in ((lay.q, mq, True), (lay.k, mk, True), (lay.v, mv, True), (lay.o, mo, False)):
            _scale_param(proj.linear.weight, proj.rows, mult.to(_local(proj.linear.weight).device), by_row,
                         optimizer, optimizer_state)
            if by_row and proj.linear.bias is not None:
                _scale_param(proj.linear.bias, proj.rows, mult.to(_local(proj.linear.bias).device), True, optimizer,
                             optimizer_state)
            for ad in proj.lora:  # W = W0 + s B A: rows go into B, W_o's columns into A
                target, along_rows = (ad.B.weight, True) if by_row else (ad.A.weight, False)
                _scale_param(target, None, mult.to(target.device), along_rows, optimizer, optimizer_state)
    return torch.stack(out)


def _balance_adapters(spec, optimizer, optimizer_state) -> torch.Tensor:
    """A *= c, B /= c with c = sqrt(|B|_1 / |A|_1) per adapter (BA unchanged); B = 0 adapters skipped.
    Returns the factors [n_adapters] (1 for skipped ones)."""
    out = []
    for lay in spec.layers:
        for proj in (lay.q, lay.k, lay.v, lay.o):
            for ad in proj.lora:
                na = ad.A.weight.double().abs().sum()
                nb = ad.B.weight.double().abs().sum()
                if nb.item() < 1e-12 or na.item() < 1e-12:
                    out.append(torch.tensor(1.0))
                    continue
                c = torch.sqrt(nb / na)
                _scale_param(ad.A.weight, None, c.expand(ad.A.weight.shape[0]), True, optimizer, optimizer_state)
                _scale_param(ad.B.weight, None, (1.0 / c).expand(ad.B.weight.shape[0]), True, optimizer,
                             optimizer_state)
                out.append(c.float())
    return torch.stack(out) if out else torch.empty(0)

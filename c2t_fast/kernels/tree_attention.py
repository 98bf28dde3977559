"""tree_attention: T tree queries over a KV cache that ends with the tree, each seeing the whole prefix
and its own ancestors (the ancestor bits of ``build_tree``).

CUDA: the Triton kernel of ``kernels/triton/tree_attention.py`` (split prefix/tree, flash-decoding style).
CPU: a composite of torch's flash attention (one masked call for short prefixes, prefix + tree merged by
log-sum-exp beyond). Schema in ``csrc/c2t/ops.cpp``; argument checks, both kernels, the fake and the
wrapper here."""

from __future__ import annotations

import weakref

import torch

from . import reference
from .library import IMPL

MAX_TREE_NODES = 4096
_ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tree_attention(q, k, v, bits, prefix_len: int) -> None:
    op = "tree_attention"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be 4-D ([B, Hq, T, D], [B, Hkv, S, D]); got ranks "
                         f"{q.dim()}, {k.dim()}, {v.dim()}")
    B, Hq, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    Bk, Hkv, S, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if Hq < 1 or Hkv < 1:
        raise ValueError(f"{op}: q has {Hq} heads and k/v {Hkv}; each needs at least one head")
    if Hq % Hkv:
        raise ValueError(f"{op}: {Hq} query heads do not divide into {Hkv} KV heads")
    if not 1 <= T <= MAX_TREE_NODES:
        raise ValueError(f"{op}: T = {T} tree nodes is outside the supported 1..{MAX_TREE_NODES}")
    if not 1 <= D <= 256:
        raise ValueError(f"{op}: head dim {D} is outside the supported 1..256")
    if prefix_len < 0 or prefix_len + T != S:
        raise ValueError(f"{op}: k/v hold S = {S} positions but prefix_len + T = {prefix_len} + {T}; the "
                         "cache must end with the tree")
    if q.dtype not in _ATTN_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == bits.device):
        raise ValueError(f"{op}: q, k, v, ancestor_bits must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}, {bits.device}")
    W = (T + 63) // 64
    if bits.dtype != torch.int64 or bits.dim() not in (2, 3) or tuple(bits.shape[-2:]) != (T, W) or (
            bits.dim() == 3 and bits.shape[0] != B):
        raise ValueError(f"{op}: ancestor_bits must be int64 [T, {W}] or [B, T, {W}] with T = {T}, B = {B}; "
                         f"got {bits.dtype} {tuple(bits.shape)}")


def _bits_3d(bits, B):
    return bits if bits.dim() == 3 else bits.unsqueeze(0).expand(B, -1, -1)


# Below this prefix length one masked flash call beats flash-over-the-prefix + merge on the CPU
# (measured with benchmarks/bench_tree_attention.py on a 2-core x86 VM).
CPU_SINGLE_PASS_MAX_PREFIX = 2048


class _MaskCache:
    """The last additive tree mask, reused while the same ancestor_bits tensor (same object, unmodified)
    comes back: a tree pass calls the op once per layer with one bits tensor, so the mask is built once
    per forward, as transformers builds its own masks."""

    def __init__(self):
        self.key = None
        self.bits_ref = None
        self.mask = None

    def get(self, bits, key, build):
        if self.bits_ref is not None and self.bits_ref() is bits and self.key == (bits._version, *key):
            return self.mask
        self.mask = build()
        self.bits_ref = weakref.ref(bits)
        self.key = (bits._version, *key)
        return self.mask


_cpu_mask_cache = _MaskCache()


def _tree_attention_cpu(q, k, v, ancestor_bits, prefix_len, scale, single_pass=None):
    """GQA without repeat_kv: the G query heads of a KV head are stacked as G*T rows.

    Short prefix: one flash call over the whole cache with a small additive [G*T, S] mask (zeros over
    the prefix, the ancestor mask over the tree); at these sizes that beats any split. Long prefix:
    unmasked flash attention over the prefix plus a T x T masked tree block, merged by log-sum-exp in
    fp32, with no [T, S] mask at all."""
    _check_tree_attention(q, k, v, ancestor_bits, prefix_len)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * T, D)

    def allowed():  # [B, 1, G*T, T]
        return reference.ancestor_mask(_bits_3d(ancestor_bits, B), T).repeat(1, G, 1)[:, None]

    def additive_mask():
        mask = q.new_zeros(B, 1, G * T, prefix_len + T)
        return mask.masked_fill_(torch.nn.functional.pad(~allowed(), (prefix_len, 0)), float("-inf"))

    if prefix_len == 0 or (single_pass if single_pass is not None else prefix_len < CPU_SINGLE_PASS_MAX_PREFIX):
        mask = _cpu_mask_cache.get(ancestor_bits, ("flash", B, G, prefix_len, q.dtype), additive_mask)
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qg, k, v, 0.0, False, attn_mask=mask, scale=scale)[0]
    else:
        s_tree = (qg.float() @ k[:, :, prefix_len:].float().transpose(-1, -2)).mul_(scale)
        s_tree.masked_fill_(~_cpu_mask_cache.get(ancestor_bits, ("split", B, G), allowed), float("-inf"))
        lse_tree = torch.logsumexp(s_tree, -1)
        out = torch.exp(s_tree - lse_tree[..., None]) @ v[:, :, prefix_len:].float()
        out_p, lse_p = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qg, k[:, :, :prefix_len], v[:, :, :prefix_len], 0.0, False, scale=scale)
        lse = torch.logaddexp(lse_p, lse_tree)
        out = out_p.float() * torch.exp(lse_p - lse)[..., None] + out * torch.exp(lse_tree - lse)[..., None]
    return out.view(B, Hkv, G, T, D).reshape(B, Hq, T, D).transpose(1, 2).to(q.dtype).contiguous()


def _tree_attention_cuda(q, k, v, ancestor_bits, prefix_len, scale):
    _check_tree_attention(q, k, v, ancestor_bits, prefix_len)
    from .triton.tree_attention import tree_attention as triton_tree_attention

    return triton_tree_attention(q, k, v, _bits_3d(ancestor_bits, q.shape[0]), prefix_len, scale)


IMPL.impl("tree_attention", _tree_attention_cpu, "CPU")
IMPL.impl("tree_attention", _tree_attention_cuda, "CUDA")


@torch.library.register_fake("c2t_fast::tree_attention")
def _tree_attention_fake(q, k, v, ancestor_bits, prefix_len, scale):
    _check_tree_attention(q, k, v, ancestor_bits, prefix_len)
    B, Hq, T, D = q.shape
    return q.new_empty(B, T, Hq, D)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ancestor_bits: torch.Tensor,
                   prefix_len: int, scale: float | None = None) -> torch.Tensor:
    """Attention of T tree queries over a cache that ends with the tree.

    q ``[B, Hq, T, D]`` (RoPE'd at tree positions), k/v ``[B, Hkv, prefix_len + T, D]`` (strided views
    accepted), ancestor_bits ``int64 [T, W]`` or ``[B, T, W]`` from ``build_tree``. Query i sees every
    prefix key and tree key j iff bit j of row i is set. Returns ``[B, T, Hq, D]`` in q's dtype.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.dim() == 4 and q.shape[-1] > 0 else 1.0  # D = 0 is refused by the op
    return torch.ops.c2t_fast.tree_attention(q, k, v, ancestor_bits, int(prefix_len), float(scale))

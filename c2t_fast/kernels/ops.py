"""The one door into c2t_fast's compiled and Triton code.

Loading this module registers the ``torch.ops.c2t_fast.*`` operators (C++ CPU kernels, and CUDA
kernels when they were compiled), their fake kernels for ``torch.compile``, and an explicit fallback
for CUDA tensors when the CUDA kernels were not built: the pure-torch reference runs on the device,
and a warning says so once per op.

The thin wrappers below convert Python-friendly inputs and return named tuples; the raw operators
are ``torch.ops.c2t_fast.<name>``.
"""

from __future__ import annotations

import logging
import weakref
from typing import NamedTuple, Sequence

import torch

from . import reference

try:
    from .. import _C  # noqa: F401  (registers the operators)
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "c2t_fast._C is not built. Install with `pip install --no-build-isolation -e .` after torch "
        f"(see README.md). Original error: {exc}"
    ) from exc

log = logging.getLogger("c2t_fast")

_OPS = ("build_tree", "prune_tree", "rerank_tree", "verify_greedy", "verify_sample", "compact_kv")


# Read before the fallbacks below register Python CUDA kernels of their own.
_COMPILED_CUDA = {n: torch._C._dispatch_has_kernel_for_dispatch_key(f"c2t_fast::{n}", "CUDA") for n in _OPS}


def has_cuda_kernel(name: str) -> bool:
    """Whether ``c2t_fast::<name>`` has a compiled CUDA kernel in this build."""
    return _COMPILED_CUDA[name]


def cuda_kernels_compiled() -> bool:
    """True when this build of c2t_fast._C contains the CUDA kernels of every tree op."""
    return all(_COMPILED_CUDA.values())


# ---------------------------------------------------------------------------------------------
# Fake kernels: output metadata only. Data-dependent sizes become unbacked symbolic sizes.


def _dyn():
    return torch.library.get_ctx().new_dynamic_size()


@torch.library.register_fake("c2t_fast::build_tree")
def _build_tree_fake(parents, prefix_len):
    T = parents.shape[0]
    W = (T + 63) // 64
    L, depth1 = _dyn(), _dyn()
    return (parents.new_empty(T), parents.new_empty((T, W), dtype=torch.int64),
            parents.new_empty(T, dtype=torch.int64), parents.new_empty((L, depth1), dtype=torch.int64),
            parents.new_empty(L, dtype=torch.int64))


@torch.library.register_fake("c2t_fast::prune_tree")
def _prune_tree_fake(tree_tokens, tree_parents, tree_logp, cand_parent, cand_token, cand_logp,
                     cand_conf, cand_keep, max_keep):
    n = _dyn()
    T = tree_tokens.shape[0]
    return (tree_tokens.new_empty(T + n), tree_parents.new_empty(T + n), tree_logp.new_empty(T + n),
            cand_parent.new_empty(n), cand_parent.new_empty(n))


@torch.library.register_fake("c2t_fast::rerank_tree")
def _rerank_tree_fake(tokens, parents, logp, total_tokens):
    n = _dyn()
    return tokens.new_empty(n), parents.new_empty(n), logp.new_empty(n), tokens.new_empty(n)


@torch.library.register_fake("c2t_fast::verify_greedy")
def _verify_greedy_fake(tokens, parents, target):
    return tokens.new_empty(_dyn()), tokens.new_empty(())


@torch.library.register_fake("c2t_fast::verify_sample")
def _verify_sample_fake(tokens, parents, probs, uniforms):
    return tokens.new_empty(_dyn()), tokens.new_empty(())


@torch.library.register_fake("c2t_fast::compact_kv")
def _compact_kv_fake(caches, prefix_len, accepted):
    return None


# ---------------------------------------------------------------------------------------------
# Explicit fallback: CUDA tensors with a CPU-only build run the reference on the device.

_warned: set[str] = set()


def _fallback(name: str):
    ref = getattr(reference, name)

    def run(*args):
        if name not in _warned:
            _warned.add(name)
            log.warning("c2t_fast::%s has no compiled CUDA kernel in this build; running the pure-torch "
                        "reference on the GPU (rebuild with C2T_FAST_CUDA=1 for the fused kernel)", name)
        return ref(*args)

    return run


_fallback_lib = None
if not cuda_kernels_compiled():
    _fallback_lib = torch.library.Library("c2t_fast", "IMPL")
    for _name in _OPS:
        if not has_cuda_kernel(_name):
            _fallback_lib.impl(_name, _fallback(_name), "CUDA")


# ---------------------------------------------------------------------------------------------
# Python-facing wrappers.


class TreeBuffers(NamedTuple):
    """What verification needs for one tree of T nodes."""

    depth: torch.Tensor  # int32[T], root 0
    ancestor_bits: torch.Tensor  # int64[T, ceil(T/64)], bit j of row i: j is i or an ancestor of i
    position_ids: torch.Tensor  # int64[T] = prefix_len + depth
    retrieve_indices: torch.Tensor  # int64[L, max_depth + 1], root->leaf paths padded with -1
    leaves: torch.Tensor  # int64[L], ascending


class Tree(NamedTuple):
    """A token tree in topological order (node 0 is the root)."""

    tokens: torch.Tensor  # int64[T]
    parents: torch.Tensor  # int32[T], parents[0] == -1
    logp: torch.Tensor  # float32[T], joint log-probability of the root->node path (root 0)


class Verdict(NamedTuple):
    path: torch.Tensor  # int64[tau + 1], accepted node indices root first
    bonus: torch.Tensor  # int64[], the target's own next token after the path

    @property
    def accepted_len(self) -> int:
        """tau: accepted draft tokens, root and bonus excluded."""
        return self.path.numel() - 1


def _as_parents(parents) -> torch.Tensor:
    p = torch.as_tensor(parents)
    if p.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"parents must be an integer tensor, got {p.dtype}")
    if p.dtype == torch.int64 and p.numel():
        lo, hi = torch.aminmax(p)
        # int32 would wrap such values to small, valid-looking ids
        if int(lo) < -(2 ** 31) or int(hi) >= 2 ** 31:
            raise ValueError(f"parents holds {int(lo) if int(lo) < -(2 ** 31) else int(hi)}, outside int32; a "
                             "parent index must be a node of the tree")
    return p.to(torch.int32)


def build_tree(parents, prefix_len: int = 0) -> TreeBuffers:
    """Derive verification buffers from ``parents`` (int32/int64 [T], topological, root at 0)."""
    return TreeBuffers(*torch.ops.c2t_fast.build_tree(_as_parents(parents), int(prefix_len)))


def prune_tree(tree: Tree, cand_parent, cand_token, cand_logp, cand_conf, cand_keep,
               max_keep: int) -> tuple[Tree, torch.Tensor, torch.Tensor]:
    """C2T second pruning for one layer of scored candidates ``[N]``.

    Keeps at most ``max_keep`` (``< 0``: no cap) of the candidates with ``cand_keep`` by confidence,
    appends them (in candidate order) to ``tree``. Returns ``(new_tree, frontier, selected)`` where
    ``frontier`` are the new nodes' indices in the tree and ``selected`` their candidate indices.
    """
    tokens, parents, logp, frontier, selected = torch.ops.c2t_fast.prune_tree(
        tree.tokens, tree.parents, tree.logp, cand_parent, cand_token, cand_logp, cand_conf,
        cand_keep, int(max_keep))
    return Tree(tokens, parents, logp), frontier, selected


def rerank_tree(tree: Tree, total_tokens: int) -> tuple[Tree, torch.Tensor]:
    """EAGLE-2 rerank: the root and the top ``total_tokens - 1`` nodes by joint log-prob, closed
    under parents and renumbered. Returns ``(new_tree, selected)`` (original node indices)."""
    tokens, parents, logp, selected = torch.ops.c2t_fast.rerank_tree(
        tree.tokens, tree.parents, tree.logp, int(total_tokens))
    return Tree(tokens, parents, logp), selected


def verify_greedy(tokens: torch.Tensor, parents, target: torch.Tensor) -> Verdict:
    """Greedy acceptance. ``target`` is the target's logits over the tree ``[T, V]`` or their
    argmax ``int64[T]``."""
    return Verdict(*torch.ops.c2t_fast.verify_greedy(tokens, _as_parents(parents), target))


def verify_sample(tokens: torch.Tensor, parents, probs: torch.Tensor,
                  uniforms: torch.Tensor | None = None, generator: torch.Generator | None = None) -> Verdict:
    """Lossless sampling acceptance. ``probs [T, V]`` are the target's processed probabilities
    (temperature / top-k / top-p applied); ``uniforms float64[T]`` (slot 0 draws the bonus token)
    are drawn from ``generator`` when not given."""
    if uniforms is None:
        uniforms = torch.rand(tokens.numel(), dtype=torch.float64, generator=generator,
                              device=probs.device if generator is None else generator.device)
        uniforms = uniforms.to(probs.device)
    return Verdict(*torch.ops.c2t_fast.verify_sample(tokens, _as_parents(parents), probs, uniforms))


def compact_kv(caches: Sequence[torch.Tensor], prefix_len: int, accepted: torch.Tensor) -> int:
    """Move the accepted tree slots of every cache ``[B, Hkv, S, D]`` right after the prefix, in
    place, in one call. Returns the new valid length ``prefix_len + len(accepted)``."""
    torch.ops.c2t_fast.compact_kv(list(caches), int(prefix_len), accepted)
    return int(prefix_len) + accepted.numel()


# ---------------------------------------------------------------------------------------------
# tree_attention: Triton on CUDA, a split prefix/tree composite on the CPU.

MAX_TREE_NODES = 4096
_ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lib = torch.library.Library("c2t_fast", "FRAGMENT")
_lib.define("tree_attention(Tensor q, Tensor k, Tensor v, Tensor ancestor_bits, int prefix_len, "
            "float scale) -> Tensor")


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
    from ..triton_kernels.tree_attention import tree_attention as triton_tree_attention

    return triton_tree_attention(q, k, v, _bits_3d(ancestor_bits, q.shape[0]), prefix_len, scale)


_lib.impl("tree_attention", _tree_attention_cpu, "CPU")
_lib.impl("tree_attention", _tree_attention_cuda, "CUDA")


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


# ---------------------------------------------------------------------------------------------
# score_children: batched C2T classifier scoring of one expansion layer.

_lib.define("score_children(Tensor logits, Tensor top_values, Tensor top_indices, Tensor parent_logp, "
            "int depth, int k, Tensor w1, Tensor b1, Tensor w2, Tensor b2, float beta, bool log_p) -> "
            "(Tensor confidence, Tensor keep, Tensor tokens, Tensor child_logp, Tensor entropy)")

MAX_CLASSIFIER_HIDDEN = 64


def _check_score_children(logits, top_values, top_indices, parent_logp, k, w1, b1, w2, b2) -> None:
    op = "score_children"
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"{op}: logits must be floating [n, V], got {logits.dtype} {tuple(logits.shape)}")
    n, V = logits.shape
    if top_values.dim() != 2 or top_values.shape[0] != n or top_indices.shape != top_values.shape:
        raise ValueError(f"{op}: top_values/top_indices must both be [n, M] with n = {n}, got "
                         f"{tuple(top_values.shape)} and {tuple(top_indices.shape)}")
    M = top_values.shape[1]
    if top_indices.dtype != torch.int64:
        raise ValueError(f"{op}: top_indices must be int64 (from torch.topk), got {top_indices.dtype}")
    if not 1 <= k <= min(M, V):
        raise ValueError(f"{op}: k = {k} must be in 1..min(M, V) = {min(M, V)}")
    if M > V:
        raise ValueError(f"{op}: top-M = {M} exceeds the vocabulary {V}")
    if parent_logp.shape != (n,):
        raise ValueError(f"{op}: parent_logp must be [n] = [{n}], got {tuple(parent_logp.shape)}")
    h = w1.shape[0] if w1.dim() == 2 else -1
    if w1.dim() != 2 or w1.shape[1] != 3 or b1.shape != (h,) or w2.shape != (1, h) or b2.shape != (1,):
        raise ValueError(f"{op}: classifier weights must be W1 [h, 3], b1 [h], W2 [1, h], b2 [1]; got "
                         f"{tuple(w1.shape)}, {tuple(b1.shape)}, {tuple(w2.shape)}, {tuple(b2.shape)}")
    if not 1 <= h <= MAX_CLASSIFIER_HIDDEN:
        raise ValueError(f"{op}: hidden size {h} outside 1..{MAX_CLASSIFIER_HIDDEN}")
    if any(t.dtype != torch.float32 for t in (w1, b1, w2, b2)):
        raise ValueError(f"{op}: classifier weights must be float32")
    tensors = (logits, top_values, top_indices, parent_logp, w1, b1, w2, b2)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted({str(t.device) for t in tensors})}")


def _score_children_cpu(logits, top_values, top_indices, parent_logp, depth, k, w1, b1, w2, b2, beta, log_p):
    """The one pass over V is the log-sum-exp, read off torch's fused log_softmax at each row's maximum
    (lse = max - log_softmax[argmax]; on the CPU that single vectorised kernel beats torch.logsumexp 2x
    and a scalar loop 5x); the rest runs fused per row in C++ (``c2t_fast::_score_tail``)."""
    _check_score_children(logits, top_values, top_indices, parent_logp, k, w1, b1, w2, b2)
    row_max = top_values[:, :1].float()
    lse = row_max - torch.log_softmax(logits.float(), -1).gather(-1, top_indices[:, :1])
    lse = torch.where(torch.isneginf(row_max), row_max, lse)  # an all -inf row: p = 0 everywhere
    return torch.ops.c2t_fast._score_tail(top_values, top_indices, lse.view(-1), parent_logp, float(depth), k,
                                          w1, b1, w2, b2, beta, log_p)


def _score_children_cuda(logits, top_values, top_indices, parent_logp, depth, k, w1, b1, w2, b2, beta, log_p):
    _check_score_children(logits, top_values, top_indices, parent_logp, k, w1, b1, w2, b2)
    from ..triton_kernels.score_children import score_children as triton_score_children

    return triton_score_children(logits if logits.stride(1) == 1 else logits.contiguous(),
                                 top_values if top_values.stride(1) == 1 else top_values.contiguous(),
                                 top_indices if top_indices.stride(1) == 1 else top_indices.contiguous(),
                                 parent_logp.contiguous(), depth, k, w1.contiguous(), b1.contiguous(),
                                 w2.contiguous(), b2.contiguous(), beta, log_p)


_lib.impl("score_children", _score_children_cpu, "CPU")
_lib.impl("score_children", _score_children_cuda, "CUDA")


@torch.library.register_fake("c2t_fast::score_children")
def _score_children_fake(logits, top_values, top_indices, parent_logp, depth, k, w1, b1, w2, b2, beta, log_p):
    _check_score_children(logits, top_values, top_indices, parent_logp, k, w1, b1, w2, b2)
    n = logits.shape[0]
    f = logits.new_empty((n, k), dtype=torch.float32)
    return (f, logits.new_empty((n, k), dtype=torch.bool), logits.new_empty((n, k), dtype=torch.int64),
            f.new_empty((n, k)), f.new_empty((n,)))


class LayerScores(NamedTuple):
    confidence: torch.Tensor  # float32 [n, K], sigmoid output C
    keep: torch.Tensor  # bool [n, K], C >= beta (first pruning)
    tokens: torch.Tensor  # int64 [n, K], child tokens (top-K of each row)
    child_logp: torch.Tensor  # float32 [n, K], joint log-prob of each child
    entropy: torch.Tensor  # float32 [n], top-M entropy of each row (shared by its children)


def score_children(logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor,
                   parent_logp: torch.Tensor, depth: int, k: int, weights, beta: float,
                   log_p: bool = False) -> LayerScores:
    """Score the top-``k`` children of every frontier row in one launch.

    logits ``[n, V]`` (fp32/fp16/bf16) are the draft's next-token logits of the n frontier nodes;
    ``top_values, top_indices = torch.topk(logits, M)`` (sorted); ``parent_logp [n]`` the frontier's
    joint log-probs; ``depth`` the children's depth (root's children: 0); ``weights`` the classifier's
    ``(W1 [h, 3], b1 [h], W2 [1, h], b2 [1])`` in fp32 (unused features have zero columns).
    """
    w1, b1, w2, b2 = weights
    return LayerScores(*torch.ops.c2t_fast.score_children(
        logits, top_values, top_indices, parent_logp, int(depth), int(k), w1, b1, w2, b2, float(beta), bool(log_p)))


# ---------------------------------------------------------------------------------------------
# skinny_linear: a CPU GEMM for few rows (tree verification), C++ with an AVX2/FMA micro-kernel.


@torch.library.register_fake("c2t_fast::skinny_linear")
def _skinny_linear_fake(x, weight, bias=None):
    torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: "skinny_linear: x [M, K] and weight [N, K]")
    return x.new_empty((x.shape[0], weight.shape[0]))


def _skinny_linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _skinny_linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    gx = grad @ weight if ctx.needs_input_grad[0] else None
    gw = grad.T @ x if ctx.needs_input_grad[1] else None
    gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return gx, gw, gb


torch.library.register_autograd("c2t_fast::skinny_linear", _skinny_linear_backward, setup_context=_skinny_linear_setup)

# Rows up to which hf.fast_linear routes a layer here: at 32 rows the whole verification pass was as
# fast as or faster than with F.linear in three runs, at 64 slower in one of them (BENCHMARKS.md,
# "Verification that costs about one step"). The op itself takes any number of rows.
SKINNY_MAX_ROWS = 32


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a few rows on the CPU, reading each weight row from memory once.

    x ``float32 [..., K]`` (any leading shape, unit stride along K), weight ``float32 [N, K]``
    contiguous, bias ``float32 [N]`` or None -> ``float32 [..., N]``. Agrees with ``F.linear`` to fp32
    rounding (a different summation order), not bit for bit. Meant for ``x`` of up to
    ``SKINNY_MAX_ROWS`` rows; more rows are correct but not faster than ``F.linear``."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"skinny_linear: x must be a tensor [..., K], got {type(x).__name__}"
                         f"{'' if not isinstance(x, torch.Tensor) else ' of rank 0'}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.ops.c2t_fast.skinny_linear(x2, weight, bias)
    return y.view(*lead, y.shape[-1])


# ---------------------------------------------------------------------------------------------
# decode_attention: batched one-token attention over a static cache (kernels/decode_attention.py).

from .decode_attention import decode_attention  # noqa: E402  (needs _C loaded above)

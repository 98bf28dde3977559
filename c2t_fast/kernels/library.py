"""Loading the compiled operators and the Python side of their registration.

Every schema of ``torch.ops.c2t_fast`` is written once, in ``csrc/c2t/ops.cpp``. Importing this module
loads ``c2t_fast._C`` (which registers those schemas and the C++ kernels) and gives the op-family modules
what they share: ``IMPL``, the one library through which Python kernels register (the Triton launchers,
the CPU composites, the explicit CUDA fallbacks), a dynamic size for fake kernels, and the one-time
warning of a fallback."""

from __future__ import annotations

import logging

import torch

try:
    from .. import _C  # noqa: F401  (registers the operators)
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "c2t_fast._C is not built. Install with `pip install --no-build-isolation -e .` after torch "
        f"(see README.md). Original error: {exc}"
    ) from exc

log = logging.getLogger("c2t_fast")

IMPL = torch.library.Library("c2t_fast", "IMPL")

# The ops whose CUDA kernels are compiled C++/CUDA (csrc/c2t/tree_ops_cuda.cpp) when the build had a toolkit.
TREE_OPS = ("build_tree", "prune_tree", "rerank_tree", "verify_greedy", "verify_sample", "compact_kv")

# Read before any Python CUDA kernel registers, so that it reports what the build holds.
_COMPILED_CUDA = {n: torch._C._dispatch_has_kernel_for_dispatch_key(f"c2t_fast::{n}", "CUDA") for n in TREE_OPS}


def has_cuda_kernel(name: str) -> bool:
    """Whether ``c2t_fast::<name>`` (a tree op) has a compiled CUDA kernel in this build."""
    return _COMPILED_CUDA[name]


def cuda_kernels_compiled() -> bool:
    """True when this build of c2t_fast._C contains the CUDA kernels of every tree op."""
    return all(_COMPILED_CUDA.values())


def dynamic_size():
    """A data-dependent output size inside a fake kernel (an unbacked symbolic int)."""
    return torch.library.get_ctx().new_dynamic_size()


_warned: set[str] = set()


def warn_fallback(name: str, why: str) -> None:
    """Log once per op that a CUDA tensor runs the pure-torch reference instead of a kernel."""
    if name not in _warned:
        _warned.add(name)
        log.warning("c2t_fast::%s has no compiled CUDA kernel in this build; running the pure-torch reference on "
                    "the GPU (%s)", name, why)

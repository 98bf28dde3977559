"""The kernels room: ``ops`` is the one door into the compiled C++/CUDA ops (``c2t_fast._C``) and the
Triton kernels (``kernels/triton/``), re-exporting one module per op family (``tree_ops``,
``tree_attention``, ``score_children``, ``skinny_linear``, ``decode_attention``; ``library`` loads the
compiled schemas); ``reference`` holds their pure-torch references. Knows nothing of transformers or of
decoding."""

from . import ops, reference

__all__ = ["ops", "reference"]

"""The kernels room: ``ops`` is the one door into the compiled C++/CUDA ops (``c2t_fast._C``) and the
Triton kernels (``c2t_fast.triton_kernels``); ``reference`` holds their pure-torch references. Knows
nothing of transformers or of decoding."""

from . import ops, reference

__all__ = ["ops", "reference"]

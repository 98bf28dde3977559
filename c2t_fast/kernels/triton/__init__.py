"""Triton kernels of c2t_fast (tree attention, classifier scoring), as FlashInfer keeps its own under
``flashinfer.triton``. They know nothing about models; their only callers are the op-family modules one
level up (``kernels.tree_attention``, ``kernels.score_children``), which check arguments before launching.
"""

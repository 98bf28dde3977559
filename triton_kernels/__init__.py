"""Triton kernels of c2t_fast, installed as ``c2t_fast.triton_kernels``.

Never imported as a top-level ``triton_kernels``: that name belongs to OpenAI Triton's kernel
package (vLLM installs it). Kernels here know nothing about models; ``c2t_fast/ops.py`` is their
only caller.
"""

"""wisca_fast: output-preserving attention weight rescaling for training (WISCA, arXiv:2508.16676).

The fused rescale op and the model integration arrive with their issue; this package currently only
reserves the import name and the build slot (``csrc/wisca`` -> ``wisca_fast._C``).
"""

__version__ = "0.1.0"

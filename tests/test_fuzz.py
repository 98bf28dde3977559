"""Property-based fuzzing of every registered op (tests/fuzz_ops.py), each op in its own interpreter so
that a crash in a kernel fails this test instead of killing the runner.

Default run: a bounded, seeded number of examples per op (seconds). More, with fresh seeds:

    C2T_FAST_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py -m fuzz -p no:randomly

(``-m fuzz`` also runs the Triton kernels through their interpreter, which is slow).
"""

import os
import subprocess
import sys

import pytest

from fuzz_ops import FUZZERS

HERE = os.path.dirname(os.path.abspath(__file__))
LONG = "C2T_FAST_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("C2T_FAST_FUZZ_EXAMPLES", "40"))
TRITON = {"score_children_triton", "tree_attention_triton"}


def _fuzz(op: str, examples: int) -> str:
    cmd = [sys.executable, os.path.join(HERE, "fuzz_ops.py"), op, "--examples", str(examples)]
    if not LONG:
        cmd += ["--seed", "0"]  # the default run is repeatable; the long run draws fresh examples
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, (f"fuzz_ops.py {op}: exit {proc.returncode} (negative: killed by a signal)\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout


def test_fuzz_every_cpu_op():
    """One process for all of them (start-up dominates a bounded run); a crash still fails this test,
    and the last op printed before it names the one that crashed."""
    out = _fuzz("cpu", EXAMPLES)
    for op in sorted(set(FUZZERS) - TRITON):
        assert f"{op}: " in out, out


@pytest.mark.fuzz
@pytest.mark.parametrize("op", sorted(TRITON))
def test_fuzz_triton_interpreter(op):
    out = _fuzz(op, EXAMPLES if LONG else 2)
    assert f"{op}: " in out, out

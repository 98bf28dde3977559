import os
import sys

# The benchmarks build their inputs with the tests' tree generators.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

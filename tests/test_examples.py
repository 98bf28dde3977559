"""The README's offline example runs as a reader would run it, and its claim holds."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_your_model_example_runs_offline_and_matches_greedy(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "your_model.py"), "--dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "draft: EagleDraftHead" in out.stdout and "identical    : True" in out.stdout
    assert (tmp_path / "eagle_head" / "model.safetensors").is_file() and (tmp_path / "model" / "config.json").is_file()

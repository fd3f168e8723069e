"""The `tokenmill` command: a real subprocess, the default model, and clear errors."""

from __future__ import annotations

import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenmill.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_default_model():
    proc = _run("generate", "What is the capital of France?", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_bad_model_path_is_one_clear_line():
    proc = _run("generate", "hi", "--model", "/no/such/model")
    assert proc.returncode == 1
    assert "model path '/no/such/model' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr

"""The example scripts run offline and do what they say."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def _run(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_agc_in_optax_loop():
    proc = _run("agc_in_optax_loop.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = float(proc.stdout.strip().splitlines()[-1].split()[-1])
    assert accuracy > 0.8
    assert "AGC clip fraction" in proc.stdout


def test_train_wrapper_help():
    proc = _run("train.py", "--help")
    assert proc.returncode == 0 and "--no-agc" in proc.stdout


@pytest.mark.slow
def test_finetune_nfnet_offline():
    proc = _run("finetune_nfnet.py", "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "random initialisation" in proc.stdout and "held-out accuracy" in proc.stdout

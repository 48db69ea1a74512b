"""Running the CLI in a subprocess, sharing one persistent compilation cache per test module."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def cli_env(cache_dir=None, devices: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if cache_dir is not None:
        # Runs of the same configuration reuse the compiled step instead of compiling again.
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "agc_optax.train", *args]


def run_cli(*args: str, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args), env=env or cli_env(), capture_output=True, text=True, timeout=timeout
    )


def preempted_step(err: str, checkpoint_dir) -> int:
    """The step of the CLI's one-line preemption message in ``err`` (asserting its form)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    found = re.fullmatch(
        r"agc-train: preempted at step (\d+); checkpoint saved to (.+); "
        r"rerun with --resume to continue",
        lines[0],
    )
    assert found and found.group(2) == str(checkpoint_dir), lines[0]
    return int(found.group(1))

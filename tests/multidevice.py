"""Run a snippet in a fresh Python process that sees several virtual CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

PRELUDE = 'import jax\njax.config.update("jax_num_cpu_devices", {n})\n'


def run_on_cpu_devices(script: str, num_devices: int = 8, timeout: int = 300) -> str:
    """Runs ``script`` with ``num_devices`` CPU devices; returns stdout, fails with stderr."""
    code = PRELUDE.format(n=num_devices) + textwrap.dedent(script)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{proc.stderr[-4000:]}")
    return proc.stdout

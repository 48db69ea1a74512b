"""Nothing lost: a SIGKILLed run resumed with --resume ends bit for bit where an uninterrupted run
ends, and an unreadable latest checkpoint falls back to the previous one with a warning."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from cli_util import cli_command, cli_env, run_cli

from agc_optax.training.checkpoint import read_checkpoint

ARGS = ("--preset", "smoke", "--checkpoint-every", "10", "--eval-every", "1000", "--no-progress")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(cache_dir=tmp_path_factory.mktemp("jax_cache"))


def _finished_steps(ckpt_dir) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def test_sigkill_then_resume_equals_uninterrupted_bit_for_bit(tmp_path, env):
    steps = ("--steps", "80")
    full = run_cli(*ARGS, *steps, "--run-dir", str(tmp_path / "full"), env=env)
    assert full.returncode == 0, full.stderr[-3000:]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        cli_command(*ARGS, *steps, "--run-dir", str(run_dir)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    try:
        while not _finished_steps(run_dir / "checkpoints") and proc.poll() is None:
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _finished_steps(run_dir / "checkpoints")[-1]
    assert killed_at < 80

    resumed = run_cli(*ARGS, *steps, "--run-dir", str(run_dir), "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout

    a, step_a = read_checkpoint(str(tmp_path / "full" / "checkpoints"))
    b, step_b = read_checkpoint(str(run_dir / "checkpoints"))
    assert step_a == step_b == 80
    leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [k for k, _ in leaves_a] == [k for k, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        # Params, optimizer state (momentum, AGC stats, step count), EMA: identical bits.
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def test_unreadable_latest_checkpoint_falls_back_with_warning(tmp_path, env):
    run_dir = tmp_path / "run"
    first = run_cli(*ARGS, "--steps", "20", "--run-dir", str(run_dir), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert _finished_steps(ckpts) == [10, 20]
    # Damage step 20 the way a failing disk would: its array data files lose their contents.
    damaged = 0
    for root, _, files in os.walk(ckpts / "20" / "state"):
        for name in files:
            if os.sep + "d" in root:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(3)
                damaged += 1
    assert damaged

    resumed = run_cli(*ARGS, "--steps", "30", "--run-dir", str(run_dir), "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    warning = [line for line in resumed.stderr.splitlines() if "warning" in line]
    assert warning and "checkpoint 20" in warning[0] and "falling back" in warning[0]
    assert "resumed from step 10" in resumed.stdout
    assert _finished_steps(ckpts)[-1] == 30
    assert (ckpts / "20.unreadable").is_dir()  # kept for inspection, never listed again

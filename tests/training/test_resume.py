"""Nothing lost: a SIGKILLed or SIGTERMed run resumed with --resume ends bit for bit where an
uninterrupted run ends, and an unreadable latest checkpoint falls back to the previous one with a
warning."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from cli_util import cli_command, cli_env, preempted_step, run_cli

from agc_optax.training.checkpoint import read_checkpoint

ARGS = ("--preset", "smoke", "--checkpoint-every", "10", "--eval-every", "1000", "--no-progress")
STEPS = ("--steps", "80")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(cache_dir=tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
    """The checkpoint directory of an 80-step run that nothing interrupted."""
    run_dir = tmp_path_factory.mktemp("full")
    full = run_cli(*ARGS, *STEPS, "--run-dir", str(run_dir), env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    return run_dir / "checkpoints"


def _finished_steps(ckpt_dir) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def _assert_bit_identical(ckpt_a, ckpt_b) -> None:
    a, step_a = read_checkpoint(str(ckpt_a))
    b, step_b = read_checkpoint(str(ckpt_b))
    assert step_a == step_b == 80
    leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [k for k, _ in leaves_a] == [k for k, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        # Params, optimizer state (momentum, AGC stats, step count), EMA: identical bits.
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def _assert_each_step_logged_once(metrics_path) -> None:
    """Steps run again after a resume (logged before the kill, past the checkpoint) appear once."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    counts = collections.Counter((r["split"], r["step"]) for r in records)
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(5, 81, 5))


def test_sigkill_then_resume_equals_uninterrupted_bit_for_bit(tmp_path, env, uninterrupted):
    steps = STEPS
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
    _assert_bit_identical(uninterrupted, run_dir / "checkpoints")
    _assert_each_step_logged_once(run_dir / "metrics.jsonl")


def test_sigterm_saves_the_step_reached_then_resume_is_bit_identical(tmp_path, env, uninterrupted):
    """What a scheduler or a TPU VM sends before preemption: one line, a checkpoint, exit 143."""
    run_dir = tmp_path / "preempted"
    proc = subprocess.Popen(
        cli_command(*ARGS, *STEPS, "--run-dir", str(run_dir)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    try:
        while not (metrics.is_file() and metrics.stat().st_size) and proc.poll() is None:
            assert time.time() < deadline, "no step was logged"
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before the signal"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM == 143, err[-3000:]
    stopped_at = preempted_step(err, run_dir / "checkpoints")
    assert 5 <= stopped_at < 80
    assert _finished_steps(run_dir / "checkpoints")[-1] == stopped_at  # committed, not in flight

    resumed = run_cli(*ARGS, *STEPS, "--run-dir", str(run_dir), "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in resumed.stdout
    _assert_bit_identical(uninterrupted, run_dir / "checkpoints")
    _assert_each_step_logged_once(metrics)


@pytest.mark.slow  # ~75 s on 2 cores; the warning text has a unit test in test_checkpoint
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

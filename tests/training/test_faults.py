"""Fail loudly, lose nothing: divergence, preemption and storage faults of a training run.

Divergence: a non-finite step is skipped inside the step, and a run of them stops the CLI with exit
code 3, its newest checkpoint finite. Preemption: a signal reaching one of two processes stops
both at the same step with a checkpoint. Storage: an unusable checkpoint directory is one line and
exit 2 before training; a full disk mid-run is one line and exit 1, earlier checkpoints intact.
(SIGTERM then --resume, bit for bit, is in test_resume.py next to the SIGKILL case.)
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli_util import cli_command, cli_env, preempted_step, run_cli
from flax import nnx
from tiny_model import TinyNet, tiny_model

import agc_optax
from agc_optax.training import (
    PRESETS,
    MetricsWriter,
    build_optimizer,
    init_state,
    make_train_step,
    read_metrics,
    split_model,
    train,
)
from agc_optax.training.checkpoint import CheckpointWriteError, read_checkpoint

SMOKE = ("--preset", "smoke", "--no-progress")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_worker.py")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(cache_dir=tmp_path_factory.mktemp("jax_cache"))


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_same(a, b) -> None:
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _assert_optimizer_kept(after, before) -> None:
    """The optimizer's buffers and count are as before; a fused optimizer's AGC statistics and
    guard record describe the skipped step instead."""
    if isinstance(before, agc_optax.SgdAgcState):
        _assert_same((after.count, after.momentum), (before.count, before.momentum))
        if isinstance(before.guard, agc_optax.SkipNonfiniteState):
            assert not bool(after.guard.last_finite)
            assert int(after.guard.total_notfinite) == int(before.guard.total_notfinite) + 1
            assert not np.isfinite(float(after.agc.max_ratio))
    else:
        _assert_same(after, before)


# --- Divergence ----------------------------------------------------------------------------------


class _WithBatchNorm(nnx.Module):
    """conv -> BatchNorm -> relu -> mean-pool -> head: a model with batch statistics."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.norm(self.conv(x))).mean(axis=(1, 2)))


def _setup(learning_rate, model=None):
    split, params, stats = split_model(model or TinyNet(10, rngs=nnx.Rngs(0)))
    tx = build_optimizer(PRESETS["smoke"], optax.constant_schedule(learning_rate))  # AGC on
    return split, tx, init_state(params, stats, tx)


def _batch():
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, 8, 8, 3)).astype(np.float32), np.arange(8) % 10


@pytest.mark.parametrize("step_flag", [True, False], ids=["skip_nonfinite", "optimizer_only"])
def test_a_nonfinite_step_leaves_the_state_unchanged_but_the_step_counter(step_flag):
    # The trainer's sgd_agc guards itself (skip_nonfinite=True): the step follows its decision
    # for the batch statistics and the EMA, with or without its own flag.
    split, tx, state = _setup(0.1, _WithBatchNorm(nnx.Rngs(0)))
    assert isinstance(state.opt_state.guard, agc_optax.SkipNonfiniteState)
    assert state.batch_stats  # BatchNorm's statistics: kept on a skipped step too
    step = jax.jit(make_train_step(split, tx, seed=0, ema=0.9, skip_nonfinite=step_flag))
    images, labels = _batch()
    good, metrics = step(state, (images, labels))
    assert float(metrics["skipped"]) == 0.0 and int(good.step) == 1
    assert not np.array_equal(_leaves(good.params)[0], _leaves(state.params)[0])

    poisoned = images.copy()
    poisoned[3, 2, 2, 0] = np.nan  # one pixel: NaN gradients
    after, metrics = step(good, (poisoned, labels))
    assert float(metrics["skipped"]) == 1.0 and np.isnan(float(metrics["grad_norm"]))
    assert int(after.step) == 2  # the batch is consumed; the next step draws the next one
    for field in ("params", "batch_stats", "ema_params"):
        _assert_same(getattr(after, field), getattr(good, field))
    _assert_optimizer_kept(after.opt_state, good.opt_state)


class _NaNGradient(nnx.Module):
    """Finite logits and loss, but d(loss)/d(p) = 0 * (1 / (2 sqrt(0))) = NaN."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(8 * 8 * 3, 10, rngs=rngs)
        self.p = nnx.Param(jnp.zeros(()))

    def __call__(self, x):
        return self.dense(x.reshape(x.shape[0], -1)) + 0.0 * jnp.sqrt(self.p[...])


OPTIMIZERS = {
    "sgd_agc": lambda: agc_optax.sgd_agc(0.1, stats=True),
    "sgd_agc(skip_nonfinite)": lambda: agc_optax.sgd_agc(0.1, stats=True, skip_nonfinite=True),
    "optax.sgd": lambda: optax.sgd(0.1, 0.9),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_nan_gradients_with_a_finite_loss_are_skipped(optimizer):
    # sgd_agc: the step's guard reads AGC's max_ratio; sgd_agc(skip_nonfinite): the optimizer
    # decides from its unit norms; optax.sgd: the step reduces the gradients itself.
    split, params, stats = split_model(_NaNGradient(nnx.Rngs(0)))
    tx = OPTIMIZERS[optimizer]()
    state = init_state(params, stats, tx, ema=False)
    after, metrics = jax.jit(make_train_step(split, tx, seed=0, skip_nonfinite=True))(
        state, _batch()
    )
    assert np.isfinite(float(metrics["loss"])) and np.isnan(float(metrics["grad_norm"]))
    assert float(metrics["skipped"]) == 1.0
    _assert_same(after.params, state.params)
    _assert_optimizer_kept(after.opt_state, state.opt_state)


def test_an_infinite_update_poisons_the_weights_and_every_later_step_is_skipped():
    # The guard decides before the update (so that it costs no pass of its own): a step whose
    # loss and gradients are finite is applied, even if the update overflows. Its non-finite
    # weights then make every later step's gradients (AGC's max_ratio) non-finite, so those
    # steps change nothing and the trainer stops after --max-bad-steps (the CLI test below).
    split, tx, state = _setup(np.inf)
    step = jax.jit(make_train_step(split, tx, seed=0, skip_nonfinite=True))
    poisoned, metrics = step(state, _batch())
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not np.isfinite(float(metrics["update_norm"])) and float(metrics["skipped"]) == 0.0
    assert not all(np.isfinite(x).all() for x in _leaves(poisoned.params))
    after, metrics = step(poisoned, _batch())
    assert float(metrics["skipped"]) == 1.0 and int(after.step) == 2
    _assert_same(after.params, poisoned.params)
    _assert_optimizer_kept(after.opt_state, poisoned.opt_state)


def test_divergence_exits_3_naming_the_step_and_keeps_finite_checkpoints(
    tmp_path, env, monkeypatch
):
    run_dir = tmp_path / "run"
    args = ("--lr", "1e6", "--no-agc", "--steps", "20", "--checkpoint-every", "2")
    proc = run_cli(*SMOKE, *args, "--eval-every", "100", "--run-dir", str(run_dir), env=env)
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    found = re.match(r"agc-train: error: training diverged at step (\d+): 5 consecutive", lines[0])
    assert found and "`--max-bad-steps`" in lines[0], lines[0]
    stopped_at = int(found.group(1))
    assert stopped_at < 20
    assert not (run_dir / "summary.json").exists()  # no test accuracy claimed for a dead run

    train = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if r["split"] == "train"]
    assert sum(r["skipped_steps"] for r in train) >= 1

    # Every checkpoint kept is finite, the newest among them; read back by a relative path.
    monkeypatch.chdir(tmp_path)
    steps = sorted(int(n) for n in os.listdir("run/checkpoints") if n.isdigit())
    assert steps and steps[-1] <= stopped_at
    assert f"step {steps[-1]} in `{run_dir / 'checkpoints'}`, is finite" in lines[0]
    for step in steps:
        state, read_step = read_checkpoint(os.path.join("run", "checkpoints"), step)
        assert read_step == step and int(state["step"]) == step
        assert all(np.isfinite(x).all() for x in _leaves(state)), step


# --- Preemption on several processes -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_train_record(metrics_path, procs, timeout=300) -> None:
    """Until process 0 has logged a step: every process is then inside the training loop."""
    deadline = time.time() + timeout
    while not (os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0):
        assert all(p.poll() is None for p in procs), "a process ended before training"
        assert time.time() < deadline, "no metrics record appeared"
        time.sleep(0.02)


def test_sigint_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """The signal reaches only process 1; the step's stop vote carries it to process 0."""
    run_dir = tmp_path / "run"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(tmp_path / "unused.npz"), str(run_dir)]
            + ["--steps", "100000", "--coordinator", f"127.0.0.1:{port}"]
            + ["--num-processes", "2", "--process-id", str(i)],
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        _wait_for_train_record(run_dir / "metrics.jsonl", procs)
        procs[1].send_signal(signal.SIGINT)
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    stops = []
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 130, err[-3000:]
        stops.append(preempted_step(err, run_dir / "checkpoints"))
    assert stops[0] == stops[1] < 100000
    state, step = read_checkpoint(str(run_dir / "checkpoints"))
    assert step == stops[0] == int(state["step"])


# --- Storage -------------------------------------------------------------------------------------


def _unprivileged(command: list[str]) -> list[str]:
    """As root, permission bits bind only without CAP_DAC_OVERRIDE: drop it for the child."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only directory cannot be made")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]


@pytest.mark.parametrize("case", ["read-only", "a file"])
def test_unusable_checkpoint_dir_is_one_line_and_exit_2_before_training(tmp_path, case):
    target = tmp_path / "checkpoints"
    if case == "read-only":
        target.mkdir()
        target.chmod(0o555)
        message = f"checkpoint directory `{target}` is not writable (Permission denied)"
    else:
        target.write_text("not a directory")
        message = f"checkpoint directory `{target}` is a file, not a directory"
    command = cli_command(
        *SMOKE, "--run-dir", str(tmp_path / "run"), "--checkpoint-dir", str(target)
    )
    proc = subprocess.run(
        _unprivileged(command), env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agc-train: error: "), proc.stderr[-3000:]
    assert message in lines[0] and "--checkpoint-dir" in lines[0], lines[0]
    assert "training" not in proc.stdout  # stopped before the model was built


def test_disk_full_mid_run_is_one_error_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    """ENOSPC raised where orbax's background thread writes array data (a real full tmpfs gives
    tensorstore's RESOURCE_EXHAUSTED [os_error_code='28'], reported the same way)."""
    from orbax.checkpoint._src.serialization import serialization

    ckpt_dir = tmp_path / "run" / "checkpoints"
    write_estimate = serialization.estimate_write_memory_footprint

    def disk_full_after_the_first_checkpoint(array):
        if any(name.isdigit() for name in os.listdir(ckpt_dir)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_estimate(array)

    monkeypatch.setattr(
        serialization, "estimate_write_memory_footprint", disk_full_after_the_first_checkpoint
    )
    config = PRESETS["smoke"].replace(
        run_dir=str(tmp_path / "run"), steps=8, checkpoint_every=2, eval_every=100, progress=False
    )
    with pytest.raises(CheckpointWriteError) as caught:
        train(config, model_fn=tiny_model, log=lambda _: None)
    assert str(caught.value) == (
        f"cannot write checkpoint 4 to `{ckpt_dir}`: No space left on device (errno 28); "
        "the earlier checkpoints (steps 2) are intact"
    )
    state, step = read_checkpoint(str(ckpt_dir))
    assert step == 2 == int(state["step"])
    assert all(np.isfinite(x).all() for x in _leaves(state))


def test_cli_reports_a_failed_checkpoint_write_in_one_line(tmp_path, monkeypatch, capsys):
    from agc_optax import train as cli
    from agc_optax.training import trainer

    def disk_full(config):
        raise CheckpointWriteError(4, str(tmp_path), "No space left on device (errno 28)", [2])

    monkeypatch.setattr(trainer, "train", disk_full)
    # main() configures the process's warnings and absl logging as a CLI does: undo afterwards.
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(logging.getLogger("absl"), "level", logging.getLogger("absl").level)
    assert cli.main(["--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"agc-train: error: cannot write checkpoint 4 to `{tmp_path}`: No space left on device "
        "(errno 28); the earlier checkpoints (steps 2) are intact; free space and rerun with "
        "--resume\n"
    )


# --- Metrics after a resume ----------------------------------------------------------------------


def test_resumed_metrics_drop_the_records_of_replayed_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = MetricsWriter(str(path))
    for step in (5, 10, 15, 20):
        first.write({"split": "train", "step": step, "loss": float(step)})
    first.close()
    with open(path, "a") as f:
        f.write('{"split": "train", "st')  # the run was killed mid-line
    again = MetricsWriter(str(path), keep_until_step=10)
    again.write({"split": "train", "step": 15, "loss": -15.0})
    again.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(5, 5.0), (10, 10.0), (15, -15.0)]
    # A fresh start (step 0) of the same run directory keeps nothing of the old run.
    MetricsWriter(str(path), keep_until_step=0).close()
    assert path.read_text() == ""

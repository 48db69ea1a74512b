"""The trainer: one function, read top to bottom.

Sections: set-up, mesh, data, model and optimizer, state and checkpoint, steps, evaluation,
loop, wrap-up. ``agc_optax.train`` turns flags into a :class:`Config` and calls
:func:`train`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agc_optax import models
from agc_optax.training import checkpoint as ckpt_lib
from agc_optax.training import data as data_lib
from agc_optax.training import metrics as metrics_lib
from agc_optax.training import parallel, recipe
from agc_optax.training import step as step_lib
from agc_optax.training.config import Config, ConfigError, validate
from agc_optax.training.recipe import ModelFn


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a finished run reports.

    Attributes:
      run_dir: where everything went.
      steps: training steps completed (total, including those before a resume).
      test_accuracy: accuracy of the evaluated weights (EMA when enabled) on the test split.
      test_accuracy_raw: accuracy of the raw (non-EMA) weights.
      seconds: wall time of this invocation.
      params: the final parameters as host numpy arrays (pure nested dict).
      files: named output paths.
    """

    run_dir: str
    steps: int
    test_accuracy: float
    test_accuracy_raw: float
    seconds: float
    params: Any
    files: dict[str, str]


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm (``--max-bad-steps``).

    Attributes:
      step: the last skipped step (steps completed, counting from 1).
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Preempted(Exception):  # noqa: N818 (an outcome, not a fault)
    """SIGTERM or SIGINT stopped the run; a checkpoint of the step reached is committed.

    Attributes:
      step: the checkpoint's step, where ``--resume`` continues.
      checkpoint_dir: where it is.
      signal_number: the signal (of any process), e.g. ``signal.SIGTERM``.
    """

    def __init__(self, step: int, checkpoint_dir: str, signal_number: int):
        super().__init__(
            f"preempted at step {step}; checkpoint saved to {checkpoint_dir}; "
            "rerun with --resume to continue"
        )
        self.step, self.checkpoint_dir, self.signal_number = step, checkpoint_dir, signal_number


def run_dir_of(config: Config) -> str:
    """The absolute run directory: ``--run-dir``, or a new one under ``runs/``."""
    run_dir = config.run_dir or os.path.join(
        "runs",
        f"{config.model}-{config.dataset.replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    return os.path.abspath(run_dir)


def _check_writable_dir(path: str, what: str, flag: str) -> None:
    """Creates ``path`` and writes a probe file in it; a ConfigError naming ``flag`` otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what} `{path}` is a file, not a directory; pass a directory to {flag}")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"{what} `{path}` is not writable ({e.strerror}); pass a writable {flag}"
        ) from None


def _use_compile_cache(path: str) -> None:
    """Points JAX's persistent compilation cache at ``path`` unless the process already has one.

    JAX opens its cache once, at the first compilation, so another directory set earlier (by
    ``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) stays in use; the warning says which.
    """
    current = jax.config.jax_compilation_cache_dir
    if not current:
        jax.config.update("jax_compilation_cache_dir", path)
    elif os.path.abspath(current) != path:
        warnings.warn(
            f"--compile-cache `{path}` ignored: this process already uses JAX's compilation "
            f"cache at `{current}` (JAX_COMPILATION_CACHE_DIR or jax.config)",
            stacklevel=3,
        )


def _agree_on_setup(problem: str | None, process_count: int) -> None:
    """Raises on every process when process 0 found ``problem``, so none waits for the others."""
    if process_count > 1:
        from jax.experimental import multihost_utils

        failed = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
        if failed and problem is None:
            raise ConfigError("process 0 could not prepare its directories (see its error)")
    if problem is not None:
        raise ConfigError(problem)


def train(
    config: Config, *, model_fn: ModelFn | None = None, log: Callable[[str], None] = print
) -> RunResult:
    """Trains a classifier as ``config`` says.

    Args:
      config: the run configuration.
      model_fn: optional ``(num_classes, *, dtype, rngs) -> nnx.Module`` replacing
        ``create_model(config.model, ...)`` (own models; tests).
      log: where the human-readable lines go (process 0 only).

    Returns:
      The :class:`RunResult`.

    Raises:
      ConfigError, data.DataError: bad flags or data, before any training step.
      TrainingDiverged: ``config.max_bad_steps`` consecutive steps were skipped for a
        non-finite loss or gradient norm (their updates are dropped inside the step).
      Preempted: SIGTERM or SIGINT (on any process) stopped the run after the current step,
        with its checkpoint committed. A second signal acts at once.
      checkpoint.CheckpointWriteError: a checkpoint could not be written (earlier ones intact).
    """
    start_time = time.time()

    # --- Set-up -------------------------------------------------------------------------------
    if model_fn is None:
        validate(config, models.list_models())
    else:
        validate(config.replace(model="custom"), ["custom"])
    if config.coordinator:
        parallel.initialize_distributed(config.coordinator, config.num_processes, config.process_id)
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0
    say = log if is_main else (lambda _: None)
    run_dir = run_dir_of(config)
    checkpoint_dir = os.path.abspath(config.checkpoint_dir or os.path.join(run_dir, "checkpoints"))
    problem = None
    if is_main:  # before any compilation: an unusable directory fails in a second, not after
        try:
            _check_writable_dir(run_dir, "run directory", "--run-dir")
            _check_writable_dir(checkpoint_dir, "checkpoint directory", "--checkpoint-dir")
            if config.compile_cache:
                _check_writable_dir(
                    config.compile_cache, "compile cache directory", "--compile-cache"
                )
        except ConfigError as e:
            problem = str(e)
    _agree_on_setup(problem, process_count)
    if config.compile_cache:
        _use_compile_cache(os.path.abspath(config.compile_cache))

    # --- Mesh -----------------------------------------------------------------------------------
    placement = parallel.make_placement(config.parallel, shard_params=config.shard_params)
    try:
        placement.check_batch_size(config.batch_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    # --- Data ------------------------------------------------------------------------------------
    if data_lib.is_streaming(config.dataset):  # grain: decoded and augmented as it streams
        dataset = data_lib.StreamingDataset(
            config.dataset,
            config.data_dir,
            image_size=config.image_size,
            test_image_size=config.test_image_size,
            augment=config.augment,
            workers=config.workers,
        )
        batches = dataset.train_batches(
            config.batch_size, config.seed, process_index=process_index, process_count=process_count
        )
    else:
        dataset = data_lib.load_dataset(
            config.dataset, config.data_dir, image_size=config.image_size
        )
        batches = data_lib.TrainBatches(
            dataset.train,
            config.batch_size,
            config.seed,
            process_index=process_index,
            process_count=process_count,
            augment=dataset.augment,
        )
    total_steps = recipe.training_steps(config, batches.steps_per_epoch)
    eval_every = config.eval_every or batches.steps_per_epoch
    checkpoint_every = config.checkpoint_every or batches.steps_per_epoch

    # --- Model and optimizer ------------------------------------------------------------------
    # Only shapes here: the weights are computed once, in place, by the state's `init` below.
    build, abstract_model = recipe.model_builder(config, dataset.num_classes, model_fn)
    split, _, _ = step_lib.split_model(abstract_model)
    schedule = recipe.learning_rate_schedule(config, total_steps, batches.steps_per_epoch)
    tx = recipe.build_optimizer(
        config, schedule, unit_axes=getattr(abstract_model, "agc_unit_axes", None)
    )
    init = step_lib.state_initializer(build, tx, ema=config.ema is not None)

    # --- State and checkpoint ----------------------------------------------------------------
    # The state is restored into, or else created in, its place on the devices; its `step` is
    # the run's one step counter, from which the data position follows.
    checkpointer = ckpt_lib.Checkpointer(checkpoint_dir)
    state = None
    if config.resume:
        try:
            state = checkpointer.restore_latest(
                placement.abstract(init), require={"batch_size": config.batch_size}
            )
        except ckpt_lib.CheckpointMismatchError as e:
            raise ConfigError(str(e)) from None
        if state is None:
            say(f"no checkpoint in {checkpoint_dir}; starting from scratch")
    elif checkpointer.steps():
        raise ConfigError(
            f"`{checkpoint_dir}` already holds checkpoints; pass `--resume` or a new `--run-dir`"
        )
    say(
        f"training {config.model if model_fn is None else 'a custom model'} on {config.dataset} "
        f"({len(dataset.train)} train / "
        f"{len(dataset.test)} test images) for {total_steps} steps, batch {config.batch_size} "
        f"on {jax.device_count()} device(s) ({config.parallel}, {process_count} process(es))"
    )
    if state is None:
        say("compiling the initializer of weights and optimizer state...")
        started = time.time()
        state = placement.init(init)
        say(f"compiled the initializer in {time.time() - started:.1f} s")
    else:
        state = placement.place(state)
    start_step = int(placement.to_host(state.step))
    if start_step:  # restored
        say(f"resumed from step {start_step} ({checkpoint_dir})")

    # --- Steps -----------------------------------------------------------------------------------
    dtype = jnp.dtype(config.dtype)
    train_step = step_lib.compile_train_step(
        placement,
        step_lib.make_train_step(
            split,
            tx,
            seed=config.seed,
            label_smoothing=config.label_smoothing,
            ema=config.ema,
            dtype=dtype,
            pmap=placement.pmap,
            skip_nonfinite=True,
            preprocess=dataset.device_preprocess(),  # streamed data: normalise, mix
            log_every=config.log_every,  # the norms only on the steps logged
            total_steps=total_steps,
            update_norm=config.update_norm,
        ),
        programs=config.step_programs,
    )
    eval_step = placement.compile(
        step_lib.make_eval_step(
            split, dtype=dtype, pmap=placement.pmap, preprocess=dataset.device_eval_preprocess()
        )
    )

    # --- Evaluation ------------------------------------------------------------------------------
    def evaluate(params: Any, batch_stats: Any) -> dict[str, float]:
        def sums_of(*batch: Any) -> dict[str, Any]:
            return placement.to_host(
                announced_eval_step(params, batch_stats, *placement.shard(batch))
            )

        return step_lib.evaluate(
            sums_of,
            dataset.eval_batches(
                config.batch_size, process_index=process_index, process_count=process_count
            ),
        )

    def evaluate_both(state: step_lib.TrainState) -> dict[str, dict[str, float]]:
        """Test metrics of the raw weights and, when kept, of their EMA (the headline number)."""
        out = {"eval": evaluate(state.params, state.batch_stats)}
        if config.ema is not None:
            out["eval_ema"] = evaluate(state.ema_params, state.batch_stats)
        return out

    # --- Loop ------------------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(
        os.path.join(run_dir, "metrics.jsonl"), enabled=is_main, keep_until_step=start_step
    )
    if is_main:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(config.to_json(), f, indent=2)
    layout = "split over the devices" if placement.shard_params else "a whole copy on each"
    say(f"state: {_format_bytes(parallel.bytes_per_device(state))} per device ({layout})")
    # The bar starts once the train step is compiled, so that its rate and ETA are the steps'.
    bar: Any = _NoBar(say)  # until then (and with --no-progress) lines go to `say`
    train_step = _CompileNotice(train_step, "train step", lambda line: bar.write(line))
    announced_eval_step = _CompileNotice(eval_step, "eval step", lambda line: bar.write(line))
    eval_record: dict[str, dict[str, float]] = {}
    tick, tick_step = time.time(), start_step
    votes_per_process = len(jax.local_devices())
    # Each step reports whether it was skipped (non-finite) and the processes' stop vote. They
    # are read one step late, once the next step is queued, so the device never waits on the
    # host; every process reads the same values at the same step and decides alike.
    guard = _Guard(config.max_bad_steps)
    unread: tuple[int, Any] | None = None
    saved_step = start_step
    try:
        with _StopSignals() as signals:
            for step in range(start_step, total_steps):
                votes = np.full(votes_per_process, signals.received, np.int32)
                state, step_metrics = train_step(
                    state, placement.shard(batches.batch(step)), placement.shard(votes)
                )
                if step == start_step:  # compiled (jit compiles in the call, runs after it)
                    bar = _progress(
                        total_steps, start_step, say, enabled=is_main and config.progress
                    )
                    tick += train_step.seconds  # the first rate leaves compilation out
                done = step + 1
                last = done == total_steps
                if unread is not None:
                    guard.observe(*unread, placement.to_host)
                    unread = None
                flags = {k: step_metrics[k] for k in ("skipped", "stop")}
                if done % config.log_every == 0 or last:
                    m = {k: float(v) for k, v in placement.to_host(step_metrics).items()}
                    guard.observe(done, flags, placement.to_host)
                    now = time.time()
                    m["images_per_s"] = (
                        (done - tick_step) * config.batch_size / max(now - tick, 1e-9)
                    )
                    m["learning_rate"] = float(schedule(step))
                    m.update(batches.take_input_stats(now - tick))  # input_wait_fraction, ...
                    m["skipped_steps"] = guard.take_skipped_count()
                    del m["skipped"], m["stop"]
                    tick, tick_step = now, done
                    writer.write({"split": "train", "step": done, **m})
                    bar.set_postfix(
                        loss=f"{m['loss']:.3f}",
                        acc=f"{m['accuracy']:.3f}",
                        clip=f"{m['clip_fraction']:.3f}" if "clip_fraction" in m else "-",
                        img_s=f"{m['images_per_s']:.0f}",
                    )
                    if not bar.shows_progress:  # --no-progress: a batch job's log still tells
                        say(_train_line(done, total_steps, m))
                else:
                    unread = (done, flags)
                if guard.bad_run >= config.max_bad_steps:
                    checkpointer.wait()
                    raise _diverged(guard, checkpointer, config.max_bad_steps)
                stopping = guard.stop_signal and not last
                if (done % eval_every == 0 or last) and not stopping:
                    eval_record = evaluate_both(state)
                    for split_name, rec in eval_record.items():
                        writer.write({"split": split_name, "step": done, **rec})
                    bar.write(
                        f"step {done}: "
                        + ", ".join(
                            f"{k} accuracy {v['accuracy']:.4f}" for k, v in eval_record.items()
                        )
                    )
                if done % checkpoint_every == 0 or last or stopping:
                    if checkpointer.save(placement.replicate(state), config.to_json()):
                        saved_step = done
                bar.update(1)
                if stopping:
                    checkpointer.wait()  # committed before the process may be killed
                    raise Preempted(saved_step, checkpoint_dir, guard.stop_signal)
            if unread is not None:  # the last step's flags, when it was not a logged one
                guard.observe(*unread, placement.to_host)
                if guard.bad_run >= config.max_bad_steps:
                    checkpointer.wait()
                    raise _diverged(guard, checkpointer, config.max_bad_steps)
            bar.close()

            # --- Wrap-up -------------------------------------------------------------------------
            checkpointer.close()  # the last save committed, still under the signal handlers
    except BaseException:
        bar.close()
        _close_after_failure(checkpointer)  # earlier saves still complete
        writer.close()
        getattr(batches, "close", lambda: None)()  # streamed data: stop the decoding workers
        raise
    writer.close()
    getattr(batches, "close", lambda: None)()
    final = placement.to_host(state)
    if not eval_record:  # resumed at the very end: evaluate what was restored
        eval_record = evaluate_both(state)
    raw_acc = eval_record["eval"]["accuracy"]
    ema_acc = eval_record.get("eval_ema", eval_record["eval"])["accuracy"]
    files = {
        "run dir": run_dir,
        "config": os.path.join(run_dir, "config.json"),
        "metrics": writer.path,
        "checkpoints": checkpoint_dir,
    }
    if is_main:
        files["plot"] = metrics_lib.plot_metrics(
            writer.path,
            os.path.join(run_dir, "metrics.png"),
            title=f"{config.model if model_fn is None else 'custom model'} on {config.dataset}: "
            f"{run_dir}",
            label_smoothing=config.label_smoothing,
        )
        summary = {
            "steps": total_steps,
            "test_accuracy": ema_acc,
            "test_accuracy_raw": raw_acc,
            "seconds": time.time() - start_time,
        }
        files["summary"] = os.path.join(run_dir, "summary.json")
        with open(files["summary"], "w") as f:
            json.dump(summary, f, indent=2)
    result = RunResult(
        run_dir=run_dir,
        steps=total_steps,
        test_accuracy=ema_acc,
        test_accuracy_raw=raw_acc,
        seconds=time.time() - start_time,
        params=final.params,
        files=files,
    )
    which = "EMA weights" if config.ema is not None else "weights"
    say(
        f"test accuracy ({which}): {result.test_accuracy:.4f}  (raw {result.test_accuracy_raw:.4f})"
    )
    say(f"time: {result.seconds:.1f} s")
    for name, path in files.items():
        say(f"{name + ':':13s}{path}")
    return result


class _Guard:
    """The host side of the divergence guard and of the stop vote (see the loop)."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.bad_run = 0  # consecutive skipped steps
        self.last_bad_step = 0
        self.stop_signal = 0
        self._skipped = 0  # since the last train record

    def observe(self, done: int, flags: dict[str, Any], to_host: Callable[[Any], Any]) -> None:
        host = to_host(flags)
        if float(host["skipped"]):
            self.bad_run += 1
            self._skipped += 1
            self.last_bad_step = done
        else:
            self.bad_run = 0
        self.stop_signal = max(self.stop_signal, int(host["stop"]))

    def take_skipped_count(self) -> int:
        count, self._skipped = self._skipped, 0
        return count


def _diverged(
    guard: _Guard, checkpointer: ckpt_lib.Checkpointer, max_bad_steps: int
) -> TrainingDiverged:
    steps = checkpointer.steps()
    newest = (
        f"the newest checkpoint, step {steps[-1]} in `{checkpointer.directory}`, is finite"
        if steps
        else "no checkpoint was written"
    )
    return TrainingDiverged(
        f"training diverged at step {guard.last_bad_step}: {max_bad_steps} consecutive steps "
        "had a non-finite loss, gradient or update and were skipped (`--max-bad-steps`); "
        f"{newest}; lower `--lr`, or clip (AGC, `--global-clip`)",
        guard.last_bad_step,
    )


def _close_after_failure(checkpointer: ckpt_lib.Checkpointer) -> None:
    """Lets pending saves finish; a failure here was already reported or will be by the caller."""
    try:
        checkpointer.close()
    except Exception:
        pass


class _StopSignals:
    """While active, SIGTERM and SIGINT ask the loop to stop after the current step.

    ``received`` is the first signal's number (0 for none). A second signal acts at once:
    SIGINT raises ``KeyboardInterrupt``, SIGTERM terminates. Outside the main thread signals
    cannot be caught, and nothing changes.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if not self.received:
            self.received = signum
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __exit__(self, *_: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _format_bytes(n: int) -> str:
    """``1536`` -> ``'1.50 KiB'``: the largest unit (up to GiB) that keeps the number >= 1."""
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for larger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    return f"{size:.2f} {unit}"


class _CompileNotice:
    """A jitted function whose first call, the one that compiles, is announced and timed."""

    def __init__(self, fn: Callable[..., Any], what: str, show: Callable[[str], None]):
        self.fn, self.what, self.show = fn, what, show
        self.compiled = False
        self.seconds = 0.0  # the first call's

    def __call__(self, *args: Any) -> Any:
        if self.compiled:
            return self.fn(*args)
        self.show(f"compiling the {self.what}...")
        start = time.time()
        out = self.fn(*args)  # returns once compiled; the computation runs on asynchronously
        self.seconds = time.time() - start
        self.show(f"compiled the {self.what} in {self.seconds:.1f} s")
        self.compiled = True
        return out


def _train_line(done: int, total: int, m: dict[str, float]) -> str:
    """One log line of a train record, for runs without the progress bar."""
    parts = [
        f"loss {m['loss']:.4f}",
        f"accuracy {m['accuracy']:.4f}",
        f"{m['images_per_s']:.0f} images/s",
        f"lr {m['learning_rate']:.4g}",
    ]
    if "clip_fraction" in m:
        parts.append(f"clip fraction {m['clip_fraction']:.3f}")
    if m.get("skipped_steps"):
        parts.append(f"{m['skipped_steps']} skipped (non-finite)")
    return f"step {done}/{total}: " + ", ".join(parts)


class _NoBar:
    """No progress bar: lines written to it go to the trainer's log (process 0's stdout)."""

    shows_progress = False

    def __init__(self, say: Callable[[str], None]):
        self.write = say

    def set_postfix(self, **_: Any) -> None:
        pass

    def update(self, _: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, say: Callable[[str], None], *, enabled: bool) -> Any:
    if not enabled:
        return _NoBar(say)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a nicety; train without it
        return _NoBar(say)
    bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    bar.shows_progress = True
    return bar

"""The trainer: one function, read top to bottom.

Sections: set-up, mesh, data, model and optimizer, state and checkpoint, steps, evaluation,
loop, wrap-up. ``agc_optax.train`` turns flags into a :class:`Config` and calls
:func:`train`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

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


def prepare_run_dir(config: Config, is_main: bool) -> str:
    """Creates (on process 0) and checks the run directory; one-line error if unwritable."""
    run_dir = config.run_dir or os.path.join(
        "runs",
        f"{config.model}-{config.dataset.replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    run_dir = os.path.abspath(run_dir)
    if is_main:
        try:
            os.makedirs(run_dir, exist_ok=True)
            probe = os.path.join(run_dir, ".write_test")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"run directory `{run_dir}` is not writable ({e.strerror})") from None
    return run_dir


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
    run_dir = prepare_run_dir(config, is_main)

    # --- Mesh -----------------------------------------------------------------------------------
    placement = parallel.make_placement(config.parallel)
    try:
        placement.check_batch_size(config.batch_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    # --- Data ------------------------------------------------------------------------------------
    dataset = data_lib.load_dataset(config.dataset, config.data_dir, image_size=config.image_size)
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
    init = step_lib.state_initializer(build, tx)

    # --- State and checkpoint ----------------------------------------------------------------
    # The state is restored into, or else created in, its place on the devices; its `step` is
    # the run's one step counter, from which the data position follows.
    checkpoint_dir = os.path.abspath(config.checkpoint_dir or os.path.join(run_dir, "checkpoints"))
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
    state = placement.init(init) if state is None else placement.place(state)
    start_step = int(placement.to_host(state.step))
    if start_step:  # restored
        say(f"resumed from step {start_step} ({checkpoint_dir})")

    # --- Steps -----------------------------------------------------------------------------------
    dtype = jnp.dtype(config.dtype)
    train_step = placement.compile(
        step_lib.make_train_step(
            split,
            tx,
            seed=config.seed,
            label_smoothing=config.label_smoothing,
            ema=config.ema,
            dtype=dtype,
            pmap=placement.pmap,
        ),
        donate_argnums=0,
    )
    eval_step = placement.compile(step_lib.make_eval_step(split, dtype=dtype, pmap=placement.pmap))

    # --- Evaluation ------------------------------------------------------------------------------
    def evaluate(params: Any, batch_stats: Any) -> dict[str, float]:
        def sums_of(*batch: Any) -> dict[str, Any]:
            return placement.to_host(eval_step(params, batch_stats, *placement.shard(batch)))

        return step_lib.evaluate(
            sums_of,
            data_lib.eval_batches(
                dataset.test,
                config.batch_size,
                process_index=process_index,
                process_count=process_count,
            ),
        )

    def evaluate_both(state: step_lib.TrainState) -> dict[str, dict[str, float]]:
        """Test metrics of the raw weights and, when kept, of their EMA (the headline number)."""
        out = {"eval": evaluate(state.params, state.batch_stats)}
        if config.ema is not None:
            out["eval_ema"] = evaluate(state.ema_params, state.batch_stats)
        return out

    # --- Loop ------------------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(os.path.join(run_dir, "metrics.jsonl"), enabled=is_main)
    if is_main:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(config.to_json(), f, indent=2)
    say(
        f"training {config.model if model_fn is None else 'a custom model'} on {config.dataset} "
        f"({len(dataset.train)} train / "
        f"{len(dataset.test)} test images) for {total_steps} steps, batch {config.batch_size} "
        f"on {jax.device_count()} device(s) ({config.parallel}, {process_count} process(es))"
    )
    bar = _progress(total_steps, start_step, enabled=is_main and config.progress)
    eval_record: dict[str, dict[str, float]] = {}
    tick, tick_step = time.time(), start_step
    for step in range(start_step, total_steps):
        state, step_metrics = train_step(state, placement.shard(batches.batch(step)))
        done = step + 1
        last = done == total_steps
        if done % config.log_every == 0 or last:
            m = {k: float(v) for k, v in placement.to_host(step_metrics).items()}
            now = time.time()
            m["images_per_s"] = (done - tick_step) * config.batch_size / max(now - tick, 1e-9)
            m["learning_rate"] = float(schedule(step))
            tick, tick_step = now, done
            writer.write({"split": "train", "step": done, **m})
            bar.set_postfix(
                loss=f"{m['loss']:.3f}",
                acc=f"{m['accuracy']:.3f}",
                clip=f"{m['clip_fraction']:.3f}" if "clip_fraction" in m else "-",
                img_s=f"{m['images_per_s']:.0f}",
            )
        if done % eval_every == 0 or last:
            eval_record = evaluate_both(state)
            for split_name, rec in eval_record.items():
                writer.write({"split": split_name, "step": done, **rec})
            bar.write(
                f"step {done}: "
                + ", ".join(f"{k} accuracy {v['accuracy']:.4f}" for k, v in eval_record.items())
            )
        if done % checkpoint_every == 0 or last:
            checkpointer.save(placement.replicate(state), config.to_json())
        bar.update(1)
    bar.close()

    # --- Wrap-up ---------------------------------------------------------------------------------
    checkpointer.close()
    writer.close()
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
        files["plot"] = metrics_lib.plot_metrics(writer.path, os.path.join(run_dir, "metrics.png"))
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


class _NoBar:
    def set_postfix(self, **_: Any) -> None:
        pass

    def update(self, _: int) -> None:
        pass

    def write(self, _: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, *, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a nicety; train without it
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

"""The trainer: one function, read top to bottom.

Sections: set-up, mesh, data, model and optimizer, state and sharding, checkpoint, steps,
evaluation, loop, wrap-up. ``agc_optax.train`` turns flags into a :class:`Config` and calls
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
import optax
from flax import nnx

import agc_optax
from agc_optax import models
from agc_optax.training import checkpoint as ckpt_lib
from agc_optax.training import data as data_lib
from agc_optax.training import loop, parallel
from agc_optax.training import metrics as metrics_lib
from agc_optax.training.config import Config, ConfigError, validate

ModelFn = Callable[..., nnx.Module]


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


def build_optimizer(
    config: Config, schedule: optax.Schedule, unit_axes: Any = None
) -> optax.GradientTransformation:
    """The NFNet recipe (``sgd_agc``), or the same SGD without AGC / with global-norm clipping.

    ``unit_axes``: AGC's unit rules, e.g. a model's ``agc_unit_axes`` (an NFNet built with
    ``scan_blocks=True`` has stacked leaves whose units the default rules would get wrong).
    """
    if config.agc:
        return agc_optax.sgd_agc(
            schedule,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            clipping=config.clipping,
            unit_axes=unit_axes,
            stats=True,
        )
    parts = []
    if config.global_clip is not None:
        parts.append(optax.clip_by_global_norm(config.global_clip))
    parts += [
        optax.add_decayed_weights(config.weight_decay, mask=agc_optax.weight_decay_mask),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=True),
    ]
    return optax.chain(*parts)


def learning_rate_schedule(config: Config, total_steps: int, steps_per_epoch: int):
    """Linear warm-up to ``lr * batch_size / 256``, then cosine decay to zero."""
    peak = config.lr * config.batch_size / 256
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps // 2)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))


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
    dtype = jnp.dtype(config.dtype)
    pmap = config.parallel == "pmap"

    # --- Mesh -----------------------------------------------------------------------------------
    mesh = parallel.make_mesh()
    try:
        parallel.check_batch_size(config.batch_size, config.parallel)
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
    total_steps = config.steps or max(1, int(round(config.epochs * batches.steps_per_epoch)))
    eval_every = config.eval_every or batches.steps_per_epoch
    checkpoint_every = config.checkpoint_every or batches.steps_per_epoch

    # --- Model and optimizer ------------------------------------------------------------------
    rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
    try:
        if model_fn is None:
            model = models.create_model(
                config.model,
                dataset.num_classes,
                dtype=dtype,
                rngs=rngs,
                **dict(config.model_overrides),
            )
        else:
            model = model_fn(dataset.num_classes, dtype=dtype, rngs=rngs)
    except TypeError as e:  # an override the model does not take
        raise ConfigError(f"model `{config.model}`: {e}") from None
    split, params, batch_stats = loop.split_model(model)
    schedule = learning_rate_schedule(config, total_steps, batches.steps_per_epoch)
    tx = build_optimizer(config, schedule, unit_axes=getattr(model, "agc_unit_axes", None))
    del model

    # --- State and sharding ----------------------------------------------------------------------
    # Every process builds the same initial state from the same seed; it is then placed replicated.
    host_state = jax.device_get(loop.init_state(params, batch_stats, tx))
    state = parallel.replicate(mesh, host_state)

    # --- Checkpoint ------------------------------------------------------------------------------
    checkpoint_dir = os.path.abspath(config.checkpoint_dir or os.path.join(run_dir, "checkpoints"))
    checkpointer = ckpt_lib.Checkpointer(checkpoint_dir)
    start_step = 0
    if config.resume:
        try:
            restored = checkpointer.restore_latest(state)
        except ckpt_lib.CheckpointMismatchError as e:
            raise ConfigError(str(e)) from None
        if restored is None:
            say(f"no checkpoint in {checkpoint_dir}; starting from scratch")
        else:
            state, position, step = restored
            start_step = batches.step_of(position)
            if start_step != step or int(parallel.to_host(state.step)) != step:
                raise ConfigError(
                    f"checkpoint {step} in `{checkpoint_dir}` has data position {position} that "
                    f"does not match this run's batch size {config.batch_size}"
                )
            say(f"resumed from step {step} ({checkpoint_dir})")
    elif checkpointer.steps():
        raise ConfigError(
            f"`{checkpoint_dir}` already holds checkpoints; pass `--resume` or a new `--run-dir`"
        )

    # --- Steps -----------------------------------------------------------------------------------
    step_fn = loop.make_train_step(
        split,
        tx,
        seed=config.seed,
        label_smoothing=config.label_smoothing,
        ema=config.ema,
        dtype=dtype,
        pmap=pmap,
    )
    eval_fn = loop.make_eval_step(split, dtype=dtype, pmap=pmap)
    if pmap:
        train_step = jax.pmap(step_fn, axis_name=parallel.DATA_AXIS, donate_argnums=0)
        eval_step = jax.pmap(eval_fn, axis_name=parallel.DATA_AXIS)
        state = parallel.pmap_replicate(parallel.to_host(state))
        put_batch = parallel.pmap_batch
        fetch = parallel.pmap_unreplicate
    else:
        replicated = parallel.replicated_sharding(mesh)
        train_step = jax.jit(step_fn, donate_argnums=0, out_shardings=replicated)
        eval_step = jax.jit(eval_fn, out_shardings=replicated)
        put_batch = lambda local: parallel.global_batch(mesh, local)  # noqa: E731
        fetch = parallel.to_host

    def canonical(state: Any) -> Any:
        """The state as replicated global arrays, the layout checkpoints use."""
        return parallel.replicate(mesh, parallel.pmap_unreplicate(state)) if pmap else state

    # --- Evaluation ------------------------------------------------------------------------------
    eval_batch = config.batch_size

    def evaluate(params: Any, batch_stats: Any) -> dict[str, float]:
        totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
        for images, labels, mask in data_lib.eval_batches(
            dataset.test, eval_batch, process_index=process_index, process_count=process_count
        ):
            sums = fetch(eval_step(params, batch_stats, *put_batch((images, labels, mask))))
            for k, v in sums.items():
                totals[k] += float(v)
        n = totals["count"]
        return {"accuracy": totals["correct"] / n, "loss": totals["loss"] / n}

    def evaluate_both(state: loop.TrainState) -> dict[str, dict[str, float]]:
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
        state, step_metrics = train_step(state, put_batch(batches.batch(step)))
        done = step + 1
        last = done == total_steps
        if done % config.log_every == 0 or last:
            m = {k: float(v) for k, v in fetch(step_metrics).items()}
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
            checkpointer.save(done, canonical(state), batches.position(done), config.to_json())
        bar.update(1)
    bar.close()

    # --- Wrap-up ---------------------------------------------------------------------------------
    checkpointer.close()
    writer.close()
    final = fetch(state)
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

"""The large-batch experiment in miniature: one training set-up, many batch sizes and clippings.

Brock et al. (2021, arXiv:2102.06171, fig. 1 and sec. 4.1) train normalizer-free ResNets at
growing batch sizes with the learning rate scaled linearly (``lr * batch / 256``): without
clipping, training becomes unstable at large batch sizes; with Adaptive Gradient Clipping it
stays stable. :func:`large_batch_sweep` reruns that comparison on a small model and dataset.

Each run is the trainer's own recipe (:func:`agc_optax.training.make_train_step`, the same
model, data order, schedule, weight decay mask and Nesterov SGD as ``python -m agc_optax.train``),
but the
clipping method is an injected hyperparameter: every method at one batch size shares a single
compiled train step. That is what makes a sweep of dozens of runs fit in minutes on a CPU, where
:func:`agc_optax.training.train` would compile (and checkpoint) every run separately.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agc_optax import models
from agc_optax.training import config as config_lib
from agc_optax.training import data as data_lib
from agc_optax.training import recipe
from agc_optax.training import step as step_lib

__all__ = [
    "ClipMethod",
    "SweepRun",
    "agc",
    "global_norm",
    "large_batch_sweep",
    "no_clipping",
    "sweep_optimizer",
]

_OFF = math.inf  # a threshold that never triggers: that clipping is switched off
_EVAL_BATCH = 512


@dataclasses.dataclass(frozen=True)
class ClipMethod:
    """How gradients are clipped before weight decay and SGD.

    Attributes:
      label: a short name for tables and legends.
      agc: the AGC threshold lambda, or ``None`` for no AGC.
      global_norm: the global-norm clipping threshold, or ``None`` for none.
    """

    label: str
    agc: float | None = None
    global_norm: float | None = None

    def __post_init__(self) -> None:
        for name in ("agc", "global_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0 or None, got {value!r}")


def no_clipping() -> ClipMethod:
    """Plain SGD with weight decay: the baseline that the paper shows breaking at large batch."""
    return ClipMethod("no clipping")


def global_norm(max_norm: float) -> ClipMethod:
    """Clipping by the global gradient norm (``optax.clip_by_global_norm``)."""
    return ClipMethod(f"global norm {max_norm:g}", global_norm=max_norm)


def agc(clipping: float) -> ClipMethod:
    """Adaptive Gradient Clipping at threshold ``clipping`` (classifier kernel excluded)."""
    return ClipMethod(f"AGC {clipping:g}", agc=clipping)


def sweep_optimizer(
    schedule: optax.Schedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 2e-5,
    unit_axes: Any = None,
) -> optax.GradientTransformation:
    """AGC, then global-norm clipping, then the NFNet SGD, with both thresholds injected.

    Both thresholds are hyperparameters in the state (``inject_hyperparams``): ``agc_clipping``
    and ``global_clip``. An infinite threshold never clips, so one compiled step serves every
    :class:`ClipMethod`. With ``global_clip=inf`` this is numerically ``agc_optax.sgd_agc``
    (AGC statistics kept); with ``agc_clipping=inf`` it is the trainer's ``--global-clip`` or
    ``--no-agc`` optimizer.

    Args:
      schedule: the learning-rate schedule.
      momentum: Nesterov momentum.
      weight_decay: coupled L2, not applied to gains and biases.
      unit_axes: AGC's unit rules, e.g. a model's ``agc_unit_axes``; ``None`` for the default.

    Returns:
      An ``optax.GradientTransformation``; its state's ``hyperparams`` hold the two thresholds
      (both infinite after ``init``: no clipping).
    """

    def make(agc_clipping: float, global_clip: float) -> optax.GradientTransformation:
        return recipe.sgd_recipe(
            schedule,
            momentum=momentum,
            weight_decay=weight_decay,
            clipping=agc_clipping,
            global_clip=global_clip,
            unit_axes=unit_axes,
        )

    return optax.inject_hyperparams(make)(agc_clipping=_OFF, global_clip=_OFF)


def _set_method(opt_state: optax.OptState, method: ClipMethod) -> optax.OptState:
    values = {
        "agc_clipping": _OFF if method.agc is None else method.agc,
        "global_clip": _OFF if method.global_norm is None else method.global_norm,
    }
    hyperparams = {
        k: jnp.asarray(values[k], v.dtype) if k in values else v
        for k, v in opt_state.hyperparams.items()
    }
    return opt_state._replace(hyperparams=hyperparams)


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One finished run of a sweep.

    Attributes:
      batch_size: the global batch size.
      method: the clipping method.
      peak_lr: ``lr * batch_size / 256``, the learning rate after warm-up.
      steps: planned training steps; fewer ran when the run diverged.
      test_accuracy: accuracy of the final weights on the test split (chance if diverged).
      diverged: the training loss became non-finite, and the run was stopped.
      loss: training loss at every step that ran (NaN once diverged).
      clip_fraction: AGC's clipped share of units at every step (zero without AGC).
      seconds: wall time of the run, its share of compilation included.
    """

    batch_size: int
    method: ClipMethod
    peak_lr: float
    steps: int
    test_accuracy: float
    diverged: bool
    loss: np.ndarray
    clip_fraction: np.ndarray
    seconds: float

    @property
    def fraction_run(self) -> float:
        """How far training got, in steps over planned steps (1.0 for a complete run)."""
        return len(self.loss) / self.steps


def large_batch_sweep(
    config: config_lib.Config,
    batch_sizes: Sequence[int],
    methods: Sequence[ClipMethod],
    *,
    log: Callable[[str], None] | None = print,
) -> list[SweepRun]:
    """Trains ``config``'s model once per (batch size, clipping method), lr scaled by batch/256.

    Everything but the batch size and the clipping comes from ``config`` (model and overrides,
    dataset, image size, ``lr`` per 256 examples, warm-up, epochs or steps, momentum, weight decay,
    label smoothing, compute dtype, seed); its ``batch_size``, ``agc``, ``clipping``,
    ``global_clip``, ``ema``, ``parallel`` and checkpoint fields are ignored (one device). Every run
    starts from the same initial weights and sees the same data order for its batch size. A run
    whose loss turns non-finite is stopped at the end of that epoch and reported as diverged.

    Args:
      config: the training configuration, e.g. ``PRESETS["digits"].replace(...)``.
      batch_sizes: global batch sizes to train at.
      methods: clipping methods (:func:`no_clipping`, :func:`global_norm`, :func:`agc`).
      log: where one line per finished run goes; ``None`` for silence.

    Returns:
      One :class:`SweepRun` per pair, batch sizes in the outer loop.

    Raises:
      agc_optax.training.ConfigError: an invalid config.
      agc_optax.training.DataError: a batch size larger than the training split.
    """
    config_lib.validate(config.replace(agc=False, global_clip=None), models.list_models())
    if not methods:
        raise ValueError("`methods` is empty; pass e.g. [no_clipping(), agc(0.01)]")
    say = log or (lambda _: None)
    dataset = data_lib.load_dataset(config.dataset, config.data_dir, image_size=config.image_size)
    build, abstract_model = recipe.model_builder(config, dataset.num_classes)
    split, _, _ = step_lib.split_model(abstract_model)
    dtype = jnp.dtype(config.dtype)
    eval_step = jax.jit(step_lib.make_eval_step(split, dtype=dtype))
    runs = []
    for batch_size in batch_sizes:
        batches = data_lib.TrainBatches(dataset.train, batch_size, config.seed)
        total_steps = recipe.training_steps(config, batches.steps_per_epoch)
        schedule = recipe.learning_rate_schedule(
            config.replace(batch_size=batch_size), total_steps, batches.steps_per_epoch
        )
        tx = sweep_optimizer(
            schedule,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            unit_axes=getattr(abstract_model, "agc_unit_axes", None),
        )
        step_fn = step_lib.make_train_step(
            split, tx, seed=config.seed, label_smoothing=config.label_smoothing, dtype=dtype
        )
        train_step = jax.jit(step_fn, donate_argnums=0)
        init = jax.jit(step_lib.state_initializer(build, tx))
        for method in methods:
            start = time.time()
            state = init()  # the same weights for every run
            state = state._replace(opt_state=_set_method(state.opt_state, method))
            losses, clips, diverged = [], [], False
            for step in range(total_steps):
                state, metrics = train_step(state, batches.batch(step))
                losses.append(metrics["loss"])
                clips.append(metrics["clip_fraction"])
                end_of_epoch = (step + 1) % batches.steps_per_epoch == 0
                if end_of_epoch and not np.isfinite(float(metrics["loss"])):
                    diverged = True
                    break
            losses_np = np.asarray(jax.device_get(losses), np.float64)
            diverged = diverged or not np.all(np.isfinite(losses_np))
            # One fixed evaluation batch size: the eval step compiles once for the whole sweep.
            accuracy = step_lib.evaluate(
                functools.partial(eval_step, state.params, state.batch_stats),
                data_lib.eval_batches(dataset.test, _EVAL_BATCH),
            )
            run = SweepRun(
                batch_size=batch_size,
                method=method,
                peak_lr=config.lr * batch_size / 256,
                steps=total_steps,
                test_accuracy=accuracy["accuracy"],
                diverged=diverged,
                loss=losses_np,
                clip_fraction=np.asarray(jax.device_get(clips), np.float64),
                seconds=time.time() - start,
            )
            runs.append(run)
            say(
                f"batch {batch_size:5d}  lr {run.peak_lr:6.3f}  {method.label:16s} "
                f"test accuracy {run.test_accuracy:.3f}"
                + (f"  diverged at step {len(losses_np)}" if diverged else "")
                + f"  ({run.seconds:.1f} s)"
            )
    return runs

"""What a config trains: its model, its optimizer and its learning-rate schedule.

The NFNet recipe (Brock et al. 2021, arXiv:2102.06171): AGC, coupled weight decay (not on gains
and biases), SGD with Nesterov momentum, linear warm-up then cosine decay, learning rate scaled
by ``batch_size / 256``. The trainer and the large-batch sweep (:mod:`agc_optax.experiments`)
both build it here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import optax
from flax import nnx

import agc_optax
from agc_optax import models
from agc_optax.training.config import Config, ConfigError

ModelFn = Callable[..., nnx.Module]


def model_builder(
    config: Config, num_classes: int, model_fn: ModelFn | None = None
) -> tuple[Callable[[], nnx.Module], nnx.Module]:
    """The config's model as ``build() -> nnx.Module``, and its abstract shape.

    Args:
      config: gives ``model``, ``model_overrides``, ``dtype`` and ``seed`` (parameters from
        ``seed``, dropout and stochastic depth from ``seed + 1``).
      num_classes: classifier outputs.
      model_fn: optional ``(num_classes, *, dtype, rngs) -> nnx.Module`` replacing
        ``create_model(config.model, ...)``.

    Returns:
      ``(build, abstract)``: every ``build()`` gives the same weights; ``abstract`` is
      ``nnx.eval_shape(build)``, for what a model says about itself (``agc_unit_axes``) without
      computing any weights.

    Raises:
      ModelArgError: the model's constructor refused ``model_overrides`` (an unknown keyword,
        a value of the wrong type or shape); the model builds without them.
    """
    dtype = jnp.dtype(config.dtype)

    def build(overrides: Mapping[str, Any] = config.model_overrides) -> nnx.Module:
        rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
        if model_fn is not None:
            return model_fn(num_classes, dtype=dtype, rngs=rngs)
        kwargs = training_model_defaults(config.model) | dict(overrides)  # the user's win
        return models.create_model(config.model, num_classes, dtype=dtype, rngs=rngs, **kwargs)

    if model_fn is not None or not config.model_overrides:
        return build, nnx.eval_shape(build)  # nothing of the user's: any error is a bug
    try:
        abstract = nnx.eval_shape(build)
    except (TypeError, ValueError) as e:
        # Blame the overrides only when the model builds without them; else it is a bug.
        plain = nnx.eval_shape(lambda: build({}))
        raise ModelArgError(config.model, config.model_overrides, _cause(e, plain)) from e
    return build, abstract


def training_model_defaults(name: str) -> dict[str, Any]:
    """Constructor keywords training adds to model ``name``'s defaults (``--model-arg`` wins).

    ``canonical_conv_grads=True`` where the family takes it (every NF family): on CPU the train
    step is faster (NFNet-F0 0.45-0.49x the time, NF-ResNet-50 0.75-0.82x, NF-RegNet-B0 0.034x;
    ``benchmarks/RESULTS.md``), other backends' programs are unchanged, and all it gives up is
    forward-mode differentiation, which training does not use. Evaluation (``agc-eval``) builds
    the model with its plain default.

    Example:
      >>> training_model_defaults("nfnet_f0"), training_model_defaults("resnet50")
      ({'canonical_conv_grads': True}, {})
    """
    parameters = inspect.signature(models.model_class(name).__init__).parameters
    return {"canonical_conv_grads": True} if "canonical_conv_grads" in parameters else {}


class ModelArgError(ConfigError):
    """The model's constructor refused its keyword overrides (``--model-arg``).

    Attributes:
      model: the model's name.
      overrides: the keywords it was given.
      cause: why, in one line.
    """

    def __init__(self, model: str, overrides: Mapping[str, Any], cause: str):
        self.model, self.overrides, self.cause = model, dict(overrides), cause
        given = " ".join(f"{k}={v!r}" for k, v in self.overrides.items())
        super().__init__(f"--model-arg {given} (model `{model}`): {cause}")


def _cause(error: Exception, plain: nnx.Module) -> str:
    """``error`` in one line; an unknown keyword lists those ``type(plain)`` takes."""
    text = " ".join(str(error).split())
    if isinstance(error, TypeError) and "unexpected keyword argument" in text:
        set_by_the_trainer = {"self", "num_classes", "variant", "dtype", "param_dtype", "rngs"}
        parameters = inspect.signature(type(plain).__init__).parameters
        takes = [name for name in parameters if name not in set_by_the_trainer]
        return f"{text}; {type(plain).__name__} takes {', '.join(takes)}"
    return text


def training_steps(config: Config, steps_per_epoch: int) -> int:
    """``config.steps``, or ``config.epochs`` in steps (at least one)."""
    return config.steps or max(1, int(round(config.epochs * steps_per_epoch)))


def learning_rate_schedule(config: Config, total_steps: int, steps_per_epoch: int):
    """Linear warm-up to ``lr * batch_size / 256``, then cosine decay to zero."""
    peak = config.lr * config.batch_size / 256
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps // 2)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))


def build_optimizer(
    config: Config, schedule: optax.Schedule, unit_axes: Any = None
) -> optax.GradientTransformation:
    """The NFNet recipe (``sgd_agc``), or the same SGD without AGC / with global-norm clipping.

    ``unit_axes``: AGC's unit rules, e.g. a model's ``agc_unit_axes`` (an NFNet built with
    ``scan_blocks=True`` has stacked leaves whose units the default rules would get wrong).
    The trainer guards every step against divergence, so ``sgd_agc`` is built with
    ``skip_nonfinite=True``: it skips a non-finite step inside its fused update, which costs
    less than the train step's own guard (see :func:`agc_optax.training.make_train_step`).
    """
    return sgd_recipe(
        schedule,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        clipping=config.clipping if config.agc else None,
        global_clip=config.global_clip,
        unit_axes=unit_axes,
        skip_nonfinite=True,
    )


def sgd_recipe(
    schedule: optax.ScalarOrSchedule,
    *,
    momentum: Any,
    weight_decay: Any,
    clipping: Any = None,
    global_clip: Any = None,
    unit_axes: Any = None,
    skip_nonfinite: bool = False,
) -> optax.GradientTransformation:
    """AGC (if ``clipping``), global-norm clipping (if ``global_clip``), weight decay, Nesterov SGD.

    AGC alone is ``agc_optax.sgd_agc`` (one fused update, AGC statistics kept, and
    ``skip_nonfinite`` passed on); every other combination is the same steps as an optax chain,
    in the same order, without a guard of its own (the train step's ``skip_nonfinite`` guards
    it). Thresholds may be arrays (``optax.inject_hyperparams``). Weight decay skips gains and
    biases, AGC the classifier.
    """
    if clipping is not None and global_clip is None:
        return agc_optax.sgd_agc(
            schedule,
            momentum=momentum,
            weight_decay=weight_decay,
            clipping=clipping,
            unit_axes=unit_axes,
            stats=True,
            skip_nonfinite=skip_nonfinite,
        )
    parts = []
    if clipping is not None:
        parts.append(
            agc_optax.adaptive_grad_clip(
                clipping, exclude=agc_optax.HEAD_PATTERN, unit_axes=unit_axes, stats=True
            )
        )
    if global_clip is not None:
        parts.append(optax.clip_by_global_norm(global_clip))
    return optax.chain(
        *parts,
        optax.add_decayed_weights(weight_decay, mask=agc_optax.weight_decay_mask),
        optax.sgd(schedule, momentum=momentum or None, nesterov=True),
    )

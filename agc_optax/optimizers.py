"""Optimizer recipes built around AGC."""

from __future__ import annotations

from typing import Any

import jax
import optax

from agc_optax.clipping import adaptive_grad_clip
from agc_optax.unit_axes import VECTOR_NAMES, ExcludeRule, UnitAxesRule, path_from_keys

#: The classifier's kernel, which the NFNet recipe leaves unclipped (Brock et al. 2021, sec. 4.1).
HEAD_PATTERN = r"(^|/)head/kernel$"


def weight_decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: everything but gains and biases.

    A leaf is spared when the last name of its path is one of ``gain``, ``skip_gain``, ``bias``,
    ``scale``, ``offset`` or ``b``, as in DeepMind's NFNet training code.
    """
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: path_from_keys(kp).rsplit("/", 1)[-1] not in VECTOR_NAMES, params
    )


def sgd_agc(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 2e-5,
    clipping: float = 0.01,
    eps: float = 1e-3,
    exclude: ExcludeRule = HEAD_PATTERN,
    unit_axes: UnitAxesRule = None,
    stats: bool = False,
) -> optax.GradientTransformation:
    """The NFNet optimizer: AGC, then coupled L2 weight decay, then SGD with Nesterov momentum.

    The order follows DeepMind's recipe: AGC acts on the raw (device-averaged) gradients, then
    ``weight_decay * w`` is added for every leaf but gains and biases (:func:`weight_decay_mask`),
    then momentum ``m <- momentum * m + g`` and the update ``-lr * (g + momentum * m)`` (Nesterov)
    or ``-lr * m``.

    Args:
      learning_rate: a float or an optax schedule.
      momentum: momentum decay.
      nesterov: use Nesterov momentum.
      weight_decay: coupled L2 coefficient.
      clipping: AGC threshold (see :func:`agc_optax.adaptive_grad_clip`).
      eps: AGC weight-norm floor.
      exclude: leaves AGC leaves alone; by default the classifier kernel ``head/kernel``.
      unit_axes: AGC unit rule.
      stats: keep AGC statistics in the state (``optax.tree.get(state, "clip_fraction")``).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    References:
      Brock et al. 2021, arXiv:2102.06171, sec. 4 and appendix.

    Example:
      >>> import jax.numpy as jnp, agc_optax
      >>> params = {
      ...     "conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
      >>> tx = agc_optax.sgd_agc(learning_rate=0.1)
      >>> state = tx.init(params)
    """
    return optax.chain(
        adaptive_grad_clip(clipping, eps, unit_axes=unit_axes, exclude=exclude, stats=stats),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
    )

"""AdaGC (Wang et al. 2025): clipping each tensor against an EMA of its own past clipped norms."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agc_optax._checks import check_count, check_hyperparameter
from agc_optax._norms import apply_scale, squared_unit_norms
from agc_optax._plan import PlanCache
from agc_optax.unit_axes import ExcludeRule, UnitAxesRule


class AdaGCState(NamedTuple):
    """State of :func:`adagc`.

    Attributes:
      count: how many updates have been applied, int32 scalar. The first ``warmup_steps``
        updates use the global threshold.
      gamma: a pytree shaped like params holding each leaf's reference norm
        :math:`\\gamma`: a float32 scalar per leaf for per-tensor clipping (the default), or one
        value per unit (shape: the sizes of the unit axes). ``inf`` until the unit has seen a
        finite non-zero gradient norm. Excluded leaves hold ``optax.MaskedNode()``.
      clip_fraction: clipped units / eligible units in the last update, float32 scalar.
      num_units: how many units are eligible, int32 scalar.
    """

    count: jax.Array
    gamma: Any
    clip_fraction: jax.Array
    num_units: jax.Array


def _check_static(lambda_rel: Any, beta: Any, warmup_steps: Any) -> None:
    # Concrete numbers and arrays are checked; traced ones (inject_hyperparams) pass.
    check_hyperparameter("lambda_rel", lambda_rel)
    check_hyperparameter("beta", beta, below=1, why="; the paper uses 0.98")
    check_count("warmup_steps", warmup_steps, 0)


def _unit_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[a] for a in axes)


def adagc(
    lambda_rel: float | jax.Array = 1.05,
    beta: float | jax.Array = 0.98,
    lambda_abs: float | jax.Array = 1.0,
    warmup_steps: int | jax.Array = 100,
    *,
    unit_axes: UnitAxesRule = (),
    exclude: ExcludeRule = None,
) -> optax.GradientTransformation:
    r"""AdaGC: clips each tensor's gradient against an EMA of its own past clipped norms.

    For every eligible leaf (or unit, see ``unit_axes``) :math:`i` with gradient :math:`g_{t,i}`
    at update :math:`t = 1, 2, \dots`:

    * warm-up, :math:`t \le T` (``warmup_steps``): global-norm clipping with the absolute
      threshold :math:`\lambda_{abs}`, and the reference norm tracks the running minimum of the
      clipped norms,

      .. math::

        h_t = \min\Big(1, \frac{\lambda_{abs}}{\|g_t\|}\Big), \quad
        \hat g_{t,i} = h_t\, g_{t,i}, \quad
        \gamma_{t,i} = \min(\gamma_{t-1,i}, \|\hat g_{t,i}\|), \quad \gamma_{0,i} = \infty;

    * afterwards, each unit is clipped against its own history,

      .. math::

        \hat g_{t,i} = \min\Big(1, \frac{\lambda_{rel}\, \gamma_{t-1,i}}{\|g_{t,i}\|}\Big)
          g_{t,i}, \qquad
        \gamma_{t,i} = \beta\, \gamma_{t-1,i} + (1 - \beta)\, \|\hat g_{t,i}\|.

    :math:`\|g_t\|` is the global L2 norm over the eligible leaves. Unclipped leaves come back bit
    for bit; norms accumulate in at least float32; each output keeps its gradient's dtype.

    Choices where the paper leaves room (each is tested):

    * Defaults: :math:`\lambda_{rel} = 1.05` and :math:`\beta = 0.98` as reported in the
      paper's experiments (arXiv v1); the authors' released Megatron patch
      (github.com/lishuai-97/AdaGC) defaults to ``clip_ratio=1.04, beta=0.99`` instead.
      :math:`\lambda_{abs} = 1.0` and :math:`T = 100` match both. With small, noisy batches
      these clip most updates; see ``docs/clipping_comparison.md`` and raise ``lambda_rel``.
    * Update counting matches the authors' code: updates :math:`1..T` are warm-up, so
      :math:`T = 0` skips it. A unit that reaches the adaptive phase without a reference
      (:math:`\gamma = \infty`, e.g. :math:`T = 0`) takes its current norm as the reference, so
      that update is not clipped (for :math:`\lambda_{rel} \ge 1`).
    * A zero or non-finite norm (before or after clipping) carries no scale information and
      leaves :math:`\gamma` unchanged. The paper's rule would set :math:`\gamma = 0` for a
      tensor (or, per unit, an embedding row) with a zero gradient during warm-up, and then
      zero its gradient forever.
    * The clipped norm fed to the EMA is the threshold :math:`\lambda_{rel}\gamma_{t-1,i}`
      exactly (as in the authors' code); the scale is the exact ratio, with no ``eps`` added to
      the denominator (it only divides by norms larger than the threshold, so never by 0).
    * Excluded leaves are neither clipped nor counted in the warm-up global norm.

    Non-finite gradients: a unit holding a NaN is returned unchanged (and so is everything during
    warm-up, whose global norm is then NaN); a unit holding an Inf is clipped to zero with its Inf
    entries becoming NaN. ``count`` always advances. Wrap the whole chain in
    ``optax.apply_if_finite`` to skip such updates with every state (this one included) kept.

    Inside ``optax.MultiSteps`` the transform runs once per *optimizer* step, on the averaged
    gradient: micro-batches neither advance ``count`` nor move :math:`\gamma`, so
    ``warmup_steps`` counts optimizer steps.

    Args:
      lambda_rel: relative threshold :math:`\lambda_{rel}`; a unit is clipped when its norm
        exceeds ``lambda_rel`` times its reference norm. May be traced
        (``optax.inject_hyperparams``).
      beta: EMA coefficient :math:`\beta \in [0, 1)` of the reference norm. May be traced.
      lambda_abs: global-norm threshold during warm-up. May be traced.
      warmup_steps: number of warm-up updates :math:`T`. May be traced.
      unit_axes: which axes of each leaf index units, in the rule language of
        :func:`agc_optax.adaptive_grad_clip`. The default ``()`` makes every leaf one unit
        (per-tensor clipping, as in the paper); ``None`` uses AGC's inferred per-output-unit
        axes (:func:`agc_optax.infer_unit_axes`); a callable, ``(regex, axes)`` pairs or a pytree
        of axes pick them per leaf.
      exclude: leaves to pass through untouched: a regex, a sequence of regexes or a callable
        ``(path, leaf) -> bool``.

    Returns:
      An ``optax.GradientTransformation`` with :class:`AdaGCState`; ``params`` are not needed by
      ``update``. Read the statistics from any chain with
      ``optax.tree.get(opt_state, "clip_fraction")``.

    References:
      Wang, Li, Chen, Zeng, Yang, Yu, Ma, Shen. AdaGC: Enhancing LLM Pretraining Stability via
      Adaptive Gradient Clipping. arXiv:2502.11034.

    Example:
      >>> import jax.numpy as jnp, optax, agc_optax
      >>> params = {"w": jnp.zeros(4), "b": jnp.zeros(2)}
      >>> tx = agc_optax.adagc(lambda_rel=1.05, warmup_steps=1)
      >>> state = tx.init(params)
      >>> g = {"w": jnp.full(4, 0.1), "b": jnp.full(2, 0.1)}
      >>> _, state = tx.update(g, state)  # warm-up: global norm 0.245 <= 1, no clipping
      >>> spike = {"w": jnp.full(4, 10.0), "b": jnp.full(2, 0.1)}
      >>> out, state = tx.update(spike, state)  # only "w" spiked, only "w" is clipped
      >>> round(float(jnp.linalg.norm(out["w"])), 4), bool((out["b"] == spike["b"]).all())
      (0.21, True)
      >>> float(optax.tree.get(state, "clip_fraction"))
      0.5
    """
    _check_static(lambda_rel, beta, warmup_steps)
    check_hyperparameter("lambda_abs", lambda_abs)

    plans = PlanCache(unit_axes, exclude)  # bad rules fail here, at construction

    def init_fn(params: Any) -> AdaGCState:
        plan = plans(params)  # and bad leaves at init, not at step 1
        gamma = [
            optax.MaskedNode()
            if row.unit_axes is None
            else jnp.full(_unit_shape(row.shape, row.unit_axes), jnp.inf, jnp.float32)
            for row in plan
        ]
        return AdaGCState(
            count=jnp.zeros((), jnp.int32),
            gamma=plan.unflatten(gamma),
            clip_fraction=jnp.zeros((), jnp.float32),
            num_units=jnp.asarray(plan.num_units, jnp.int32),
        )

    def update_fn(updates: Any, state: AdaGCState, params: Any = None):
        del params  # AdaGC looks at gradients only.
        plan = plans(updates, "the gradient")
        g_leaves = jax.tree.leaves(updates)
        gamma_leaves = jax.tree.leaves(state.gamma)
        eligible = [(i, row.path, row.unit_axes) for i, row in enumerate(plan) if row.clipped]
        if len(gamma_leaves) != len(eligible):
            raise ValueError(
                f"adagc: the state holds {len(gamma_leaves)} reference norms but the updates "
                f"have {len(eligible)} eligible leaves; call `tx.init` with params of the same "
                "structure as the gradients."
            )
        sq, gammas = {}, {}
        for (i, path, axes), gamma in zip(eligible, gamma_leaves, strict=True):
            g = g_leaves[i]
            want = _unit_shape(np.shape(g), axes)
            if np.shape(gamma) != want:
                raise ValueError(
                    f"`{path}`: the state's reference norm has shape {np.shape(gamma)} but the "
                    f"gradient {np.shape(g)} with unit axes {axes} needs {want}; call `tx.init` "
                    "with the params these gradients belong to."
                )
            sq[i] = squared_unit_norms(g, axes).astype(jnp.float32)
            gammas[i] = gamma.reshape(sq[i].shape)

        warm = state.count < warmup_steps
        global_norm = jnp.sqrt(sum((jnp.sum(s) for s in sq.values()), jnp.zeros((), jnp.float32)))
        # Comparisons are False for NaN, so a NaN norm is never clipped.
        global_clip = global_norm > lambda_abs
        warm_scale = jnp.where(global_clip, lambda_abs / jnp.where(global_clip, global_norm, 1), 1)

        out = list(g_leaves)
        new_gamma = list(gamma_leaves)
        clipped_units = jnp.zeros((), jnp.int32)
        for j, (i, _, _) in enumerate(eligible):
            g, gamma = g_leaves[i], gammas[i]
            norm = jnp.sqrt(sq[i])
            # No reference yet: the current norm is its own reference (the authors' code).
            ref = jnp.where(jnp.isinf(gamma), norm, gamma)
            bound = lambda_rel * ref
            unit_clip = norm > bound
            unit_scale = jnp.where(unit_clip, bound / jnp.where(unit_clip, norm, 1), 1)
            clip = jnp.where(warm, global_clip, unit_clip)
            scale = jnp.where(warm, warm_scale, unit_scale).astype(jnp.float32)
            clipped_norm = jnp.where(warm, norm * warm_scale, jnp.where(unit_clip, bound, norm))
            informative = jnp.isfinite(norm) & jnp.isfinite(clipped_norm) & (clipped_norm > 0)
            updated = jnp.where(
                warm,
                jnp.minimum(gamma, clipped_norm),
                beta * ref + (1 - beta) * clipped_norm,
            )
            new_gamma[j] = (
                jnp.where(informative, updated, gamma)
                .astype(jnp.float32)
                .reshape(gamma_leaves[j].shape)
            )
            # scale is exactly 1 where nothing is clipped, so those entries come back bit for bit.
            out[i] = apply_scale(g, scale)
            clipped_units = clipped_units + jnp.sum(
                jnp.broadcast_to(clip, norm.shape), dtype=jnp.int32
            )

        total = state.num_units
        fraction = jnp.where(
            total > 0, clipped_units.astype(jnp.float32) / jnp.maximum(total, 1), 0.0
        ).astype(jnp.float32)
        new_state = AdaGCState(
            count=optax.safe_increment(state.count),
            gamma=jax.tree.unflatten(jax.tree.structure(state.gamma), new_gamma),
            clip_fraction=fraction,
            num_units=total,
        )
        return plan.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)

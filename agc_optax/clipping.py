"""Adaptive Gradient Clipping (Brock et al. 2021) as an optax transform with per-leaf unit rules."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agc_optax.unit_axes import (
    ExcludeRule,
    NormOrder,
    UnitAxes,
    UnitAxesRule,
    check_norm,
    leaf_paths,
    norm_power,
    num_units,
    powered_unit_norms,
    resolve_unit_axes,
)


class AdaptiveGradClipState(NamedTuple):
    """Statistics of the last update, kept when ``stats=True``.

    Attributes:
      clip_fraction: clipped units / eligible (non-excluded) units, float32 scalar.
      max_ratio: the largest ``||G_i|| / max(||W_i||, eps)`` over all eligible units.
      num_units: how many units are eligible, int32 scalar.
    """

    clip_fraction: jax.Array
    max_ratio: jax.Array
    num_units: jax.Array


def check_hyperparameter(
    name: str, value: Any, *, below: float | None = None, why: str = ""
) -> None:
    """A concrete hyperparameter must be finite and >= 0 (and < ``below`` if given).

    Traced values (inject_hyperparams, schedules under jit) cannot be checked and pass. ``why``
    ends the error for ``below`` (e.g. "; the paper uses 0.98").
    """
    if isinstance(value, numbers.Real | np.ndarray) and np.ndim(value) == 0:
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if below is not None and not value < below:
            raise ValueError(f"`{name}` must be in [0, {below:g}), got {value!r}{why}.")


def check_static_flag(name: str, value: Any) -> None:
    """A flag that shapes the computation (``stats``, ``nesterov``) must be a Python value.

    ``optax.inject_hyperparams`` turns bools into arrays unless they are listed in its
    ``static_args``; say so instead of failing later with a tracer-conversion error.
    """
    if isinstance(value, jax.Array | np.ndarray):
        raise TypeError(
            f"`{name}` must be a Python bool, got an array. With `optax.inject_hyperparams`, "
            f"list it in `static_args`, e.g. `static_args=({name!r},)`."
        )


def is_static_zero(value: Any) -> bool:
    """True for ``None`` or a concrete Python/NumPy number equal to 0.

    Decides at trace time whether an optional term (momentum buffers, weight decay) exists. An
    array value counts as non-zero even when it holds 0, so ``optax.inject_hyperparams``, which
    passes hyperparameters as arrays to both ``init`` and ``update``, always gets the term and a
    traced value never has to be converted to a Python bool.
    """
    if value is None:
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, jax.Array) and value == 0


def check_float_leaf(path: str, leaf: Any, what: str) -> None:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"`{path}`: {what} has dtype {dtype}; gradient clipping needs floating-point leaves. "
            f"Pass only trainable float parameters (e.g. `nnx.state(model, nnx.Param)`), or skip "
            f'this leaf with `exclude=r"{path}$"`.'
        )


def plan_units(
    params: Any, unit_axes: UnitAxesRule, exclude: ExcludeRule
) -> list[tuple[str, UnitAxes]]:
    """Resolves and validates the unit axes of every leaf of params (trace-time Python only)."""
    plan = resolve_unit_axes(params, unit_axes, exclude)
    for (path, axes), leaf in zip(plan, jax.tree.leaves(params), strict=True):
        if axes is not None:
            check_float_leaf(path, leaf, "the parameter")
    return plan


def check_updates_match(updates: Any, params: Any) -> None:
    upaths, ppaths = leaf_paths(updates), leaf_paths(params)
    if upaths != ppaths:
        missing = sorted(set(upaths) - set(ppaths))
        extra = sorted(set(ppaths) - set(upaths))
        detail = (
            "; ".join(
                s
                for s in (
                    f"in updates but not params: {', '.join(f'`{p}`' for p in missing[:5])}"
                    if missing
                    else "",
                    f"in params but not updates: {', '.join(f'`{p}`' for p in extra[:5])}"
                    if extra
                    else "",
                )
                if s
            )
            or "the same paths in a different order"
        )
        raise ValueError(
            "adaptive_grad_clip: `updates` and `params` must have the same tree structure "
            f"({detail}). Pass the params the gradients were taken with, filtered the same way."
        )
    for path, g, w in zip(upaths, jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        if np.shape(g) != np.shape(w):
            raise ValueError(
                f"`{path}`: gradient shape {np.shape(g)} differs from parameter shape "
                f"{np.shape(w)}; pass the params the gradients were taken with."
            )


def _whole_leaf(path: str, leaf: Any) -> tuple[int, ...]:
    del path, leaf
    return ()


def safe_sqrt(x: jax.Array) -> jax.Array:
    # sqrt has an infinite derivative at 0; keep jax.grad through the transform finite.
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def unit_clip_scale(
    g: jax.Array, w: jax.Array, axes: tuple[int, ...], clipping: Any, eps: Any, norm: NormOrder = 2
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-unit AGC factors (keepdims): (scale, clip mask, ratio ||G_i|| / max(||W_i||, eps)).

    ``scale`` is exactly 1 where a unit is not clipped. The ratio is only for statistics.
    """
    power = norm_power(norm)
    g_pow = powered_unit_norms(g, axes, norm)
    w_floor_pow = jnp.maximum(powered_unit_norms(w, axes, norm), eps**power)
    # For L2, compare squared norms: no sqrt on the hot path, and zero gradients never divide.
    max_pow = clipping**power * w_floor_pow
    clip = g_pow > max_pow
    safe_g_pow = jnp.where(clip, g_pow, 1)
    if power == 2:
        factor = safe_sqrt(max_pow) * jax.lax.rsqrt(safe_g_pow)
    else:
        factor = max_pow / safe_g_pow
    scale = jnp.where(clip, factor, 1)
    safe_den = jnp.where(w_floor_pow > 0, w_floor_pow, 1)
    ratio_pow = jnp.where(w_floor_pow > 0, g_pow / safe_den, jnp.where(g_pow > 0, jnp.inf, 0))
    ratio = jnp.sqrt(ratio_pow) if power == 2 else ratio_pow
    return scale, clip, ratio


def apply_scale(g: jax.Array, scale: jax.Array) -> jax.Array:
    """``g * scale`` in the wider of the two dtypes, cast back to ``g.dtype``.

    A scale of exactly 1 returns g bit for bit, also in bf16 (which widens to float32 and back
    exactly).
    """
    return (g * scale.astype(jnp.promote_types(g.dtype, scale.dtype))).astype(g.dtype)


def initial_stats(plan: list[tuple[str, UnitAxes]], params: Any) -> AdaptiveGradClipState:
    """Zero statistics, with the (static) number of eligible units."""
    count = sum(
        num_units(np.shape(w), axes)
        for (_, axes), w in zip(plan, jax.tree.leaves(params), strict=True)
        if axes is not None
    )
    return AdaptiveGradClipState(
        clip_fraction=jnp.zeros((), jnp.float32),
        max_ratio=jnp.zeros((), jnp.float32),
        num_units=jnp.asarray(count, jnp.int32),
    )


def clip_scales(
    updates: Any,
    params: Any,
    plan: list[tuple[str, UnitAxes]],
    clipping: Any,
    eps: Any,
    norm: NormOrder,
    stats: bool,
) -> tuple[list[jax.Array | None], AdaptiveGradClipState | None]:
    """AGC's per-unit scale of every leaf (``None`` for leaves left alone), and the statistics.

    The shared core of :func:`adaptive_grad_clip` and the fused optimizers, which apply the
    scales inside their own elementwise update instead of materializing the clipped gradient.
    """
    if params is None:
        raise ValueError(
            "adaptive_grad_clip needs the parameters: call `tx.update(grads, state, params)`."
        )
    check_updates_match(updates, params)
    scales, clipped_counts, ratios = [], [], []
    for (path, axes), g, w in zip(
        plan, jax.tree.leaves(updates), jax.tree.leaves(params), strict=True
    ):
        if axes is None:
            scales.append(None)
            continue
        check_float_leaf(path, g, "the gradient")
        scale, clip, ratio = unit_clip_scale(g, w, axes, clipping, eps, norm)
        scales.append(scale)
        if stats:
            clipped_counts.append(jnp.sum(clip, dtype=jnp.int32))
            ratios.append(jnp.max(ratio).astype(jnp.float32))
    if not stats:
        return scales, None
    zero = initial_stats(plan, params)
    if not clipped_counts:
        return scales, zero
    return scales, AdaptiveGradClipState(
        clip_fraction=sum(clipped_counts).astype(jnp.float32) / zero.num_units.astype(jnp.float32),
        max_ratio=jnp.max(jnp.stack(ratios)),
        num_units=zero.num_units,
    )


def adaptive_grad_clip(
    clipping: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-3,
    *,
    unit_axes: UnitAxesRule = None,
    exclude: ExcludeRule = None,
    stats: bool = False,
    granularity: str = "unit",
    norm: NormOrder | None = None,
) -> optax.GradientTransformation:
    r"""Adaptive Gradient Clipping: clips each unit's gradient relative to its weight's norm.

    For every parameter leaf :math:`W` with gradient :math:`G`, and every unit :math:`i` of it
    (a slice picked by the leaf's unit axes, see :func:`agc_optax.infer_unit_axes`):

    .. math::

      G_i \leftarrow \begin{cases}
        \lambda \frac{\max(\|W_i\|, \epsilon)}{\|G_i\|} G_i
          & \text{if } \|G_i\| > \lambda \max(\|W_i\|, \epsilon) \\
        G_i & \text{otherwise (returned bit for bit)}
      \end{cases}

    with :math:`\lambda` = ``clipping``. Norms accumulate in at least float32; each output leaf
    keeps its gradient's dtype.

    Compared with ``optax.adaptive_grad_clip``, units are chosen per leaf by path-aware rules,
    with defaults that are right for Flax's Conv1D, attention, Embed and ``(1, N)`` kernels.

    Non-finite gradients: a unit holding a NaN is returned unchanged; a unit holding an Inf (and
    no NaN) becomes non-finite too (its Inf entries become NaN). So ``optax.apply_if_finite``
    placed after this transform still skips the step. Finite gradients always give finite
    results; a unit whose float32 squared norm overflows is clipped to zero.

    Args:
      clipping: the maximum ratio :math:`\lambda` of a unit's gradient norm to its weight norm.
        DeepMind's NFNets use 0.01 at batch size 4096; small batches favour larger values. May be
        a traced scalar (``optax.inject_hyperparams``).
      eps: floor on weight norms, so zero-initialised weights can still move. May be traced.
      unit_axes: which axes of each leaf index units. ``None`` infers them
        (:func:`agc_optax.infer_unit_axes`); or a callable ``(path, leaf) -> axes | None``; or a
        sequence of ``(regex, axes)`` pairs matched with ``re.search`` against leaf paths (first
        match wins, unmatched leaves inferred); or a pytree matching params whose leaves are
        tuples of ints or None. ``()`` makes the whole leaf one unit, ``None`` leaves it alone.
      exclude: leaves to pass through untouched: a regex, a sequence of regexes, or a callable
        ``(path, leaf) -> bool``. The paper recommends excluding the classifier,
        ``exclude=r"head/kernel"``.
      stats: keep :class:`AdaptiveGradClipState` (clip fraction, max ratio, number of units) of
        the last update in the state; read it from any chain with
        ``optax.tree.get(opt_state, "clip_fraction")``.
      granularity: ``"unit"`` (default) uses the unit rules; ``"layer"`` makes every clipped leaf
        one unit, the layer-wise ablation of the paper (sec. 4.1). Excluded leaves stay excluded.
      norm: the unit norm: 2 (the paper's; ``None`` means 2 and keeps ``inject_hyperparams``
        from tracing it), 1, or ``float("inf")`` (as timm's ``norm_type``). Both sides of the
        comparison use the same norm.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

    References:
      Brock, De, Smith, Simonyan. High-Performance Large-Scale Image Recognition Without
      Normalization. ICML 2021. arXiv:2102.06171.

    Example:
      >>> import jax.numpy as jnp, optax, agc_optax
      >>> params = {"dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
      >>> grads = {"dense": {"kernel": jnp.full((4, 2), 10.0), "bias": jnp.ones(2)}}
      >>> tx = optax.chain(agc_optax.adaptive_grad_clip(0.01), optax.sgd(0.1))
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> # Each kernel column is clipped to 0.01 * ||(1, 1, 1, 1)|| = 0.02, then scaled by 0.1.
      >>> round(float(jnp.linalg.norm(updates["dense"]["kernel"][:, 0])), 6)
      0.002
    """
    check_hyperparameter("clipping", clipping)
    check_hyperparameter("eps", eps)
    check_static_flag("stats", stats)
    norm = check_norm(norm)
    if granularity not in ("unit", "layer"):
        raise ValueError(f"`granularity` must be 'unit' or 'layer', got {granularity!r}.")
    rule = _whole_leaf if granularity == "layer" else unit_axes

    def init_fn(params: Any) -> optax.OptState:
        plan = plan_units(params, rule, exclude)  # bad rules fail at init, not at step 1
        return initial_stats(plan, params) if stats else optax.EmptyState()

    def update_fn(updates: Any, state: optax.OptState, params: Any = None):
        scales, new_stats = clip_scales(
            updates, params, plan_units(params, rule, exclude), clipping, eps, norm, stats
        )
        g_leaves, treedef = jax.tree.flatten(updates)
        out = [g if s is None else apply_scale(g, s) for g, s in zip(g_leaves, scales, strict=True)]
        return jax.tree.unflatten(treedef, out), (new_stats if stats else state)

    return optax.GradientTransformation(init_fn, update_fn)

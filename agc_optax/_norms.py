"""Unit norms and AGC's per-unit scale (private; :func:`unitwise_norm` is public).

Every implementation (the XLA transforms and the Pallas kernels) turns unit norms into a scale
with the one function :func:`clip_scale`, so they clip alike.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

UnitAxes = tuple[int, ...] | None
"""Axes that index units (``()``: the whole leaf is one unit), or ``None``: leave the leaf alone."""

NormOrder = int | float
"""A unit norm: 2 (Euclidean), 1, or ``math.inf``."""


def is_axes(x: Any) -> bool:
    """Whether ``x`` is a unit-axes value: a tuple of ints, or ``None``."""
    return x is None or (isinstance(x, tuple) and all(isinstance(a, int | np.integer) for a in x))


def normalize_axes(path: str, axes: Any, shape: Sequence[int], source: str) -> UnitAxes:
    """Checks a rule's answer and makes its axes non-negative and sorted."""
    if axes is None:
        return None
    if isinstance(axes, int | np.integer):
        axes = (int(axes),)
    if not is_axes(axes):
        raise TypeError(
            f"`{path}`: {source} gave unit axes {axes!r}; expected a tuple of ints "
            "(e.g. (-1,)), () for the whole leaf, or None to leave the leaf unclipped."
        )
    rank = len(shape)
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"`{path}`: unit axes {tuple(axes)} out of range for shape {tuple(shape)}; "
                f"give a rule with axes in [-{rank}, {rank - 1}], such as "
                f"{'(-1,)' if rank else '()'}."
            )
        out.append(int(a) % rank)
    if len(set(out)) != len(out):
        raise ValueError(f"`{path}`: unit axes {tuple(axes)} repeat an axis of shape {shape}.")
    return tuple(sorted(out))


def check_norm(norm: Any) -> NormOrder:
    """Validates a norm order: 1, 2 or inf; ``None`` means 2."""
    if norm is None:
        return 2
    if isinstance(norm, jax.core.Tracer):
        raise TypeError(
            "`norm` picks code, so it cannot be traced: with optax.inject_hyperparams, add "
            "'norm' to static_args."
        )
    if norm not in (1, 2, math.inf):
        raise ValueError(f"`norm` must be 1, 2 or float('inf'), got {norm!r}.")
    return norm


def norm_power(norm: NormOrder) -> int:
    """The power in which :func:`powered_unit_norms` returns a norm (2 for L2, else 1)."""
    return 2 if norm == 2 else 1


def reduction_axes(unit_axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The axes a unit's norm reduces over: every axis that does not index units."""
    return tuple(a for a in range(ndim) if a not in unit_axes)


def num_units(shape: Sequence[int], unit_axes: tuple[int, ...]) -> int:
    """How many units a leaf of ``shape`` has."""
    return math.prod(shape[a] for a in unit_axes)


def squared_unit_norms(x: jax.Array, unit_axes: tuple[int, ...]) -> jax.Array:
    """Sum of squares over each unit (keepdims), in ``promote(x.dtype, float32)``."""
    acc = jnp.promote_types(jnp.real(x).dtype if jnp.iscomplexobj(x) else x.dtype, jnp.float32)
    if jnp.iscomplexobj(x):
        sq = jnp.square(x.real.astype(acc)) + jnp.square(x.imag.astype(acc))
    else:
        sq = jnp.square(x.astype(acc))
    return jnp.sum(sq, axis=reduction_axes(unit_axes, x.ndim), keepdims=True)


def powered_unit_norms(x: jax.Array, unit_axes: tuple[int, ...], norm: NormOrder = 2) -> jax.Array:
    """Each unit's norm raised to :func:`norm_power` (keepdims, at least float32).

    The squared L2 norm needs no square root, so comparisons against a squared bound stay cheap.
    """
    if norm == 2:
        return squared_unit_norms(x, unit_axes)
    magnitude = jnp.abs(x)
    magnitude = magnitude.astype(jnp.promote_types(magnitude.dtype, jnp.float32))
    reduce = jnp.sum if norm == 1 else jnp.max
    return reduce(magnitude, axis=reduction_axes(unit_axes, x.ndim), keepdims=True)


def unitwise_norm(x: jax.Array, unit_axes: Sequence[int], norm: NormOrder = 2) -> jax.Array:
    """The norm of each unit of ``x``, accumulated in at least float32.

    Not the same signature as ``optax.unitwise_norm``: optax's takes the axes the norm *reduces
    over* (its ``axis``); this takes the axes that *index units* (the complement), and always
    keeps the reduced axes as size 1.

    Args:
      x: an array.
      unit_axes: the axes that index units (``()``: the whole array is one unit). Negative axes
        are allowed.
      norm: 2 (Euclidean, the default), 1, or ``float("inf")`` (largest magnitude).

    Returns:
      The norms, with the reduced axes kept as size 1 so they broadcast against ``x``: for a
      ``(3, 3, 64, 128)`` conv kernel and ``unit_axes=(-1,)`` the result has shape
      ``(1, 1, 1, 128)``.
    """
    x = jnp.asarray(x)
    axes = normalize_axes("x", tuple(unit_axes), x.shape, "`unit_axes`")
    powered = powered_unit_norms(x, axes, check_norm(norm))
    return jnp.sqrt(powered) if norm == 2 else powered


def safe_sqrt(x: jax.Array) -> jax.Array:
    # sqrt has an infinite derivative at 0; keep jax.grad through the transform finite.
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def clip_scale(
    g_pow: jax.Array, w_pow: jax.Array, clipping: Any, eps: Any, norm: NormOrder = 2
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """AGC from unit norms: (scale, clip mask, ratio ``||G_i|| / max(||W_i||, eps)``).

    ``g_pow`` and ``w_pow`` are the units' norms raised to :func:`norm_power` (squared for L2).
    ``scale`` is exactly 1 where a unit is not clipped. The ratio is only for statistics.

    A unit whose weight norm is not finite (a NaN or Inf in ``W_i``) gets a NaN scale and a NaN
    ratio, so its output is NaN and an ``optax.apply_if_finite`` after AGC skips the step;
    otherwise such a unit would pass unclipped, unnoticed. Finite norms give bit for bit the same
    results as without this check. A powered norm that overflowed (finite inputs whose squared
    norm exceeds float32's range) is fixed afterwards by :func:`unit_clip_scales`.
    """
    power = norm_power(norm)
    w_floor_pow = jnp.maximum(w_pow, eps**power)
    # For L2, compare squared norms: no sqrt on the hot path, and zero gradients never divide.
    max_pow = clipping**power * w_floor_pow
    clip = g_pow > max_pow
    safe_g_pow = jnp.where(clip, g_pow, 1)
    if power == 2:
        factor = safe_sqrt(max_pow) * jax.lax.rsqrt(safe_g_pow)
    else:
        factor = max_pow / safe_g_pow
    w_finite = jnp.isfinite(w_pow)
    scale = jnp.where(w_finite, jnp.where(clip, factor, 1), jnp.nan)
    safe_den = jnp.where(w_floor_pow > 0, w_floor_pow, 1)
    ratio_pow = jnp.where(w_floor_pow > 0, g_pow / safe_den, jnp.where(g_pow > 0, jnp.inf, 0))
    ratio = jnp.sqrt(ratio_pow) if power == 2 else ratio_pow
    return scale, clip, jnp.where(w_finite, ratio, jnp.nan)


def _rescale_exponent(dtype: Any) -> int:
    """``k`` such that a unit norm of ``x * 2**-k`` cannot overflow when raised to its power:
    three quarters of the dtype's exponent range (96 for float32, whose largest number times
    ``2**-96`` is 4.3e9). Entries below ``2**(k - 126)`` (1e-9 in float32) then vanish, which
    changes no norm large enough to have overflowed (> 1.8e19)."""
    return 3 * jnp.finfo(dtype).maxexp // 4


def scaled_powered_norms(
    x: jax.Array, unit_axes: tuple[int, ...], norm: NormOrder, at_least: Any = jnp.float32
) -> tuple[jax.Array, int]:
    """The powered unit norms of ``x * 2**-k`` and ``k``: ``||x|| = 2**k * norm**(1/power)``.

    Accumulated in ``x``'s real dtype promoted with ``at_least``, which also sets ``k``: give
    the gradient and the weight of a leaf the same ``at_least`` and they get the same ``k``.

    Finite for every finite unit, while the norm of ``x`` itself may exceed float32's range once
    powered; the multiplication by a power of two is exact. One pass over ``x``, so only used
    where the one-pass powered norm overflowed. (A power-of-two constant, not a per-unit
    ``frexp``/``ldexp`` rescaling: those expand into dozens of bit operations per leaf, which made
    this rarely taken branch most of the optimizer's compile time.)
    """
    real = jnp.real(x).dtype if jnp.iscomplexobj(x) else x.dtype
    acc_real = jnp.promote_types(real, at_least)
    k = _rescale_exponent(acc_real)
    acc = jnp.promote_types(x.dtype, acc_real)  # a complex leaf stays complex
    scaled = x.astype(acc) * jnp.asarray(2.0**-k, acc_real)
    return powered_unit_norms(scaled, unit_axes, norm), k


def _rescaled_clip_scale(g_pow, w_pow, g_scaled, w_scaled, k, fast, clipping, eps, norm):
    # Where a powered norm overflowed, take the norm of the input times 2**-k instead (g_scaled,
    # w_scaled), and put the power of two back last, after the ratio of the two norms: no
    # intermediate leaves the float range (a final value that does rounds to 0 or +inf, the
    # right answer for the scale's min(1, .)). Units whose inputs are not finite keep the fast
    # path's answer. Returns (scale, clip, ratio, every unit's inputs finite).
    scale, clip, ratio = fast
    power = norm_power(norm)
    root = jnp.sqrt if power == 2 else (lambda v: v)
    g_big, w_big = jnp.isposinf(g_pow), jnp.isposinf(w_pow)
    g_norm = root(jnp.where(g_big, g_scaled, g_pow))  # in units of 2**(k * g_big)
    w_norm = root(jnp.where(w_big, w_scaled, w_pow))  # in units of 2**(k * w_big)
    finite = jnp.isfinite(g_norm) & jnp.isfinite(w_norm)
    use = (g_big | w_big) & finite
    # max(||W||, eps): a weight norm that overflowed is far above any eps.
    floor = jnp.where(w_big, w_norm, jnp.maximum(w_norm, eps))
    shift = w_big.astype(jnp.int32) - g_big.astype(jnp.int32)  # -1, 0 or 1
    one = jnp.ones((), g_norm.dtype)
    factor = jnp.where(shift > 0, 2.0**k, jnp.where(shift < 0, 2.0**-k, one)).astype(g_norm.dtype)
    has_grad = g_norm > 0
    safe_g = jnp.where(has_grad, g_norm, 1)
    # clipping * max(||W||, eps) / ||G||: the scale when it is below 1 (then the unit clips).
    bound_over_g = floor / safe_g * factor * clipping
    bound_over_g = jnp.where(jnp.isnan(bound_over_g), 0, bound_over_g)  # clipping 0 times +inf
    # A scale below the smallest normal number becomes 0 on every backend (XLA:CPU flushes such
    # values anyway; kept, their few significant bits could overshoot the bound).
    bound_over_g = jnp.where(bound_over_g < jnp.finfo(bound_over_g.dtype).tiny, 0, bound_over_g)
    new_clip = has_grad & (bound_over_g < 1)
    new_scale = jnp.where(new_clip, bound_over_g, 1)
    # ||G|| / max(||W||, eps), for the statistics only (+inf when it exceeds float32).
    new_ratio = jnp.where(floor > 0, safe_g / jnp.where(floor > 0, floor, 1) / factor, jnp.inf)
    new_ratio = jnp.where(has_grad, new_ratio, 0)
    return (
        jnp.where(use, new_scale.astype(scale.dtype), scale),
        jnp.where(use, new_clip, clip),
        jnp.where(use, new_ratio.astype(ratio.dtype), ratio),
        jnp.all(finite),
    )


class UnitScales(NamedTuple):
    """What :func:`unit_clip_scales` returns.

    Attributes:
      scales: each leaf's per-unit scale, shaped like its powered norms (keepdims).
      clipped: whether each unit is clipped, all leaves' units in one vector.
      ratios: each unit's ``||G_i|| / max(||W_i||, eps)`` (statistics), in the same order.
      finite: a bool scalar: every unit's gradient and weight norm is finite (no NaN or Inf
        entry in any clipped leaf's gradient or weights).
    """

    scales: list[jax.Array]
    clipped: jax.Array
    ratios: jax.Array
    finite: jax.Array


def unit_clip_scales(
    leaves: Sequence[tuple[jax.Array, jax.Array, tuple[int, ...], jax.Array, jax.Array]],
    clipping: Any,
    eps: Any,
    norm: NormOrder = 2,
    offsets: Sequence[jax.Array] = (),
) -> UnitScales:
    """:func:`clip_scale` for every clipped leaf, exact also where a powered norm overflowed.

    ``leaves`` holds ``(g, w, unit_axes, g_pow, w_pow)`` per leaf, the powered norms from the
    one-pass reduction (XLA or Pallas). The scales are computed on one vector holding every
    leaf's units (one per norm dtype), so the program has one copy of the scale arithmetic, not
    one per leaf: per leaf, it was most of the optimizer's compile time, and the statistics
    and the finiteness flag are single reductions over that vector.

    In float32 the squared L2 norm overflows once ``||x|| > ~1.8e19``; such a unit would be
    clipped to zero (a huge gradient) or get a NaN scale (huge weights). One ``lax.cond`` on a
    single flag for the whole tree recomputes, only when some unit overflowed, the norms of
    every leaf scaled by a power of two and forms the scales from those. Then every finite unit
    obeys ``||G_i|| <= clipping * max(||W_i||, eps)`` to float rounding. The common case pays for
    the flag (a reduction over the unit norms, not over the leaves) and nothing else. XLA's
    ``cost_analysis()`` counts the branch that does not run as if it did.

    ``offsets``: where each leaf's units start in that vector, as int32 scalars that are
    runtime values (an optimizer's state, see ``clipping.unit_offsets``). A slice at a constant
    offset becomes part of the kernel that reads it, so XLA generates one update kernel per
    leaf; a slice at a runtime offset lets leaves of one shape share one kernel (NF-ResNet-50's
    optimizer: 177 kernels of each update loop become 30). Used when every leaf's norms share
    one dtype (the offsets count all clipped units in order); otherwise, or when empty, each
    leaf takes a static slice.
    """
    groups: dict[Any, list[int]] = {}
    for i, (*_, g_pow, w_pow) in enumerate(leaves):
        groups.setdefault(jnp.result_type(g_pow, w_pow), []).append(i)
    if not groups:
        return UnitScales([], jnp.zeros(0, bool), jnp.zeros(0, jnp.float32), jnp.array(True))
    if offsets and len(offsets) != len(leaves):
        raise ValueError(
            f"the optimizer state holds unit offsets for {len(offsets)} clipped leaves, but the "
            f"parameters have {len(leaves)}: create the state with `tx.init(params)` for these "
            "parameters"
        )
    runtime_offsets = bool(offsets) and len(groups) == 1
    scales: list[Any] = [None] * len(leaves)
    clipped, ratios, finite = [], [], []
    for dtype, members in groups.items():
        scale, clip, ratio, ok = _joined_clip_scales(
            [leaves[i] for i in members], dtype, clipping, eps, norm
        )
        offset = 0
        for i in members:
            shape = leaves[i][3].shape
            size = math.prod(shape)
            if runtime_offsets:
                part = jax.lax.dynamic_slice(scale, (offsets[i],), (size,))
            else:
                part = scale[offset : offset + size]
            scales[i] = part.reshape(shape)
            offset += size
        clipped.append(clip)
        ratios.append(ratio.astype(jnp.float32))
        finite.append(ok)
    return UnitScales(
        scales,
        jnp.concatenate(clipped),
        jnp.concatenate(ratios),
        functools.reduce(jnp.logical_and, finite),
    )


def _joined_clip_scales(leaves, dtype, clipping, eps, norm):
    """(scale, clip, ratio, every unit finite) of ``leaves`` (as in :func:`unit_clip_scales`),
    on the vector of all their units in ``dtype``."""

    def joined(values):
        return jnp.concatenate([jnp.ravel(v).astype(dtype) for v in values])

    g_all = joined([g_pow for *_, g_pow, _ in leaves])
    w_all = joined([w_pow for *_, w_pow in leaves])
    fast = clip_scale(g_all, w_all, clipping, eps, norm)
    fast_finite = jnp.all(jnp.isfinite(g_all) & jnp.isfinite(w_all))
    if norm == math.inf:  # a max never overflows
        return (*fast, fast_finite)

    def rescaled():
        # One k (set by the joined dtype) for every gradient and weight.
        scaled = [
            scaled_powered_norms(x, unit_axes, norm, at_least=dtype)[0] if x.size else x_pow
            for g, w, unit_axes, g_pow, w_pow in leaves
            for x, x_pow in ((g, g_pow), (w, w_pow))  # an empty unit has norm 0
        ]
        k = _rescale_exponent(dtype)
        g_scaled, w_scaled = joined(scaled[0::2]), joined(scaled[1::2])
        return _rescaled_clip_scale(g_all, w_all, g_scaled, w_scaled, k, fast, clipping, eps, norm)

    overflow = jnp.any(jnp.isposinf(g_all) | jnp.isposinf(w_all))
    return jax.lax.cond(overflow, rescaled, lambda: (*fast, fast_finite))


def apply_scale(g: jax.Array, scale: jax.Array) -> jax.Array:
    """``g * scale`` in the wider of the two dtypes, cast back to ``g.dtype``.

    A scale of exactly 1 returns g bit for bit, also in bf16 (which widens to float32 and back
    exactly).
    """
    return (g * scale.astype(jnp.promote_types(g.dtype, scale.dtype))).astype(g.dtype)

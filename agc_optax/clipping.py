"""Adaptive Gradient Clipping (Brock et al. 2021) as an optax transform, and the per-leaf driver.

:func:`clip_leaves` is the one loop every AGC transform runs (:func:`adaptive_grad_clip`,
:func:`agc_optax.sgd_agc`, :func:`agc_optax.adamw_agc` and the Pallas path): it checks the trees
against the unit plan, computes each clipped leaf's per-unit scale, hands the leaf to the
transform's own leaf function, and assembles the statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agc_optax._checks import check_float_leaf, check_hyperparameter, check_static_flag
from agc_optax._norms import (
    NormOrder,
    apply_scale,
    check_norm,
    powered_unit_norms,
    unit_clip_scales,
)
from agc_optax._plan import PlanCache, UnitInfo, UnitTable
from agc_optax.unit_axes import ExcludeRule, UnitAxesRule


class AdaptiveGradClipState(NamedTuple):
    """Statistics of the last update, kept when ``stats=True``.

    Attributes:
      clip_fraction: clipped units / eligible (non-excluded) units, float32 scalar; 0 when
        there are no eligible units. A zero-size leaf has no units along a zero-length unit
        axis (a ``(4, 0)`` kernel with units on its last axis has 0), otherwise units of norm 0,
        which are never clipped.
      max_ratio: the largest ``||G_i|| / max(||W_i||, eps)`` over all eligible units.
      num_units: how many units are eligible, int32 scalar.
      unit_offsets: in :func:`adaptive_grad_clip`'s state, :func:`unit_offsets` (constants,
        kept so that XLA shares kernels between leaves of one shape); empty in the fused
        optimizers' statistics, whose state keeps its own beside them.
    """

    clip_fraction: jax.Array
    max_ratio: jax.Array
    num_units: jax.Array
    unit_offsets: tuple[jax.Array, ...] = ()


class UnitOffsetsState(NamedTuple):
    """State of :func:`adaptive_grad_clip` without statistics: :func:`unit_offsets` only."""

    unit_offsets: tuple[jax.Array, ...] = ()


def initial_stats(plan: UnitTable) -> AdaptiveGradClipState:
    """Zero statistics, with the (static) number of eligible units."""
    return AdaptiveGradClipState(
        clip_fraction=jnp.zeros((), jnp.float32),
        max_ratio=jnp.zeros((), jnp.float32),
        num_units=jnp.asarray(plan.num_units, jnp.int32),
    )


def unit_offsets(plan: UnitTable) -> tuple[jax.Array, ...]:
    """Where each clipped leaf's units start in the vector of all clipped units, in leaf order.

    One int32 scalar per clipped leaf, for an optimizer's state. AGC forms its scales on that
    one vector and each leaf's update slices its own; passed in the state, the offsets are
    runtime values rather than constants, so XLA compiles one update kernel per leaf *shape*
    instead of one per leaf (a slice at a constant offset is part of the kernel that reads it).
    On NF-ResNet-50's optimizer that halves the compile time (``benchmarks/RESULTS.md``).
    """
    starts = np.cumsum([0] + [row.num_units for row in plan if row.clipped])[:-1]
    return tuple(jnp.asarray(start, jnp.int32) for start in starts)


UnitNorms = Callable[..., tuple[jax.Array, jax.Array]]
"""``(row, g, w, *state_leaves) -> (g_pow, w_pow)``: a clipped leaf's powered unit norms."""

LeafFn = Callable[..., tuple[Any, ...]]
"""``(row, g, w, scale, *state_leaves) -> outputs``: a transform's step for one leaf.

``scale`` is AGC's per-unit scale (keepdims), or ``None`` for a leaf AGC leaves alone.
"""


def xla_unit_norms(norm: NormOrder) -> UnitNorms:
    """Unit norms computed by XLA reductions, the default of :func:`clip_leaves`."""

    def unit_norms(row: UnitInfo, g: jax.Array, w: jax.Array, *state: Any):
        del state
        return powered_unit_norms(g, row.unit_axes, norm), powered_unit_norms(
            w, row.unit_axes, norm
        )

    return unit_norms


class ClippedLeaves(NamedTuple):
    """What :func:`clip_leaves` returns.

    Attributes:
      outputs: one tree per output of the leaf function.
      stats: :class:`AdaptiveGradClipState`, or ``None`` unless ``stats``.
      finite: with ``guard``, a bool scalar: the step is finite (see :func:`clip_leaves`);
        else ``None``.
    """

    outputs: tuple[Any, ...]
    stats: AdaptiveGradClipState | None
    finite: jax.Array | None


def clip_leaves(
    who: str,
    plans: PlanCache,
    updates: Any,
    params: Any,
    leaf_fn: LeafFn,
    *,
    clipping: Any,
    eps: Any,
    norm: NormOrder = 2,
    stats: bool = False,
    state: Sequence[Any | None] = (),
    num_outputs: int = 1,
    unit_norms: UnitNorms | None = None,
    guard: bool = False,
    value: Any = None,
    offsets: Sequence[jax.Array] = (),
    previous_stats: Any = None,
) -> ClippedLeaves:
    """Runs AGC and a transform's leaf function over every leaf; the driver of all AGC transforms.

    Args:
      who: the transform's name, for errors.
      plans: the transform's plans; the driver takes the one of ``params``.
      updates: the gradients.
      params: the parameters (``None`` is an error naming ``who``).
      leaf_fn: the transform's step for one leaf, see :data:`LeafFn`.
      clipping: AGC's threshold.
      eps: AGC's weight-norm floor.
      norm: the unit norm.
      stats: whether to assemble :class:`AdaptiveGradClipState`.
      state: trees shaped like params (momentum, moments) whose leaves are passed to ``leaf_fn``
        after the scale; ``None`` for a tree the transform does not keep (its leaves are None).
      num_outputs: how many values ``leaf_fn`` returns.
      unit_norms: how to compute a clipped leaf's unit norms; XLA reductions by default.
      guard: decide, before any leaf's step, whether the step is finite, and pass that flag
        to ``leaf_fn`` as the keyword ``finite``: every clipped unit's gradient and weight norm
        is finite (read off the unit norms, which exist anyway), every entry of the gradients
        of the leaves AGC leaves alone is finite (one reduction each), and so is ``value``.
      value: the loss, checked by ``guard`` when given.
      offsets: :func:`unit_offsets` of the plan, from the transform's state (runtime values,
        so that leaves of one shape share their update kernels); empty: constant slices.
      previous_stats: the statistics in the transform's state; with ``stats``, their
        ``num_units`` (which never changes) is returned as it came in. A jitted step drops
        inputs it does not read, and donation pairs the remaining inputs with outputs of the
        same shape in order: a fresh ``num_units`` output shifted every later int32 scalar of a
        donated state (the unit offsets) by one, and XLA copied each of them every step.

    Returns:
      :class:`ClippedLeaves`.
    """
    if params is None:
        raise ValueError(f"{who} needs the parameters: call `tx.update(grads, state, params)`.")
    plan = plans(params)
    g_leaves = plan.check_matches(updates, "updates", who)
    w_leaves = jax.tree.leaves(params)
    state_leaves = [[None] * len(g_leaves) if t is None else jax.tree.leaves(t) for t in state]
    unit_norms = unit_norms or xla_unit_norms(norm)
    leaves = list(zip(plan, g_leaves, w_leaves, *state_leaves, strict=True))
    clipped = [i for i, (row, *_) in enumerate(leaves) if row.clipped]
    norms = []
    for i in clipped:
        row, g, w, *leaf_state = leaves[i]
        check_float_leaf(row.path, g, "the gradient")
        norms.append((g, w, row.unit_axes, *unit_norms(row, g, w, *leaf_state)))
    units = unit_clip_scales(norms, clipping, eps, norm, offsets=offsets)
    scales = dict(zip(clipped, units.scales, strict=True))
    finite = None
    if guard:
        flags = [units.finite]
        flags += [jnp.all(jnp.isfinite(g)) for row, g, *_ in leaves if not row.clipped]
        if value is not None:
            flags.append(jnp.all(jnp.isfinite(value)))
        finite = functools.reduce(jnp.logical_and, flags)
    outputs = []
    for i, (row, g, w, *leaf_state) in enumerate(leaves):
        extra = {"finite": finite} if guard else {}
        outputs.append(leaf_fn(row, g, w, scales.get(i), *leaf_state, **extra))
    trees = tuple(plan.unflatten([out[i] for out in outputs]) for i in range(num_outputs))
    if not stats:
        return ClippedLeaves(trees, None, finite)
    zero = initial_stats(plan)
    zero = zero._replace(num_units=getattr(previous_stats, "num_units", zero.num_units))
    if units.ratios.size == 0:  # no clipped units (e.g. only zero-size leaves): 0, not 0 / 0
        return ClippedLeaves(trees, zero, finite)
    num_clipped = jnp.sum(units.clipped, dtype=jnp.int32)
    agc_stats = AdaptiveGradClipState(
        clip_fraction=num_clipped.astype(jnp.float32) / plan.num_units,
        max_ratio=jnp.max(units.ratios),
        num_units=zero.num_units,
    )
    return ClippedLeaves(trees, agc_stats, finite)


def _whole_leaf(path: str, leaf: Any) -> tuple[int, ...]:
    del path, leaf
    return ()


class _Unset:
    """The default of ``axis``: not given (``None`` is optax's rank-based default)."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()

#: optax.unitwise_norm's reduction axes by rank when ``axis=None`` (rank 1 or squeezed to <= 1:
#: the whole leaf).
_OPTAX_REDUCTION_AXES = {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}


def optax_axis_rule(axis: int | Sequence[int] | None) -> Callable[[str, Any], tuple[int, ...]]:
    """A unit-axes rule from optax's ``axis``: the axes the norm reduces over, for every leaf.

    ``None`` is ``optax.unitwise_norm``'s rank-based default: a leaf that squeezes to rank <= 1
    is one unit; otherwise reduce over axis 0 (rank 2 and 3), (0, 1, 2) (rank 4) or
    (0, 1, 2, 3) (rank 5). The unit axes are the complement of the reduction axes.
    """
    if axis is not None:
        if isinstance(axis, int | np.integer):
            axis = (int(axis),)
        if not (isinstance(axis, Sequence) and all(isinstance(a, int | np.integer) for a in axis)):
            raise TypeError(
                f"`axis` must be an int, a tuple of ints or None (optax's meaning: the axes the "
                f"norm reduces over), got {axis!r}."
            )
        axis = tuple(int(a) for a in axis)

    def rule(path: str, leaf: Any) -> tuple[int, ...]:
        shape = tuple(np.shape(leaf))
        rank = len(shape)
        if axis is None:
            if sum(d != 1 for d in shape) <= 1:
                return ()
            if rank not in _OPTAX_REDUCTION_AXES:
                raise ValueError(
                    f"`{path}`: `axis=None` (optax's rank-based default) handles ranks 1 to 5, "
                    f"got shape {shape}; pass `axis=` the axes to reduce over, or use `unit_axes`."
                )
            reduce = _OPTAX_REDUCTION_AXES[rank]
        else:
            if not all(-rank <= a < rank for a in axis):
                raise ValueError(
                    f"`{path}`: `axis={axis}` is out of range for shape {shape}; `axis` (the "
                    f"axes the norm reduces over) applies to every leaf, so use `unit_axes` "
                    f"rules for leaves of different ranks."
                )
            reduce = tuple(a % rank for a in axis)
        return tuple(a for a in range(rank) if a not in reduce)

    return rule


def adaptive_grad_clip(
    clipping: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-3,
    axis: int | Sequence[int] | None | _Unset = _UNSET,
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
    placed after this transform still skips the step. Finite gradients and weights always give
    finite results that obey the bound, also when a float32 squared norm would overflow
    (:math:`\|x\|_2 \gtrsim 1.8 \times 10^{19}`): only then, the leaf's norms are recomputed
    scaled by each unit's largest magnitude.

    Non-finite weights: a unit whose weight :math:`W_i` holds a NaN or an Inf has no meaningful
    bound, so its whole output is NaN (and so is its ratio in ``stats``); every other unit is
    unaffected, and ``optax.apply_if_finite`` placed after this transform skips the step
    (``apply_if_finite`` tests the updates it receives). ``sgd_agc``, ``adamw_agc`` and the
    Pallas kernel share this rule (``_norms.clip_scale``).

    Args:
      clipping: the maximum ratio :math:`\lambda` of a unit's gradient norm to its weight norm.
        DeepMind's NFNets use 0.01 at batch size 4096; small batches favour larger values. May be
        a traced scalar (``optax.inject_hyperparams``).
      eps: floor on weight norms, so zero-initialised weights can still move. May be traced.
      axis: ``optax.adaptive_grad_clip``'s argument, for code migrating from optax: the axes each
        norm *reduces over* (the complement of unit axes), the same for every leaf; an
        explicit ``None`` is optax's rank-based default (``optax.unitwise_norm``: rank <= 1
        after squeezing is one unit, rank 2-3 reduce axis 0, rank 4 axes (0, 1, 2), rank 5
        axes (0, 1, 2, 3)), which differs from this library's inferred units for some layers.
        Leave it out to use ``unit_axes``; giving both is an error.
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
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``. Its state
      (:class:`UnitOffsetsState`, or :class:`AdaptiveGradClipState` with ``stats``) holds where
      each leaf's units start among all units, as runtime values: XLA then compiles one kernel
      per leaf shape, not one per leaf (on NFNet-F0's parameters, XLA:CPU: 2.0 s against 3.2 s
      with constant offsets; ``optax.adaptive_grad_clip`` 1.4 s).

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
    check_hyperparameter("clipping", clipping, allow_inf=True)
    check_hyperparameter("eps", eps)
    check_static_flag("stats", stats)
    norm = check_norm(norm)
    if granularity not in ("unit", "layer"):
        raise ValueError(f"`granularity` must be 'unit' or 'layer', got {granularity!r}.")
    rule = _whole_leaf if granularity == "layer" else unit_axes
    if axis is not _UNSET:
        if unit_axes is not None:
            raise ValueError(
                f"Give `axis` (optax's reduction axes) or `unit_axes` (the axes that index "
                f"units), not both; got axis={axis!r} and unit_axes={unit_axes!r}."
            )
        if granularity == "layer":
            raise ValueError(
                '`axis` and `granularity="layer"` both choose the units; give one, '
                f"got axis={axis!r}."
            )
        rule = optax_axis_rule(axis)

    plans = PlanCache(rule, exclude)  # bad rules fail here, at construction

    def init_fn(params: Any) -> optax.OptState:
        plan = plans(params)  # and bad leaves at init, not at step 1
        offsets = unit_offsets(plan)
        if stats:
            return initial_stats(plan)._replace(unit_offsets=offsets)
        return UnitOffsetsState(offsets)

    def keep_or_scale(row: UnitInfo, g: jax.Array, w: jax.Array, scale: jax.Array | None):
        return (g if scale is None else apply_scale(g, scale),)

    def update_fn(updates: Any, state: optax.OptState, params: Any = None):
        offsets = getattr(state, "unit_offsets", ())  # () also from a state made by hand
        (clipped,), new_stats, _ = clip_leaves(
            "adaptive_grad_clip",
            plans,
            updates,
            params,
            keep_or_scale,
            clipping=clipping,
            eps=eps,
            norm=norm,
            stats=stats,
            offsets=offsets,
            previous_stats=state,
        )
        return clipped, (new_stats._replace(unit_offsets=offsets) if stats else state)

    return optax.GradientTransformation(init_fn, update_fn)

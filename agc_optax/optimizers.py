"""Optimizer recipes built around AGC, with one fused elementwise update per leaf.

Each recipe computes the same numbers as its ``optax.chain`` (tested to 1e-6 relative in float32),
but applies AGC's per-unit scale inside the optimizer's own elementwise update instead of writing
the clipped gradient out, and arranges the algebra so that XLA materializes as few full-size
intermediates as possible (see ``benchmarks/RESULTS.md`` for the measured bytes).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agc_optax import kernels
from agc_optax._checks import check_hyperparameter, check_static_flag, is_static_zero
from agc_optax._guard import decay, initial_guard, kept, next_count, next_guard
from agc_optax._norms import apply_scale
from agc_optax._plan import PlanCache, UnitInfo
from agc_optax.clipping import clip_leaves, initial_stats, unit_offsets
from agc_optax.unit_axes import ExcludeRule, UnitAxesRule, gets_weight_decay, path_from_keys

#: The classifier's kernel, which the NFNet recipe leaves unclipped (Brock et al. 2021, sec. 4.1).
HEAD_PATTERN = r"(^|/)head/kernel$"


def weight_decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: everything but gains and biases.

    A leaf is spared when the last name of its path is one of ``gain``, ``skip_gain``, ``bias``,
    ``scale``, ``offset`` or ``b``, as in DeepMind's NFNet training code.
    """
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: gets_weight_decay(path_from_keys(kp)), params
    )


class SgdAgcState(NamedTuple):
    """State of :func:`sgd_agc`: step count, momentum buffers, AGC statistics (if kept), the
    guard's record (``skip_nonfinite=True``; else empty), and where each clipped leaf's units
    start in AGC's vector of all units (:func:`agc_optax.clipping.unit_offsets`; constants,
    kept in the state so XLA shares update kernels between leaves of one shape)."""

    count: jax.Array
    momentum: Any
    agc: Any
    guard: Any = optax.EmptyState()
    unit_offsets: tuple[jax.Array, ...] = ()


class AdamWAgcState(NamedTuple):
    """State of :func:`adamw_agc`: step count, first and second moments, AGC statistics, the
    guard's record (``skip_nonfinite=True``; else empty), and the unit offsets (as in
    :class:`SgdAgcState`)."""

    count: jax.Array
    mu: Any
    nu: Any
    agc: Any
    guard: Any = optax.EmptyState()
    unit_offsets: tuple[jax.Array, ...] = ()


def _check_learning_rate(learning_rate: optax.ScalarOrSchedule) -> None:
    """A concrete learning rate must be finite and >= 0; schedules (callables) are not checked."""
    if not callable(learning_rate):
        check_hyperparameter("learning_rate", learning_rate)


def _learning_rate(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> Any:
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _agc_state(plans: PlanCache, params: Any, stats: bool) -> Any:
    return initial_stats(plans(params)) if stats else optax.EmptyState()


def _sgd_elementwise(
    g: jax.Array,
    w: jax.Array | None,
    s: jax.Array | None,
    m: jax.Array | None,
    neg_lr: Any,
    *,
    momentum: Any,
    nesterov: bool,
    weight_decay: Any,
    barrier: bool = False,
    finite: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """The elementwise step of :func:`sgd_agc` for one leaf: (update, new momentum).

    The same function is the body of the Pallas kernel and the XLA path, so both compute the
    same expression in the same dtypes. ``s`` is ``None`` for a leaf AGC leaves alone (then
    ``g`` itself is used, not ``g * 1``); ``w`` is ``None`` when the leaf gets no weight decay;
    ``m`` is ``None`` without momentum. The clipped gradient and the new momentum keep the
    dtypes of ``g`` and ``m`` (as the optax chain does), so bf16 states stay bf16.

    ``barrier``: Nesterov needs the decayed gradient g' twice (for the new momentum and for the
    update). Without multi-output fusion (XLA:CPU) XLA would write g' out and read it back, or
    copy the donated momentum buffer; recomputing g' from barrier'd inputs (no CSE across the
    barrier) keeps each of the two loops at one read per input.

    ``finite``: the guard's flag (``skip_nonfinite``); when False the update is 0 and the
    momentum keeps its value, without a select between the old and the new buffer.
    """

    def decayed(g, w, s):
        step = g if s is None else apply_scale(g, s)
        return step + weight_decay * w if w is not None else step

    step = decayed(g, w, s)
    m_next = None
    if m is not None:
        m_next = (kept(finite, step) + decay(finite, momentum) * m).astype(m.dtype)
        if nesterov:
            if barrier:
                g, w, s = jax.lax.optimization_barrier((g, w, s))
            step = decayed(g, w, s) + momentum * m_next
        else:
            step = m_next
    return kept(finite, neg_lr * step).astype(g.dtype), m_next


def _sgd_agc_parts(
    learning_rate: optax.ScalarOrSchedule,
    momentum: Any,
    nesterov: bool,
    weight_decay: Any,
    clipping: Any,
    eps: Any,
    exclude: ExcludeRule,
    unit_axes: UnitAxesRule,
    stats: bool,
    implementation: str,
    skip_nonfinite: bool,
) -> tuple[Callable, Callable]:
    """``(init, update(updates, state, params, apply=False, value=None))`` of :func:`sgd_agc`.

    With ``apply``, ``update`` returns the new params instead of the updates (for
    :func:`sgd_agc_step`).
    """
    check_static_flag("nesterov", nesterov)
    check_static_flag("stats", stats)
    _check_learning_rate(learning_rate)
    check_hyperparameter(
        "momentum", momentum, below=1, why="; the buffers would grow without bound (NFNets use 0.9)"
    )
    check_hyperparameter("clipping", clipping, allow_inf=True)
    for name, value in (("weight_decay", weight_decay), ("eps", eps)):
        check_hyperparameter(name, value)
    kernels.check_implementation(implementation)
    check_static_flag("skip_nonfinite", skip_nonfinite)
    has_momentum = not is_static_zero(momentum)
    has_decay = not is_static_zero(weight_decay)
    plans = PlanCache(unit_axes, exclude)
    elementwise = functools.partial(
        _sgd_elementwise, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
    )

    def init_fn(params: Any) -> SgdAgcState:
        buffers = jax.tree.map(jnp.zeros_like, params) if has_momentum else optax.EmptyState()
        return SgdAgcState(
            count=jnp.zeros((), jnp.int32),
            momentum=buffers,
            agc=_agc_state(plans, params, stats),
            guard=initial_guard(skip_nonfinite),
            unit_offsets=unit_offsets(plans(params)),
        )

    def update(
        updates: Any, state: SgdAgcState, params: Any = None, apply: bool = False, value=None
    ):
        neg_lr = -_learning_rate(learning_rate, state.count)

        def xla_leaf(row: UnitInfo, g, w, scale, m, finite=None):
            decay_w = w if row.weight_decay and has_decay else None
            u, m_next = elementwise(g, decay_w, scale, m, neg_lr, barrier=True, finite=finite)
            return (optax.apply_updates(w, u) if apply else u), m_next

        leaf_fn, unit_norms = xla_leaf, None
        if kernels.use_pallas(implementation):
            from agc_optax.kernels import _sgd_agc_pallas

            unit_norms, leaf_fn = _sgd_agc_pallas.leaf_functions(
                xla_leaf,
                elementwise,
                neg_lr,
                scalars=(momentum, weight_decay),
                decay=has_decay,
                apply=apply,
            )
        (out, new_momentum), agc, finite = clip_leaves(
            "sgd_agc",
            plans,
            updates,
            params,
            leaf_fn,
            clipping=clipping,
            eps=eps,
            stats=stats,
            state=(state.momentum if has_momentum else None,),
            num_outputs=2,
            unit_norms=unit_norms,
            guard=skip_nonfinite,
            value=value,
            offsets=state.unit_offsets,
            previous_stats=state.agc,
        )
        new_state = SgdAgcState(
            count=next_count(finite, state.count),
            momentum=new_momentum if has_momentum else state.momentum,
            agc=agc if stats else optax.EmptyState(),
            guard=next_guard(state.guard, finite),
            unit_offsets=state.unit_offsets,
        )
        return out, new_state

    return init_fn, update


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
    implementation: str = "xla",
    skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The NFNet optimizer: AGC, then coupled L2 weight decay, then SGD with Nesterov momentum.

    DeepMind's order (Brock et al. 2021): AGC acts on the raw, device-averaged gradients, then
    weight decay is added to every leaf but gains and biases (:func:`weight_decay_mask`), then
    momentum:

    .. math::

      g' = \mathrm{AGC}(g) + \lambda_{wd} w, \quad m \leftarrow \mu m + g', \quad
      u = -\eta\,(g' + \mu m) \text{ (Nesterov) or } -\eta\, m.

    Numerically this is ``optax.chain(adaptive_grad_clip(clipping, eps, ...),
    add_decayed_weights(weight_decay, weight_decay_mask), sgd(learning_rate, momentum,
    nesterov))``, computed in one elementwise update per leaf.

    Non-finite gradients behave as in that chain: a NaN entry passes AGC unchanged and an Inf
    entry turns into NaN (its unit is scaled by 0), so those entries of the update and of the
    momentum become NaN while every other entry stays finite. A unit whose weights hold a NaN
    or an Inf gets a NaN update (see :func:`agc_optax.adaptive_grad_clip`); since
    ``apply_if_finite`` tests only the incoming gradients, check the updates to catch that.
    ``skip_nonfinite=True`` skips such steps inside the fused update (below); or wrap the
    optimizer in ``optax.apply_if_finite(sgd_agc(...), max_consecutive_errors)``.

    Args:
      learning_rate: a float or an optax schedule of the step count.
      momentum: momentum decay :math:`\mu`; 0 or ``None`` for plain SGD (no buffers). Every
        numeric argument may be an array, e.g. from ``optax.inject_hyperparams(sgd_agc)``;
        then momentum buffers are always kept, since a traced value cannot be tested for 0.
      nesterov: use Nesterov momentum.
      weight_decay: coupled L2 coefficient :math:`\lambda_{wd}`; the NFNet default is 2e-5.
      clipping: AGC threshold (see :func:`agc_optax.adaptive_grad_clip`); 0.01 is DeepMind's value
        for batch size 4096, smaller batches favour larger thresholds.
      eps: AGC weight-norm floor.
      exclude: leaves AGC leaves alone; by default the classifier kernel ``head/kernel``.
      unit_axes: AGC unit rule.
      stats: keep AGC statistics in the state (``optax.tree.get(state, "clip_fraction")``).
      implementation: ``"xla"`` (default); ``"pallas"``, a fused Pallas kernel for every leaf
        whose units are its last axis (interpreted, slowly, on CPU; see
        :mod:`agc_optax.kernels`); or ``"auto"``: Pallas on a single GPU or TPU, else XLA.
        The Pallas kernel is tested in interpret mode and cross-lowered for GPU and TPU, but
        has not yet been run or timed on real accelerators; ``"xla"`` is the proven path.
      skip_nonfinite: the divergence guard, fused into the update. A step whose gradients or
        weights hold a NaN or an Inf (or whose ``value``, the loss passed as
        ``tx.update(grads, state, params, value=loss)``, is not finite) returns zero updates
        and leaves the momentum and the count as they were, as ``optax.apply_if_finite``
        would, but decided before the update from the AGC unit norms (no extra pass over the
        tree; one reduction per leaf AGC leaves alone) and without selecting between old and
        new buffers, which would cost a copy of each. The AGC statistics describe the skipped
        step's gradients (``max_ratio`` is then NaN or Inf); ``state.guard``
        (:class:`agc_optax.SkipNonfiniteState`) records ``last_finite`` and ``total_notfinite``.
        Both implementations: the Pallas kernel reads the flag as one more scalar input.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params`` and takes the
      loss as the optional keyword ``value`` (read only by ``skip_nonfinite``).

    References:
      Brock, De, Smith, Simonyan 2021, arXiv:2102.06171, sec. 4 and appendix.

    Example:
      >>> import jax, jax.numpy as jnp, optax, agc_optax
      >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "head": {"kernel": jnp.eye(4, 2)}}
      >>> tx = agc_optax.sgd_agc(learning_rate=optax.cosine_decay_schedule(0.1, 1000))
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, tx.init(params), params)
    """

    init_fn, update = _sgd_agc_parts(
        learning_rate,
        momentum,
        nesterov,
        weight_decay,
        clipping,
        eps,
        exclude,
        unit_axes,
        stats,
        implementation,
        skip_nonfinite,
    )

    def update_fn(
        updates: Any, state: SgdAgcState, params: Any = None, *, value: Any = None, **extra_args
    ):
        del extra_args  # other transforms' (optax.chain passes every extra argument to all)
        return update(updates, state, params, value=value)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sgd_agc_step(learning_rate: optax.ScalarOrSchedule, **kwargs: Any) -> Callable:
    """A whole optimizer step ``(params, state, grads) -> (new_params, new_state)`` of sgd_agc.

    The same numbers as ``tx = agc_optax.sgd_agc(learning_rate, **kwargs)`` followed by
    ``optax.apply_updates``, and the same state (``tx.init(params)``). With the Pallas
    implementation the kernel writes the new weights directly, so a leaf costs 7 passes
    (norms: read g, w; update: read g, w, m, write w, m) instead of the 10 it costs when the
    update is written out and applied separately: XLA cannot fuse ``apply_updates`` into a
    Pallas call. Jit it with ``donate_argnums=(0, 1)`` so that the weights and momentum are
    updated in place.

    Args:
      learning_rate: as :func:`sgd_agc`.
      **kwargs: any other argument of :func:`sgd_agc`, ``implementation`` included (default
        ``"xla"``, as there).

    Returns:
      ``step(params, state, grads, value=None) -> (new_params, new_state)``; ``value``, the
      loss, as in :func:`sgd_agc`.

    Example:
      >>> import jax, jax.numpy as jnp, agc_optax
      >>> params = {"dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
      >>> state = agc_optax.sgd_agc(0.1).init(params)
      >>> step = jax.jit(agc_optax.sgd_agc_step(0.1, implementation="auto"), donate_argnums=(0, 1))
      >>> params, state = step(params, state, jax.tree.map(jnp.ones_like, params))
    """
    bound = inspect.signature(sgd_agc).bind(learning_rate, **kwargs)
    bound.apply_defaults()
    _, update = _sgd_agc_parts(**bound.arguments)

    def step(
        params: Any, state: SgdAgcState, grads: Any, value: Any = None
    ) -> tuple[Any, SgdAgcState]:
        return update(grads, state, params, apply=True, value=value)

    return step


def adamw_agc(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    clipping: float = 0.01,
    agc_eps: float = 1e-3,
    exclude: ExcludeRule = HEAD_PATTERN,
    unit_axes: UnitAxesRule = None,
    stats: bool = False,
    skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW with AGC on the raw gradients before the moments.

    .. math::

      g' = \mathrm{AGC}(g), \quad m \leftarrow \beta_1 m + (1-\beta_1) g', \quad
      v \leftarrow \beta_2 v + (1-\beta_2) g'^2, \quad
      u = -\eta \left(\frac{\hat m}{\sqrt{\hat v + \epsilon_{root}} + \epsilon}
        + \lambda_{wd} w\right)

    with bias-corrected :math:`\hat m, \hat v` and decoupled weight decay on every leaf but gains
    and biases (:func:`weight_decay_mask`). Numerically ``optax.chain(adaptive_grad_clip(clipping,
    agc_eps, ...), optax.adamw(learning_rate, b1, b2, eps, eps_root, weight_decay,
    mask=weight_decay_mask))``, computed in one elementwise pass per leaf. Non-finite gradients
    behave as in that chain (see :func:`sgd_agc`; here the moments take the NaN entries), and
    ``skip_nonfinite=True`` (as in :func:`sgd_agc`) or
    ``optax.apply_if_finite(adamw_agc(...), max_consecutive_errors)`` skips such steps.

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: Adam's denominator epsilon (``agc_eps`` is AGC's weight-norm floor).
      eps_root: epsilon inside the square root.
      weight_decay: decoupled weight decay coefficient.
      clipping: AGC threshold; transformers usually want larger values than NFNets' 0.01.
      agc_eps: AGC weight-norm floor.
      exclude: leaves AGC leaves alone; by default the classifier kernel ``head/kernel``.
      unit_axes: AGC unit rule.
      stats: keep AGC statistics in the state.
      skip_nonfinite: the divergence guard fused into the update, as in :func:`sgd_agc`: a
        non-finite step returns zero updates and keeps both moments and the count (so the bias
        correction does not advance).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params`` and takes the
      loss as the optional keyword ``value``, as :func:`sgd_agc`.

    References:
      Brock et al. 2021, arXiv:2102.06171; Loshchilov & Hutter 2019, arXiv:1711.05101.

    Example:
      >>> import jax, jax.numpy as jnp, agc_optax
      >>> params = {"dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
      >>> tx = agc_optax.adamw_agc(learning_rate=1e-3, clipping=0.05)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    """

    check_static_flag("stats", stats)
    check_static_flag("skip_nonfinite", skip_nonfinite)
    _check_learning_rate(learning_rate)
    for name, value in (("b1", b1), ("b2", b2)):
        check_hyperparameter(name, value, below=1, why=f": 1 - {name}**t would divide by zero")
    check_hyperparameter("clipping", clipping, allow_inf=True)
    for name, value in (
        ("eps", eps),
        ("eps_root", eps_root),
        ("weight_decay", weight_decay),
        ("agc_eps", agc_eps),
    ):
        check_hyperparameter(name, value)
    has_decay = not is_static_zero(weight_decay)
    plans = PlanCache(unit_axes, exclude)

    def init_fn(params: Any) -> AdamWAgcState:
        return AdamWAgcState(
            count=jnp.zeros((), jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
            agc=_agc_state(plans, params, stats),
            guard=initial_guard(skip_nonfinite),
            unit_offsets=unit_offsets(plans(params)),
        )

    def update_fn(
        updates: Any,
        state: AdamWAgcState,
        params: Any = None,
        *,
        value: Any = None,
        **extra_args: Any,
    ):
        del extra_args  # other transforms' (optax.chain passes every extra argument to all)
        lr = _learning_rate(learning_rate, state.count)
        count = optax.safe_increment(state.count)
        correction1, correction2 = 1 - b1**count, 1 - b2**count

        def leaf(row: UnitInfo, g, w, scale, mu, nu, finite=None):
            clipped = g if scale is None else apply_scale(g, scale)
            mu = kept(finite, (1 - b1) * clipped) + decay(finite, b1) * mu
            nu = kept(finite, (1 - b2) * jnp.square(clipped)) + decay(finite, b2) * nu
            mu_hat = mu / correction1.astype(mu.dtype)
            nu_hat = nu / correction2.astype(nu.dtype)
            step = mu_hat / (jnp.sqrt(nu_hat + eps_root) + eps)
            if row.weight_decay and has_decay:
                step = step + weight_decay * w
            return kept(finite, -lr * step).astype(g.dtype), mu, nu

        (out, mu, nu), agc, finite = clip_leaves(
            "adamw_agc",
            plans,
            updates,
            params,
            leaf,
            clipping=clipping,
            eps=agc_eps,
            stats=stats,
            state=(state.mu, state.nu),
            num_outputs=3,
            guard=skip_nonfinite,
            value=value,
            offsets=state.unit_offsets,
            previous_stats=state.agc,
        )
        new_state = AdamWAgcState(
            count=next_count(finite, state.count),
            mu=mu,
            nu=nu,
            agc=agc if stats else optax.EmptyState(),
            guard=next_guard(state.guard, finite),
            unit_offsets=state.unit_offsets,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

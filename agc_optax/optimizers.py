"""Optimizer recipes built around AGC, with one fused elementwise update per leaf.

Each recipe computes the same numbers as its ``optax.chain`` (tested to 1e-6 relative in float32),
but applies AGC's per-unit scale inside the optimizer's own elementwise update instead of writing
the clipped gradient out, and arranges the algebra so that XLA materializes as few full-size
intermediates as possible (see ``benchmarks/RESULTS.md`` for the measured bytes).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agc_optax import kernels
from agc_optax.clipping import (
    apply_scale,
    check_hyperparameter,
    check_static_flag,
    clip_scales,
    initial_stats,
    is_static_zero,
    plan_units,
)
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


class SgdAgcState(NamedTuple):
    """State of :func:`sgd_agc`: step count, momentum buffers, AGC statistics (if kept)."""

    count: jax.Array
    momentum: Any
    agc: Any


class AdamWAgcState(NamedTuple):
    """State of :func:`adamw_agc`: step count, first and second moments, AGC statistics."""

    count: jax.Array
    mu: Any
    nu: Any
    agc: Any


def _learning_rate(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> Any:
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _clipped(g: jax.Array, scale: jax.Array | None) -> jax.Array:
    # Cast back like adaptive_grad_clip, so states keep their dtype (bf16 stays bf16); left
    # unmaterialized, XLA fuses the product into each consumer's loop.
    return g if scale is None else apply_scale(g, scale)


def _agc_core(params: Any, updates: Any, clipping, eps, unit_axes, exclude, stats):
    plan = plan_units(params, unit_axes, exclude)
    scales, agc_stats = clip_scales(updates, params, plan, clipping, eps, 2, stats)
    return scales, (agc_stats if stats else optax.EmptyState())


def _agc_init(params: Any, unit_axes, exclude, stats) -> Any:
    plan = plan_units(params, unit_axes, exclude)  # bad rules fail at init
    return initial_stats(plan, params) if stats else optax.EmptyState()


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
) -> optax.GradientTransformation:
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
    momentum become NaN while every other entry stays finite. Wrap the optimizer in
    ``optax.apply_if_finite(sgd_agc(...), max_consecutive_errors)`` to skip such steps with the
    state untouched.

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

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    References:
      Brock, De, Smith, Simonyan 2021, arXiv:2102.06171, sec. 4 and appendix.

    Example:
      >>> import jax, jax.numpy as jnp, optax, agc_optax
      >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "head": {"kernel": jnp.eye(4, 2)}}
      >>> tx = agc_optax.sgd_agc(learning_rate=optax.cosine_decay_schedule(0.1, 1000))
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, tx.init(params), params)
    """

    check_static_flag("nesterov", nesterov)
    check_static_flag("stats", stats)
    for name, value in (
        ("momentum", momentum),
        ("weight_decay", weight_decay),
        ("clipping", clipping),
        ("eps", eps),
    ):
        check_hyperparameter(name, value)
    has_momentum = not is_static_zero(momentum)
    has_decay = not is_static_zero(weight_decay)

    def init_fn(params: Any) -> SgdAgcState:
        buffers = jax.tree.map(jnp.zeros_like, params) if has_momentum else optax.EmptyState()
        return SgdAgcState(
            count=jnp.zeros((), jnp.int32),
            momentum=buffers,
            agc=_agc_init(params, unit_axes, exclude, stats),
        )

    kernels.check_implementation(implementation)
    hyper = dict(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov)
    hyper |= dict(weight_decay=weight_decay, clipping=clipping, eps=eps, exclude=exclude)

    def update_fn(updates: Any, state: SgdAgcState, params: Any = None):
        if kernels.use_pallas(implementation):
            return kernels.sgd_agc_update(
                updates, state, params, unit_axes=unit_axes, stats=stats, **hyper
            )
        scales, agc_state = _agc_core(params, updates, clipping, eps, unit_axes, exclude, stats)
        lr = _learning_rate(learning_rate, state.count)
        g_leaves, treedef = jax.tree.flatten(updates)
        w_leaves = jax.tree.leaves(params)
        decay = jax.tree.leaves(weight_decay_mask(params))
        m_leaves = jax.tree.leaves(state.momentum) if has_momentum else [None] * len(g_leaves)
        new_u, new_m = [], []
        for g, w, s, m, wd in zip(g_leaves, w_leaves, scales, m_leaves, decay, strict=True):
            # The same elementwise step as the Pallas kernel's body; see kernels.leaf_update.
            u, m_next = kernels.leaf_update(
                g,
                w if wd and has_decay else None,
                s,
                m,
                -lr,
                momentum=momentum,
                nesterov=nesterov,
                weight_decay=weight_decay,
                barrier=True,
            )
            new_u.append(u)
            new_m.append(m_next)
        new_state = SgdAgcState(
            count=optax.safe_increment(state.count),
            momentum=jax.tree.unflatten(treedef, new_m) if has_momentum else state.momentum,
            agc=agc_state,
        )
        return jax.tree.unflatten(treedef, new_u), new_state

    return optax.GradientTransformation(init_fn, update_fn)


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
) -> optax.GradientTransformation:
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

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    References:
      Brock et al. 2021, arXiv:2102.06171; Loshchilov & Hutter 2019, arXiv:1711.05101.

    Example:
      >>> import jax, jax.numpy as jnp, agc_optax
      >>> params = {"dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
      >>> tx = agc_optax.adamw_agc(learning_rate=1e-3, clipping=0.05)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    """

    check_static_flag("stats", stats)
    for name, value in (("b1", b1), ("b2", b2)):
        check_hyperparameter(name, value, below=1, why=f": 1 - {name}**t would divide by zero")
    for name, value in (
        ("eps", eps),
        ("eps_root", eps_root),
        ("weight_decay", weight_decay),
        ("clipping", clipping),
        ("agc_eps", agc_eps),
    ):
        check_hyperparameter(name, value)
    has_decay = not is_static_zero(weight_decay)

    def init_fn(params: Any) -> AdamWAgcState:
        return AdamWAgcState(
            count=jnp.zeros((), jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
            agc=_agc_init(params, unit_axes, exclude, stats),
        )

    def update_fn(updates: Any, state: AdamWAgcState, params: Any = None):
        scales, agc_state = _agc_core(params, updates, clipping, agc_eps, unit_axes, exclude, stats)
        lr = _learning_rate(learning_rate, state.count)
        count = optax.safe_increment(state.count)
        correction1, correction2 = 1 - b1**count, 1 - b2**count
        g_leaves, treedef = jax.tree.flatten(updates)
        decay = jax.tree.leaves(weight_decay_mask(params))
        new_u, new_mu, new_nu = [], [], []
        leaves = zip(
            g_leaves,
            jax.tree.leaves(params),
            scales,
            jax.tree.leaves(state.mu),
            jax.tree.leaves(state.nu),
            decay,
            strict=True,
        )
        for g, w, s, mu, nu, wd in leaves:
            clipped = _clipped(g, s)
            mu = (1 - b1) * clipped + b1 * mu
            nu = (1 - b2) * jnp.square(clipped) + b2 * nu
            new_mu.append(mu)
            new_nu.append(nu)
            mu_hat = mu / correction1.astype(mu.dtype)
            nu_hat = nu / correction2.astype(nu.dtype)
            step = mu_hat / (jnp.sqrt(nu_hat + eps_root) + eps)
            if wd and has_decay:
                step = step + weight_decay * w
            new_u.append((-lr * step).astype(g.dtype))
        new_state = AdamWAgcState(
            count=count,
            mu=jax.tree.unflatten(treedef, new_mu),
            nu=jax.tree.unflatten(treedef, new_nu),
            agc=agc_state,
        )
        return jax.tree.unflatten(treedef, new_u), new_state

    return optax.GradientTransformation(init_fn, update_fn)

"""A fused Pallas kernel for the NFNet optimizer step (AGC + weight decay + SGD momentum).

One leaf whose units lie on its last axis (Dense ``(in, out)``, Conv ``(..., in, out)``) is viewed
as a 2-D array ``(rows, units)``: rows are the reduced axes flattened, which is free for a
row-major array. The step then runs as two kernels:

1. column sums of squares of the gradient and the weight (reads ``g`` and ``w`` once). Each
   ``(row block, column block)`` program writes its own partial sum, so the grid is fully
   parallel on every backend (Triton runs grid points concurrently, so programs must not
   accumulate into a shared output block); XLA adds the partials, ``rows / block_rows`` times
   fewer values than the leaf.
2. the elementwise update (reads ``g``, ``w``, ``m``; writes the new momentum and either the
   update or, for :func:`sgd_agc_step`, the new weight in place), with AGC's per-unit scale,
   computed by XLA from the sums in between, broadcast over rows.

A whole step with :func:`sgd_agc_step` is then 7 passes over a leaf, the minimum for a
two-phase step. Through the ``GradientTransformation`` (``sgd_agc(...,
implementation="pallas")``) it is 10: the update is written out, and ``optax.apply_updates``
reads it back, because XLA cannot fuse an elementwise consumer into a Pallas call.

The per-unit scale uses the same formula as :func:`agc_optax.clipping.unit_clip_scale`, and the
elementwise math is the same Python function in the kernel and in the XLA fallback, so the two
implementations agree to float32 rounding of the norm sums.

Leaves with other unit axes, dtypes other than float32/bfloat16/float16, or fewer than
:data:`MIN_SIZE` elements use the XLA path inside the same step.

On GPU the kernels are lowered with Triton (``pallas_call``'s default there is now Mosaic GPU,
see :func:`_compiler_params`). Tested in interpret mode on CPU, and cross-lowered for CUDA
(Triton) and TPU (Mosaic) without a device; never yet compiled or run on a GPU or TPU, and the
block sizes are untuned guesses. A Pallas call is not partitioned by XLA: with parameters
sharded over several devices, use the XLA path (``"auto"`` does).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import pallas as pl

from agc_optax.clipping import (
    AdaptiveGradClipState,
    apply_scale,
    check_float_leaf,
    check_updates_match,
    initial_stats,
    is_static_zero,
    plan_units,
    safe_sqrt,
    unit_clip_scale,
)

IMPLEMENTATIONS = ("xla", "pallas", "auto")

#: Run kernels in Pallas interpret mode: ``None`` (default) interprets on CPU and compiles on GPU
#: and TPU; ``True`` forces interpret mode everywhere (debugging).
INTERPRET: bool | None = None

#: Leaves with fewer elements take the XLA path: a kernel launch and the partial-sum round trip
#: cost more than they save on small leaves (biases, gains, the stem conv).
MIN_SIZE = 1 << 16

_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# --------------------------------------------------------------------------- dispatch


def check_implementation(implementation: str) -> str:
    """Validates an ``implementation`` argument (``"xla"``, ``"pallas"`` or ``"auto"``)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"`implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}."
        )
    return implementation


def resolve_implementation(
    implementation: str, backend: str | None = None, num_devices: int | None = None
) -> str:
    """``"xla"`` or ``"pallas"``: what ``implementation`` means on ``backend``.

    ``"auto"`` picks Pallas on a single GPU or TPU and XLA elsewhere: on CPU Pallas only
    interprets, which is correct but far slower than XLA; and with several devices the
    parameters may be sharded, and XLA cannot partition a Pallas call, so it would gather
    every sharded leaf onto each device (the XLA path computes unit norms shard-locally).
    ``"pallas"`` forces the kernels, e.g. for replicated parameters on several devices.

    Args:
      implementation: ``"xla"``, ``"pallas"`` or ``"auto"``.
      backend: a platform name; ``None`` means ``jax.default_backend()``.
      num_devices: devices of that backend; ``None`` means ``jax.device_count()``.

    Returns:
      ``"xla"`` or ``"pallas"``.
    """
    check_implementation(implementation)
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    num_devices = jax.device_count() if num_devices is None else num_devices
    accelerator = backend in ("gpu", "cuda", "rocm", "tpu")
    return "pallas" if accelerator and num_devices == 1 else "xla"


def use_pallas(implementation: str) -> bool:
    """Whether ``implementation`` runs the Pallas kernels on the default backend."""
    return resolve_implementation(implementation) == "pallas"


def _interpret() -> bool:
    if INTERPRET is not None:
        return INTERPRET
    return jax.default_backend() not in ("gpu", "cuda", "rocm", "tpu")


def _platform() -> str:
    if _interpret():
        return "interpret"
    return "tpu" if jax.default_backend() == "tpu" else "gpu"


def eligible(
    g: Any, w: Any, m: Any, axes: tuple[int, ...] | None, min_size: int | None = None
) -> bool:
    """Whether a leaf can take the kernel path: float32/bf16/f16, rank >= 2, units on the last axis.

    Args:
      g: the gradient leaf.
      w: the parameter leaf.
      m: the momentum leaf, or ``None`` without momentum.
      axes: the leaf's resolved (non-negative, sorted) unit axes, ``None`` if excluded.
      min_size: smallest leaf size for the kernel; ``None`` means :data:`MIN_SIZE`.
    """
    if axes is None:
        return False
    shape = np.shape(g)
    min_size = MIN_SIZE if min_size is None else min_size
    dtypes = [getattr(x, "dtype", None) for x in (g, w) + (() if m is None else (m,))]
    return (
        len(shape) >= 2
        and tuple(axes) == (len(shape) - 1,)
        and math.prod(shape) >= max(min_size, 1)
        and np.shape(w) == shape
        and (m is None or np.shape(m) == shape)
        and all(d is not None and jnp.dtype(d) in _KERNEL_DTYPES for d in dtypes)
    )


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, 1 << max(0, (n - 1).bit_length()))


def default_blocks(
    num_rows: int, num_cols: int, platform: str | None = None
) -> tuple[int, int, int]:
    """``(phase-1 rows, phase-2 rows, columns)`` of a block for a ``(num_rows, num_cols)`` leaf.

    Triton (GPU) wants power-of-two blocks of a few thousand elements per program; TPU wants the
    last two block dimensions divisible by (8, 128) or equal to the array's. Interpret mode
    (CPU) pays per grid step, so it gets the largest blocks. Untuned: no GPU or TPU was
    available when these were chosen.
    """
    platform = platform or _platform()
    if platform == "tpu":
        cols = num_cols if num_cols <= 512 else 512
        rows = num_rows if num_rows <= 512 else 512
        return rows, min(rows, 256), cols
    if platform == "gpu":
        cols = _pow2_at_most(num_cols, 128)
        return (
            _pow2_at_most(num_rows, 16384 // cols),
            _pow2_at_most(num_rows, 4096 // cols),
            cols,
        )
    cols = _pow2_at_most(num_cols, 512)
    rows = _pow2_at_most(num_rows, 512)
    return rows, rows, cols


def _compiler_params(platform: str) -> Any:
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        # Every grid point is independent, so both axes may be split across TPU cores.
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    if platform == "gpu":
        from jax.experimental.pallas import triton as pltriton

        # Triton, explicitly: pallas_call's default GPU backend is now Mosaic GPU, whose TMA
        # copies need 16-byte row strides (a bf16 leaf with 100 units fails) and whose
        # pallas_call entry point is deprecated.
        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    return None


# --------------------------------------------------------------------------- the kernels


def _sumsq_kernel(g_ref, w_ref, gsq_ref, wsq_ref, *, num_rows: int, block_rows: int):
    g = g_ref[...].astype(jnp.float32)
    w = w_ref[...].astype(jnp.float32)
    gg, ww = g * g, w * w
    if num_rows % block_rows:
        # The last row block overhangs the array; its padding is undefined (NaN in interpret).
        row = pl.program_id(0) * block_rows + jax.lax.broadcasted_iota(
            jnp.int32, (block_rows, 1), 0
        )
        valid = row < num_rows
        gg = jnp.where(valid, gg, 0.0)
        ww = jnp.where(valid, ww, 0.0)
    gsq_ref[...] = jnp.sum(gg, axis=0, keepdims=True)
    wsq_ref[...] = jnp.sum(ww, axis=0, keepdims=True)


def column_sums_of_squares(
    g: jax.Array,
    w: jax.Array,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sums of squares over the rows of two ``(rows, cols)`` arrays, in float32, shape ``(cols,)``.

    Phase 1 of the fused step: one read of each array.

    Args:
      g: the gradient viewed as ``(rows, cols)``.
      w: the weight, same shape.
      block_rows: rows per program; ``None`` picks :func:`default_blocks`.
      block_cols: columns per program; ``None`` picks :func:`default_blocks`.
    """
    num_rows, num_cols = g.shape
    platform = _platform()
    rows1, _, cols = default_blocks(num_rows, num_cols, platform)
    block_rows, block_cols = block_rows or rows1, block_cols or cols
    grid = (pl.cdiv(num_rows, block_rows), pl.cdiv(num_cols, block_cols))
    tile = pl.BlockSpec((block_rows, block_cols), lambda i, j: (i, j))
    # One partial sum per (row block, column); the leading dimension is squeezed in the kernel
    # so TPU sees a (1, block_cols) tile of a (1, cols) slab.
    partial_spec = pl.BlockSpec((pl.squeezed, 1, block_cols), lambda i, j: (i, 0, j))
    partial_shape = jax.ShapeDtypeStruct((grid[0], 1, num_cols), jnp.float32)
    nbytes = g.size * g.dtype.itemsize + w.size * w.dtype.itemsize
    gsq, wsq = pl.pallas_call(
        lambda *refs: _sumsq_kernel(*refs, num_rows=num_rows, block_rows=block_rows),
        out_shape=(partial_shape, partial_shape),
        grid=grid,
        in_specs=[tile, tile],
        out_specs=(partial_spec, partial_spec),
        interpret=_interpret(),
        compiler_params=_compiler_params(platform),
        cost_estimate=pl.CostEstimate(
            flops=4 * g.size, transcendentals=0, bytes_accessed=nbytes + 8 * grid[0] * num_cols
        ),
        name="agc_column_sums_of_squares",
    )(g, w)
    return jnp.sum(gsq, axis=(0, 1)), jnp.sum(wsq, axis=(0, 1))


def scale_from_sums(
    g_pow: jax.Array, w_pow: jax.Array, clipping: Any, eps: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """AGC's (scale, clip mask, ratio) from squared unit norms, as ``unit_clip_scale`` (L2).

    Kept op for op identical to :func:`agc_optax.clipping.unit_clip_scale` with ``norm=2`` (a
    test checks that they agree bit for bit on the same sums), so both implementations clip alike.
    """
    w_floor_pow = jnp.maximum(w_pow, eps**2)
    max_pow = clipping**2 * w_floor_pow
    clip = g_pow > max_pow
    safe_g_pow = jnp.where(clip, g_pow, 1)
    factor = safe_sqrt(max_pow) * jax.lax.rsqrt(safe_g_pow)
    scale = jnp.where(clip, factor, 1)
    safe_den = jnp.where(w_floor_pow > 0, w_floor_pow, 1)
    ratio_pow = jnp.where(w_floor_pow > 0, g_pow / safe_den, jnp.where(g_pow > 0, jnp.inf, 0))
    return scale, clip, jnp.sqrt(ratio_pow)


def leaf_update(
    g: jax.Array,
    w: jax.Array | None,
    s: jax.Array | None,
    m: jax.Array | None,
    neg_lr: Any,
    *,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    barrier: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """The elementwise step of :func:`agc_optax.sgd_agc` for one leaf: (update, new momentum).

    The same function is the body of the Pallas kernel and the XLA fallback, so both compute
    the same expression in the same dtypes. ``s`` is ``None`` for a leaf AGC leaves alone (then
    ``g`` itself is used, not ``g * 1``); ``w`` is ``None`` when the leaf gets no weight decay;
    ``m`` is ``None`` without momentum. The clipped gradient and the new momentum keep the
    dtypes of ``g`` and ``m`` (as the optax chain does), so bf16 states stay bf16.

    ``barrier``: Nesterov needs the decayed gradient g' twice (for the new momentum and for the
    update). Without multi-output fusion (XLA:CPU) XLA would write g' out and read it back, or
    copy the donated momentum buffer; recomputing g' from barrier'd inputs (no CSE across the
    barrier) keeps each of the two loops at one read per input.
    """

    def decayed(g, w, s):
        step = g if s is None else apply_scale(g, s)
        return step + weight_decay * w if w is not None else step

    step = decayed(g, w, s)
    m_next = None
    if m is not None:
        m_next = (step + momentum * m).astype(m.dtype)
        if nesterov:
            if barrier:
                g, w, s = jax.lax.optimization_barrier((g, w, s))
            step = decayed(g, w, s) + momentum * m_next
        else:
            step = m_next
    return (neg_lr * step).astype(g.dtype), m_next


def _update_kernel(*refs, read_w: bool, decay: bool, has_m: bool, apply: bool, hyper: dict):
    refs = list(refs)
    g_ref = refs.pop(0)
    w_ref = refs.pop(0) if read_w else None
    m_ref = refs.pop(0) if has_m else None
    s_ref, lr_ref, out_ref = refs[:3]
    w = None if w_ref is None else w_ref[...]
    u, m_next = leaf_update(
        g_ref[...],
        w if decay else None,
        s_ref[...],
        None if m_ref is None else m_ref[...],
        lr_ref[...],
        **hyper,
    )
    # optax.apply_updates: (p + u) in promoted dtype, cast back to p's.
    out_ref[...] = (w + u).astype(w.dtype) if apply else u
    if has_m:
        refs[3][...] = m_next


def fused_update(
    g: jax.Array,
    w: jax.Array | None,
    scale: jax.Array,
    m: jax.Array | None,
    neg_lr: Any,
    *,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    decay: bool = True,
    apply: bool = False,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Phase 2 of the fused step on ``(rows, cols)`` arrays: (update or new weight, new momentum).

    Args:
      g: the gradient, ``(rows, cols)``.
      w: the weight; read only if ``decay`` or ``apply`` (may be ``None`` otherwise).
      scale: AGC's per-column scale, ``(1, cols)``.
      m: the momentum, or ``None`` without momentum.
      neg_lr: minus the learning rate, a scalar.
      momentum: momentum decay (a Python number).
      nesterov: Nesterov momentum.
      weight_decay: coupled weight decay (a Python number).
      decay: whether this leaf gets weight decay.
      apply: return the new weight ``w + update`` (as ``optax.apply_updates``, in ``w``'s buffer)
        instead of the update, which saves writing the update and reading it back.
      block_rows: rows per program; ``None`` picks :func:`default_blocks`.
      block_cols: columns per program; ``None`` picks :func:`default_blocks`.
    """
    num_rows, num_cols = g.shape
    platform = _platform()
    _, rows2, cols = default_blocks(num_rows, num_cols, platform)
    block_rows, block_cols = block_rows or rows2, block_cols or cols
    hyper = dict(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    decay = bool(decay and weight_decay)
    read_w = decay or apply
    if read_w and w is None:
        raise ValueError("fused_update needs `w` with weight decay or apply=True.")
    neg_lr = jnp.reshape(jnp.asarray(neg_lr, jnp.float32), (1, 1))
    if not momentum:
        m = None

    def spec(x):
        return None if x is None else jax.ShapeDtypeStruct((1, 1), x.dtype)

    # Output dtypes are whatever leaf_update gives in the XLA path (a bf16 momentum buffer stays
    # bf16, the update takes g's dtype).
    u_aval, m_aval = jax.eval_shape(
        lambda *a: leaf_update(*a, **hyper),
        spec(g),
        spec(w) if decay else None,
        spec(scale),
        spec(m),
        neg_lr,
    )
    grid = (pl.cdiv(num_rows, block_rows), pl.cdiv(num_cols, block_cols))
    tile = pl.BlockSpec((block_rows, block_cols), lambda i, j: (i, j))
    row = pl.BlockSpec((1, block_cols), lambda i, j: (0, j))
    scalar = pl.BlockSpec((1, 1), lambda i, j: (0, 0))
    arrays = [g] + ([w] if read_w else []) + ([] if m is None else [m])
    inputs = arrays + [scale, neg_lr]
    in_specs = [tile] * len(arrays) + [row, scalar]
    out_shape = [jax.ShapeDtypeStruct(g.shape, w.dtype if apply else u_aval.dtype)]
    aliases = {}
    if apply:
        aliases[1] = 0  # the new weight overwrites the (donated) weight buffer
    if m is not None:
        out_shape.append(jax.ShapeDtypeStruct(g.shape, m_aval.dtype))
        if m_aval.dtype == m.dtype:
            aliases[len(arrays) - 1] = 1  # and the new momentum the momentum buffer
    nbytes = sum(x.size * x.dtype.itemsize for x in arrays) + sum(
        math.prod(o.shape) * o.dtype.itemsize for o in out_shape
    )
    kernel = functools.partial(
        _update_kernel, read_w=read_w, decay=decay, has_m=m is not None, apply=apply, hyper=hyper
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=grid,
        in_specs=in_specs,
        out_specs=tuple([tile] * len(out_shape)),
        input_output_aliases=aliases,
        interpret=_interpret(),
        compiler_params=_compiler_params(platform),
        cost_estimate=pl.CostEstimate(flops=8 * g.size, transcendentals=0, bytes_accessed=nbytes),
        name="agc_sgd_apply" if apply else "agc_sgd_update",
    )(*inputs)
    return outs[0], (outs[1] if m is not None else None)


# --------------------------------------------------------------------------- the whole step


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)


def sgd_agc_update(
    updates: Any,
    state: Any,
    params: Any,
    *,
    learning_rate: optax.ScalarOrSchedule,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    clipping: Any,
    eps: Any,
    exclude: Any,
    unit_axes: Any,
    stats: bool,
    min_size: int | None = None,
    apply: bool = False,
) -> tuple[Any, Any]:
    """:func:`agc_optax.sgd_agc`'s ``update`` with the Pallas kernels on eligible leaves.

    Same arguments, state and results as the XLA path (or, with ``apply``, the new params).
    Leaves that are not :func:`eligible` (and every leaf when ``momentum`` or ``weight_decay``
    is not a Python number, whose dtype promotion the kernel could not reproduce) are computed
    by XLA in the same step.

    Args:
      updates: the gradients.
      state: an ``SgdAgcState``.
      params: the parameters.
      learning_rate: as :func:`agc_optax.sgd_agc`.
      momentum: as :func:`agc_optax.sgd_agc`.
      nesterov: as :func:`agc_optax.sgd_agc`.
      weight_decay: as :func:`agc_optax.sgd_agc`.
      clipping: as :func:`agc_optax.sgd_agc`.
      eps: as :func:`agc_optax.sgd_agc`.
      exclude: as :func:`agc_optax.sgd_agc`.
      unit_axes: as :func:`agc_optax.sgd_agc`.
      stats: as :func:`agc_optax.sgd_agc`.
      min_size: smallest leaf for the kernel; ``None`` means :data:`MIN_SIZE`.
      apply: return ``optax.apply_updates(params, updates)`` instead of the updates, with the
        kernel writing new weights in place of the update (7 instead of 10 passes per leaf).

    Returns:
      ``(updates, new_state)``, or ``(new_params, new_state)`` with ``apply``.
    """
    # Imported here: optimizers imports this module lazily, from inside its update function.
    from agc_optax.optimizers import SgdAgcState, _learning_rate, weight_decay_mask

    if params is None:
        raise ValueError(
            "adaptive_grad_clip needs the parameters: call `tx.update(grads, state, params)`."
        )
    plan = plan_units(params, unit_axes, exclude)
    check_updates_match(updates, params)
    lr = _learning_rate(learning_rate, state.count)
    neg_lr = -lr
    kernel_ok = _is_number(momentum) and _is_number(weight_decay)
    hyper = dict(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    g_leaves, treedef = jax.tree.flatten(updates)
    w_leaves = jax.tree.leaves(params)
    decay = jax.tree.leaves(weight_decay_mask(params))
    has_momentum = not is_static_zero(momentum)
    m_leaves = jax.tree.leaves(state.momentum) if has_momentum else [None] * len(g_leaves)
    new_u, new_m, clipped_counts, ratios = [], [], [], []
    for (path, axes), g, w, m, wd in zip(plan, g_leaves, w_leaves, m_leaves, decay, strict=True):
        if kernel_ok and eligible(g, w, m, axes, min_size):
            shape, cols = g.shape, g.shape[-1]
            as_2d = (math.prod(shape[:-1]), cols)
            gsq, wsq = column_sums_of_squares(g.reshape(as_2d), w.reshape(as_2d))
            keepdims = (1,) * (len(shape) - 1) + (cols,)
            scale, clip, ratio = scale_from_sums(
                gsq.reshape(keepdims), wsq.reshape(keepdims), clipping, eps
            )
            u, m_next = fused_update(
                g.reshape(as_2d),
                w.reshape(as_2d),
                scale.reshape(1, cols),
                None if m is None else m.reshape(as_2d),
                neg_lr,
                decay=wd,
                apply=apply,
                **hyper,
            )
            u = u.reshape(shape)
            m_next = None if m_next is None else m_next.reshape(shape)
        else:
            scale = clip = ratio = None
            if axes is not None:
                check_float_leaf(path, g, "the gradient")
                scale, clip, ratio = unit_clip_scale(g, w, axes, clipping, eps, 2)
            w_used = w if wd and not is_static_zero(weight_decay) else None
            u, m_next = leaf_update(g, w_used, scale, m, neg_lr, barrier=True, **hyper)
            if apply:
                u = optax.apply_updates(w, u)
        new_u.append(u)
        new_m.append(m_next)
        if stats and clip is not None:
            clipped_counts.append(jnp.sum(clip, dtype=jnp.int32))
            ratios.append(jnp.max(ratio).astype(jnp.float32))
    agc_state: Any = optax.EmptyState()
    if stats:
        agc_state = initial_stats(plan, params)
        if clipped_counts:
            agc_state = AdaptiveGradClipState(
                clip_fraction=sum(clipped_counts).astype(jnp.float32)
                / agc_state.num_units.astype(jnp.float32),
                max_ratio=jnp.max(jnp.stack(ratios)),
                num_units=agc_state.num_units,
            )
    new_state = SgdAgcState(
        count=optax.safe_increment(state.count),
        momentum=jax.tree.unflatten(treedef, new_m) if has_momentum else state.momentum,
        agc=agc_state,
    )
    return jax.tree.unflatten(treedef, new_u), new_state


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
      learning_rate: as :func:`agc_optax.sgd_agc`.
      **kwargs: any other argument of :func:`agc_optax.sgd_agc`, ``implementation`` included
        (default ``"xla"``, as there).

    Returns:
      ``step(params, state, grads) -> (new_params, new_state)``.

    Example:
      >>> import jax, jax.numpy as jnp, agc_optax
      >>> from agc_optax import kernels
      >>> params = {"dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
      >>> state = agc_optax.sgd_agc(0.1).init(params)
      >>> step = jax.jit(kernels.sgd_agc_step(0.1, implementation="auto"), donate_argnums=(0, 1))
      >>> params, state = step(params, state, jax.tree.map(jnp.ones_like, params))
    """
    from agc_optax.optimizers import sgd_agc

    bound = inspect.signature(sgd_agc).bind(learning_rate, **kwargs)
    bound.apply_defaults()
    hyper = dict(bound.arguments)
    implementation = check_implementation(hyper.pop("implementation"))
    tx = sgd_agc(**bound.arguments)

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        if use_pallas(implementation):
            return sgd_agc_update(grads, state, params, apply=True, **hyper)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step

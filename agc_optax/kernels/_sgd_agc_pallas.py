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
   update or, for :func:`agc_optax.sgd_agc_step`, the new weight in place), with AGC's per-unit
   scale, computed by XLA from the sums in between, broadcast over rows.

The AGC driver (``agc_optax.clipping.clip_leaves``) runs the step: this module only supplies
the two per-leaf functions it calls (:func:`leaf_functions`), and the optimizer supplies the
elementwise math, so this module knows nothing of optimizers.

A whole step with :func:`agc_optax.sgd_agc_step` is then 7 passes over a leaf, the minimum for a
two-phase step. Through the ``GradientTransformation`` (``sgd_agc(...,
implementation="pallas")``) it is 10: the update is written out, and ``optax.apply_updates``
reads it back, because XLA cannot fuse an elementwise consumer into a Pallas call.

The per-unit scale is computed by the same function as on the XLA path (the driver's), and the
elementwise math is the same Python function in the kernel and in the XLA fallback, so the two
implementations agree to float32 rounding of the norm sums.

Leaves with other unit axes, dtypes other than float32/bfloat16/float16, or fewer than
:data:`agc_optax.kernels.MIN_SIZE` elements use the XLA path inside the same step.

On GPU the kernels are lowered with Triton (``pallas_call``'s default there is now Mosaic GPU,
see :func:`_compiler_params`). Tested in interpret mode on CPU, and cross-lowered for CUDA
(Triton) and TPU (Mosaic) without a device; never yet compiled or run on a GPU or TPU, and the
block sizes are untuned guesses. A Pallas call is not partitioned by XLA: with parameters
sharded over several devices, use the XLA path (``"auto"`` does).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from agc_optax import kernels
from agc_optax._norms import powered_unit_norms

_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# --------------------------------------------------------------------------- platform


def _interpret() -> bool:
    if kernels.INTERPRET is not None:
        return kernels.INTERPRET
    return jax.default_backend() not in ("gpu", "cuda", "rocm", "tpu")


def _platform() -> str:
    if _interpret():
        return "interpret"
    return "tpu" if jax.default_backend() == "tpu" else "gpu"


def eligible(row: Any, g: Any, w: Any, m: Any, min_size: int | None = None) -> bool:
    """Whether a leaf can take the kernel path: units on its last axis (``row.units_last``),
    float32/bf16/f16 leaves of at least ``min_size`` elements.

    Args:
      row: the leaf's row of the unit plan (``agc_optax.UnitInfo``).
      g: the gradient leaf (the driver has checked its shape against the plan).
      w: the parameter leaf.
      m: the momentum leaf, or ``None`` without momentum.
      min_size: smallest leaf size for the kernel; ``None``: :data:`agc_optax.kernels.MIN_SIZE`.
    """
    min_size = kernels.MIN_SIZE if min_size is None else min_size
    dtypes = [getattr(x, "dtype", None) for x in (g, w) + (() if m is None else (m,))]
    return (
        row.units_last
        and math.prod(row.shape) >= max(min_size, 1)
        and (m is None or np.shape(m) == row.shape)
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


def _blocks(
    shape: tuple[int, int], phase: int, block_rows: int | None, block_cols: int | None
) -> tuple[str, int, int]:
    """``(platform, rows, cols)`` of a phase's blocks: the caller's sizes, else the defaults."""
    platform = _platform()
    rows1, rows2, cols = default_blocks(*shape, platform)
    return platform, block_rows or (rows1 if phase == 1 else rows2), block_cols or cols


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
    platform, block_rows, block_cols = _blocks(g.shape, 1, block_rows, block_cols)
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


Elementwise = Callable[..., tuple[jax.Array, jax.Array | None]]
"""``(g, w | None, scale | None, m | None, neg_lr) -> (update, new momentum | None)``: the
optimizer's elementwise step, run inside the kernel and on the XLA fallback alike."""


def _update_kernel(
    *refs,
    elementwise: Elementwise,
    read_w: bool,
    decay: bool,
    has_m: bool,
    apply: bool,
    guarded: bool,
):
    refs = list(refs)
    g_ref = refs.pop(0)
    w_ref = refs.pop(0) if read_w else None
    m_ref = refs.pop(0) if has_m else None
    s_ref, lr_ref = refs.pop(0), refs.pop(0)
    # The guard's flag as a (1, 1) float (1: finite): a bool block is not portable across
    # Triton and Mosaic, a float32 scalar block is (the learning rate travels the same way).
    extra = {"finite": refs.pop(0)[...] > 0.5} if guarded else {}
    out_ref = refs.pop(0)
    w = None if w_ref is None else w_ref[...]
    u, m_next = elementwise(
        g_ref[...],
        w if decay else None,
        s_ref[...],
        None if m_ref is None else m_ref[...],
        lr_ref[...],
        **extra,
    )
    # optax.apply_updates: (p + u) in promoted dtype, cast back to p's.
    out_ref[...] = (w + u).astype(w.dtype) if apply else u
    if has_m:
        refs.pop(0)[...] = m_next


def fused_update(
    g: jax.Array,
    w: jax.Array | None,
    scale: jax.Array,
    m: jax.Array | None,
    neg_lr: Any,
    *,
    elementwise: Elementwise,
    decay: bool = True,
    apply: bool = False,
    block_rows: int | None = None,
    block_cols: int | None = None,
    finite: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Phase 2 of the fused step on ``(rows, cols)`` arrays: (update or new weight, new momentum).

    Args:
      g: the gradient, ``(rows, cols)``.
      w: the weight; read only if ``decay`` or ``apply`` (may be ``None`` otherwise).
      scale: AGC's per-column scale, ``(1, cols)``.
      m: the momentum, or ``None`` without momentum.
      neg_lr: minus the learning rate, a scalar.
      elementwise: the optimizer's elementwise step (see :data:`Elementwise`), with Python-number
        hyperparameters bound.
      decay: whether this leaf gets weight decay (``w`` is passed to ``elementwise``).
      apply: return the new weight ``w + update`` (as ``optax.apply_updates``, in ``w``'s buffer)
        instead of the update, which saves writing the update and reading it back.
      block_rows: rows per program; ``None`` picks :func:`default_blocks`.
      block_cols: columns per program; ``None`` picks :func:`default_blocks`.
      finite: the divergence guard's bool scalar (``skip_nonfinite``), passed to ``elementwise``
        as its ``finite``; ``None`` without a guard.
    """
    num_rows, num_cols = g.shape
    platform, block_rows, block_cols = _blocks(g.shape, 2, block_rows, block_cols)
    read_w = decay or apply
    if read_w and w is None:
        raise ValueError("fused_update needs `w` with weight decay or apply=True.")
    neg_lr = jnp.reshape(jnp.asarray(neg_lr, jnp.float32), (1, 1))

    def spec(x):
        return None if x is None else jax.ShapeDtypeStruct((1, 1), x.dtype)

    # Output dtypes are whatever the elementwise step gives in the XLA path (a bf16 momentum
    # buffer stays bf16, the update takes g's dtype).
    u_aval, m_aval = jax.eval_shape(
        elementwise, spec(g), spec(w) if decay else None, spec(scale), spec(m), neg_lr
    )
    grid = (pl.cdiv(num_rows, block_rows), pl.cdiv(num_cols, block_cols))
    tile = pl.BlockSpec((block_rows, block_cols), lambda i, j: (i, j))
    row = pl.BlockSpec((1, block_cols), lambda i, j: (0, j))
    scalar = pl.BlockSpec((1, 1), lambda i, j: (0, 0))
    arrays = [g] + ([w] if read_w else []) + ([] if m is None else [m])
    inputs = arrays + [scale, neg_lr]
    in_specs = [tile] * len(arrays) + [row, scalar]
    if finite is not None:
        inputs.append(jnp.reshape(jnp.asarray(finite, jnp.float32), (1, 1)))
        in_specs.append(scalar)
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
        _update_kernel,
        elementwise=elementwise,
        read_w=read_w,
        decay=decay,
        has_m=m is not None,
        apply=apply,
        guarded=finite is not None,
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


# --------------------------------------------------------------------------- the driver's leaves


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)


def _as_2d(x: jax.Array) -> jax.Array:
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def leaf_functions(
    xla_leaf: Callable[..., tuple[jax.Array, jax.Array | None]],
    elementwise: Elementwise,
    neg_lr: Any,
    *,
    scalars: tuple[Any, ...],
    decay: bool,
    apply: bool,
    min_size: int | None = None,
) -> tuple[Callable, Callable]:
    """``(unit_norms, leaf_fn)`` for the AGC driver: the kernels on eligible leaves, else XLA.

    Args:
      xla_leaf: the optimizer's own leaf function ``(row, g, w, scale, m, finite=None) -> (out,
        new m)``, used for every leaf the kernel cannot take.
      elementwise: the optimizer's elementwise step, run inside the kernel.
      neg_lr: minus this step's learning rate.
      scalars: hyperparameters baked into ``elementwise``; unless all are Python numbers (whose
        dtype promotion the kernel reproduces), every leaf takes the XLA path.
      decay: whether weight decay is on at all (each leaf's ``row.weight_decay`` also applies).
      apply: write new weights instead of updates (see :func:`fused_update`).
      min_size: smallest leaf for the kernel; ``None`` means :data:`agc_optax.kernels.MIN_SIZE`.
    """
    kernel_ok = all(_is_number(x) for x in scalars)

    def takes_kernel(row, g, w, m) -> bool:
        return kernel_ok and eligible(row, g, w, m, min_size)

    def unit_norms(row, g, w, m):
        if not takes_kernel(row, g, w, m):
            return powered_unit_norms(g, row.unit_axes), powered_unit_norms(w, row.unit_axes)
        gsq, wsq = column_sums_of_squares(_as_2d(g), _as_2d(w))
        keepdims = (1,) * (g.ndim - 1) + (g.shape[-1],)
        return gsq.reshape(keepdims), wsq.reshape(keepdims)

    def leaf_fn(row, g, w, scale, m, finite=None):
        if scale is None or not takes_kernel(row, g, w, m):
            return xla_leaf(row, g, w, scale, m, finite=finite)
        out, m_next = fused_update(
            _as_2d(g),
            _as_2d(w),
            scale.reshape(1, g.shape[-1]),
            None if m is None else _as_2d(m),
            neg_lr,
            elementwise=elementwise,
            decay=decay and row.weight_decay,
            apply=apply,
            finite=finite,
        )
        return out.reshape(g.shape), None if m_next is None else m_next.reshape(g.shape)

    return unit_norms, leaf_fn

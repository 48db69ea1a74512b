"""Convolutions whose gradients stay on XLA:CPU's fast path inside loops (``scan_blocks``).

XLA:CPU runs a convolution fast (Eigen / its YNNPACK fusions) only in the *canonical* form: input
``N{spatial}C``, kernel ``{spatial}IO``, output ``N{spatial}C``. The gradients JAX derives for a
canonical convolution are not canonical: the input gradient reads the kernel as ``{spatial}OI``
(``dim_labels=b01f_01oi->b01f``) and the weight gradient contracts over the batch
(``f01b_i01o->01bf``; with feature groups a 5-D dilated convolution). XLA:CPU's
``ConvCanonicalization`` pass rewrites such convolutions with transposes around a canonical one,
but it walks only the entry computation (``xla/service/cpu/conv_canonicalization.cc``), so in the
body of a ``while`` loop, which is what ``jax.lax.scan`` / ``nnx.scan`` compile to, they stay
as generic convolutions: the scanned NFNet stage-3 blocks' backward ran 3.6x slower than the same
blocks unrolled (``benchmarks/RESULTS.md``, "scan_blocks").

`conv_canonical_grads` computes the same convolution, with a custom VJP that writes both gradients
as canonical convolutions with explicit transposes, so that the loop body needs no
canonicalization. The rule is used when the program is traced with CPU as the default backend
(``jax.default_backend()``); other backends get JAX's own gradient, whose layouts their compilers
assign freely. (Not ``jax.lax.platform_dependent``: it traces, differentiates and lowers both
branches of every conv, 0.45 s of the NF-ResNet-50 trainer's step. A program traced on CPU and
lowered for another backend keeps the CPU rule, which computes the same gradients.) Being a
``jax.custom_vjp``, the rule supports reverse mode (``jax.grad``, also nested) but not forward
mode (``jax.jvp``, ``jax.jacfwd``).

Outside loops it helps too: XLA:CPU turns JAX's grouped weight gradient into a 3-D convolution
(``b012f_012io->b012f``), slower than the grouped 2-D one written here. Strided convolutions get
the same rule, with ``dy`` dilated by the strides (``lhs_dilation`` for the input gradient,
``rhs_dilation`` for the weight gradient); alone, the gradient of an NFNet-F0 transition's
grouped strided 3x3 conv took 0.28-0.53x the time of JAX's, an ungrouped one the same time.
An ungrouped conv with a 1x1 kernel takes both gradients from matrix products instead
(``dw``: the input positions it reads times ``dy``, contracted over batch and space; ``dx``:
``dy @ w.T`` put back at those positions): the convolution form of its weight gradient, even
canonicalized, first copied ``x`` and ``dy`` into batch-innermost transposes, and took 1.6-2.9x
the time of the products for NF-ResNet-50's shapes. With every conv a `CanonicalGradWSConv`,
NFNet-F0's unrolled train step (batch 8, 128 px) took 0.45-0.49x the time (0.51-0.66x with the
strided convs left to JAX's rule); NF-ResNet-50's (batch 16, 128 px) 0.75-0.82x, all of it from
the 1x1 rule; ECA-NFNet-L0's bare step 0.41x and NF-RegNet-B0's (8-channel groups) 0.034x
(benchmarks/RESULTS.md, "canonical_conv_grads" and "1x1 convs"). The model families build all
their convs this way with ``canonical_conv_grads=True`` (`wsconv_class`), which ``agc-train``
sets; by default only the stacked blocks of ``scan_blocks=True`` do, and unrolled models keep
`WSConv`, whose gradients allow forward mode too.

Forward mode applied to these convs on CPU (``jax.jvp``, ``jax.jacfwd``) raises ``TypeError``:
`FORWARD_MODE_ERROR` when the jvp meets the conv eagerly, JAX's own "can't apply forward-mode
autodiff (jvp) to a custom_vjp function." when it meets it inside a ``jax.jit`` or a scan.
Forward over reverse (``jax.hessian``, ``jax.jacfwd(jax.grad(f))``) works: it differentiates the
plain JAX operations of the custom rule.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agc_optax.models.layers import WSConv

__all__ = ["CanonicalGradWSConv", "conv_canonical_grads", "wsconv_class"]

Array = jax.Array

#: The ``TypeError`` forward-mode differentiation of `conv_canonical_grads` raises when the jvp
#: meets it eagerly; inside ``jax.jit`` or a scan JAX raises its own "can't apply forward-mode
#: autodiff (jvp) to a custom_vjp function." when the program is lowered (its traceback's
#: "before transformation" part points into this module).
FORWARD_MODE_ERROR = (
    "conv_canonical_grads (the convs of a model built with canonical_conv_grads=True, or of its "
    "scan_blocks=True stacks) supports reverse-mode differentiation only (jax.grad, jax.vjp); "
    "for forward mode (jax.jvp, jax.jacfwd, jax.hessian) build the model with "
    "canonical_conv_grads=False and scan_blocks=False"
)
_SPATIAL = "DHW"


def _dimension_numbers(rank: int) -> tuple[str, str, str]:
    sp = _SPATIAL[-rank:]
    return (f"N{sp}C", f"{sp}IO", f"N{sp}C")


def _explicit_padding(
    padding: str | Sequence[tuple[int, int]],
    in_size: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """``(low, high)`` per spatial axis, as ``conv_general_dilated`` resolves ``padding``."""
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(tuple(in_size), tuple(kernel_shape), tuple(strides), padding)
        return tuple((int(lo), int(hi)) for lo, hi in pads)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _plain_conv(x, w, strides, padding, groups, precision, lhs_dilation=None, rhs_dilation=None):
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_dimension_numbers(w.ndim - 2),
        feature_group_count=groups,
        precision=precision,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _canonical_conv(x, w, strides, padding, groups, precision):
    return _plain_conv(x, w, strides, padding, groups, precision)


def _canonical_conv_fwd(x, w, strides, padding, groups, precision):
    return _plain_conv(x, w, strides, padding, groups, precision), (x, w)


def _pointwise_conv_grads(x, w, dy, strides, padding, precision):
    """(dx, dw) of an ungrouped conv with a 1x1 kernel, as two matrix products.

    Such a conv is ``y[j] = x_padded[stride * j] @ w`` per output position ``j``: ``dw`` is the
    product of the read input positions and ``dy`` over batch and space, ``dx`` is ``dy @ w.T``
    put back at the read positions (zeros between them, the padding cropped). XLA:CPU runs both
    as plain GEMMs, where the convolution form of these gradients transposed the activations
    and ``dy`` into batch-innermost layouts first (1.6-2.9x slower for NF-ResNet-50's 1x1 convs).
    The products still transpose their left operand, so ``dw`` puts there whichever of ``x``
    and ``dy`` makes that transpose (plus, for ``dy``, the result's) smaller.
    """
    rank = w.ndim - 2
    out_size = dy.shape[1:-1]
    x_pad = jax.lax.pad(
        x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0))
    )
    reads = jax.lax.slice(
        x_pad,
        (0,) * (rank + 2),
        (
            x.shape[0],
            *(s * (o - 1) + 1 for s, o in zip(strides, out_size, strict=True)),
            x.shape[-1],
        ),
        (1, *strides, 1),
    )
    batch_and_space = tuple(range(rank + 1))
    contract = ((batch_and_space, batch_and_space), ((), ()))
    # XLA:CPU copies the left operand into a contraction-innermost transpose: dy goes left
    # (and the small (out, in) product is transposed) where that moves fewer entries than x,
    # as in a bottleneck's 256 -> 64 conv at 32 x 32. NF-ResNet-50's train step: 0.93x the
    # time of x always on the left; F0's 0.97x (benchmarks/RESULTS.md).
    positions, c_in, c_out = math.prod(dy.shape[:-1]), x.shape[-1], dy.shape[-1]
    if c_out * (positions + c_in) < positions * c_in:
        dw = jax.lax.dot_general(dy, reads, contract, precision=precision).T
    else:
        dw = jax.lax.dot_general(reads, dy, contract, precision=precision)
    dx_read = jax.lax.dot_general(
        dy, w.reshape(w.shape[-2:]), (((rank + 1,), (1,)), ((), ())), precision=precision
    )
    # Stride - 1 zeros between the read positions, zeros after the last one up to the padded
    # input's end, and the padding cut off both ends: (-lo, size_padded - 1 - last - hi, s - 1).
    tails = (
        (-lo, size + lo - 1 - s * (o - 1), s - 1)
        for (lo, _), size, s, o in zip(padding, x.shape[1:-1], strides, out_size, strict=True)
    )
    dx = jax.lax.pad(dx_read, jnp.zeros((), dx_read.dtype), ((0, 0, 0), *tails, (0, 0, 0)))
    return dx, dw.reshape(w.shape)


def _canonical_conv_bwd(strides, padding, groups, precision, residuals, dy):
    x, w = residuals
    rank = w.ndim - 2
    if groups == 1 and all(k == 1 for k in w.shape[:-2]):
        dx, dw = _pointwise_conv_grads(x, w, dy, strides, padding, precision)
        return dx.astype(x.dtype), dw.astype(w.dtype)
    spatial = tuple(range(rank))
    *kernel, in_per_group, out = w.shape
    out_per_group = out // groups
    n, *size, _ = x.shape
    out_size = dy.shape[1:-1]
    ones = (1,) * rank
    # With strides, dy enters both gradients dilated by them (zeros between its entries, which
    # XLA folds into the convolution's dilation); with stride 1 the programs are undilated.
    dilation = tuple(strides) if any(s != 1 for s in strides) else None
    axes = zip(kernel, size, out_size, strides, padding, strict=True)
    # Input gradient: the correlation of dilated dy with the spatially flipped kernel whose input
    # and output channels are swapped within each group, in HWIO order.
    w_t = jnp.flip(w, spatial).reshape(*kernel, in_per_group, groups, out_per_group)
    w_t = w_t.transpose(*spatial, rank + 2, rank + 1, rank)
    w_t = w_t.reshape(*kernel, out_per_group, groups * in_per_group)
    # Low: k - 1 - lo; high: what makes the output the input's size (k - 1 - hi for stride 1).
    pads_t, pads_w = [], []
    for k, size_i, out_i, stride, (lo, _) in axes:
        span = stride * (out_i - 1)  # input positions between the first and last window
        pads_t.append((k - 1 - lo, size_i - 1 + lo - span))
        pads_w.append((lo, k + span - size_i - lo))  # negative: rows no window reads
    dx = _plain_conv(dy, w_t, ones, tuple(pads_t), groups, precision, lhs_dilation=dilation)
    # Weight gradient: the input channels play the batch and the images the features, so the
    # "batch" of images is contracted as canonical input features (grouped like the kernel),
    # and dilated dy is the kernel.
    x_t = x.reshape(n, *size, groups, in_per_group)
    x_t = x_t.transpose(rank + 2, *(a + 1 for a in spatial), rank + 1, 0)
    x_t = x_t.reshape(in_per_group, *size, groups * n)
    dy_t = dy.transpose(*(a + 1 for a in spatial), 0, rank + 1)
    dw = _plain_conv(x_t, dy_t, ones, tuple(pads_w), groups, precision, rhs_dilation=dilation)
    # dw: (in_per_group, *kernel, out)
    return dx.astype(x.dtype), dw.transpose(*(a + 1 for a in spatial), 0, rank + 1).astype(w.dtype)


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def conv_canonical_grads(
    x: Array,
    w: Array,
    *,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    feature_group_count: int = 1,
    precision: Any = None,
) -> Array:
    """A channels-last convolution whose gradients are canonical on CPU.

    The value equals ``jax.lax.conv_general_dilated(x, w, strides, padding,
    dimension_numbers=("N...C", "...IO", "N...C"), feature_group_count=...)``; traced on CPU
    (``jax.default_backend()``), the gradients are computed as canonical convolutions (see the
    module docstring; with strides, of ``dy`` dilated by them), elsewhere by JAX's own rule.

    Args:
      x: input ``(N, *spatial, C_in)`` with 1 to 3 spatial axes.
      w: kernel ``(*kernel_size, C_in // groups, C_out)``.
      strides: window strides, one int for every spatial axis or one per axis.
      padding: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"`` or ``(low, high)`` per spatial axis.
      feature_group_count: number of groups.
      precision: passed to ``jax.lax.conv_general_dilated``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x, w = jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 2, 6))
      >>> f = lambda x, w: conv_canonical_grads(x, w, feature_group_count=2).sum()
      >>> g = lambda x, w: jax.lax.conv_general_dilated(
      ...     x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      ...     feature_group_count=2).sum()
      >>> all(bool(jnp.allclose(a, b)) for a, b in zip(jax.grad(f, (0, 1))(x, w),
      ...                                              jax.grad(g, (0, 1))(x, w)))
      True
    """
    rank = w.ndim - 2
    strides = (int(strides),) * rank if isinstance(strides, int) else tuple(map(int, strides))
    pads = _explicit_padding(padding, x.shape[1:-1], w.shape[:-2], strides)
    args = (strides, pads, int(feature_group_count), precision)
    if jax.default_backend() != "cpu":
        return _plain_conv(x, w, *args)
    try:
        return _canonical_conv(x, w, *args)
    except TypeError as e:
        if "forward-mode" not in str(e):
            raise
        raise TypeError(FORWARD_MODE_ERROR) from e


class CanonicalGradWSConv(WSConv):
    """`WSConv` (same parameters, same outputs) whose convolutions take their gradients from
    `conv_canonical_grads`: the conv of the blocks that ``scan_blocks`` runs in a loop, and of
    every layer with ``canonical_conv_grads=True``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> conv = CanonicalGradWSConv(8, 16, 3, feature_group_count=2, rngs=nnx.Rngs(0))
      >>> conv(jnp.ones((1, 9, 9, 8))).shape
      (1, 9, 9, 16)
    """

    def __call__(self, x: Array) -> Array:
        rank = len(self.kernel_size)
        if x.ndim != rank + 2 or x.shape[-1] != self.in_features:
            return super().__call__(x)  # Its error message names the expected shape.
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        w_hat = self.standardized_kernel().astype(dtype)
        y = conv_canonical_grads(
            x.astype(dtype),
            w_hat,
            strides=self.strides,
            padding=self.padding,
            feature_group_count=self.feature_group_count,
            precision=self.precision,
        )
        return y + self.bias[...].astype(dtype)


def wsconv_class(canonical_conv_grads: bool) -> type[WSConv]:
    """The conv class of a model built with ``canonical_conv_grads`` (the families' option).

    What the option changes: `CanonicalGradWSConv` has `WSConv`'s parameters, names, outputs and
    weight loading, but on CPU its gradients (of strided and grouped convs too) are written as
    canonical convolutions, and those of ungrouped 1x1 convs as matrix products, which XLA:CPU
    runs faster (each family's docstring gives its measured step; ``benchmarks/RESULTS.md``).
    Programs for other backends are unchanged. The cost, on CPU: reverse-mode differentiation
    only (``jax.grad``, ``jax.vjp``, ``jax.hessian``); ``jax.jvp`` or ``jax.jacfwd`` of the model
    raise ``TypeError`` ("... supports reverse-mode differentiation only ...", or under
    ``jax.jit`` JAX's "can't apply forward-mode autodiff (jvp) to a custom_vjp function.").
    ``agc-train`` turns the option on for training (``--model-arg canonical_conv_grads=false``
    keeps the default); a CPU training loop of your own wants it on.

    Args:
      canonical_conv_grads: True for `CanonicalGradWSConv`, False for `WSConv`.

    Raises:
      ValueError: naming ``canonical_conv_grads`` for any other value.

    Example:
      >>> wsconv_class(True).__name__, wsconv_class(False).__name__
      ('CanonicalGradWSConv', 'WSConv')
    """
    flag = canonical_conv_grads
    if not isinstance(flag, bool | np.bool_):
        raise ValueError(
            f"`canonical_conv_grads`: expected True or False, got {canonical_conv_grads!r} "
            f"({type(canonical_conv_grads).__name__})"
        )
    return CanonicalGradWSConv if flag else WSConv

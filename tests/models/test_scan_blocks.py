"""NFNet's ``scan_blocks``: the CPU-friendly gradient convolutions, the scanned stack's gradients
against the same blocks unrolled, and ``"auto"``."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agc_optax.models import WSConv, conv_canonical_grads, create_model
from agc_optax.models.canonical_conv import CanonicalGradWSConv
from agc_optax.models.layers import (
    SCAN_BLOCKS_AUTO,
    residual_run,
    resolve_scan_blocks,
    scaled_activation,
)
from agc_optax.models.nfnet import SCANNED_UNIT_AXES, NFBlock
from agc_optax.training.config import parse_model_args


def _conv_and_grads_float64(x, w, dy, pads, groups, strides=(1, 1)):
    """``y = conv(x, w)`` and the gradients of ``sum(y * dy)``, by explicit window sums:
    ``y[j] = sum_a x_padded[stride * j + a] w[a]`` per spatial axis."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    kh, kw, in_g, out = w.shape
    out_g = out // groups
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    n, oh, ow = dy.shape[0], dy.shape[1], dy.shape[2]
    sh, sw = strides
    y = np.zeros((n, oh, ow, out))
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for g in range(groups):
        ci, co = slice(g * in_g, (g + 1) * in_g), slice(g * out_g, (g + 1) * out_g)
        for a in range(kh):
            for b in range(kw):
                rows = slice(a, a + sh * (oh - 1) + 1, sh)
                cols = slice(b, b + sw * (ow - 1) + 1, sw)
                window = xp[:, rows, cols, ci]
                y[..., co] += window @ w[a, b, :, co]
                dw[a, b, :, co] = np.einsum("nhwi,nhwo->io", window, dy[..., co])
                dxp[:, rows, cols, ci] += dy[..., co] @ w[a, b, :, co].T
    dx = dxp[:, pads[0][0] : pads[0][0] + x.shape[1], pads[1][0] : pads[1][0] + x.shape[2]]
    return y, dx, dw


# The input is 5 x 6: with strides, SAME pads unevenly and VALID leaves rows no window reads.
@pytest.mark.parametrize(
    ("kernel", "groups", "padding", "pads", "strides"),
    [
        (3, 3, "SAME", ((1, 1), (1, 1)), (1, 1)),
        (1, 1, "SAME", ((0, 0), (0, 0)), (1, 1)),
        (2, 2, "SAME", ((0, 1), (0, 1)), (1, 1)),  # Even kernel: the odd pad goes at the end.
        (3, 1, "VALID", ((0, 0), (0, 0)), (1, 1)),
        (3, 2, ((2, 0), (1, 2)), ((2, 0), (1, 2)), (1, 1)),
        (3, 2, "SAME", ((1, 1), (0, 1)), (2, 2)),  # An F0 transition: grouped, strided.
        (3, 1, "VALID", ((0, 0), (0, 0)), (2, 2)),  # The last column is read by no window.
        (1, 2, "SAME", ((0, 0), (0, 0)), (2, 1)),
        # Ungrouped 1x1 kernels take their gradients from matrix products.
        (1, 1, "VALID", ((0, 0), (0, 0)), (2, 2)),  # Rows 1 and 3 are read by no window.
        (1, 1, ((1, 0), (0, 2)), ((1, 0), (0, 2)), (2, 3)),  # Padding read, then cropped.
        (1, 1, "SAME", ((0, 0), (0, 0)), (3, 1)),
        (3, 3, ((1, 1), (2, 0)), ((1, 1), (2, 0)), (3, 2)),
    ],
)
def test_canonical_grads_match_float64_window_sums(kernel, groups, padding, pads, strides):
    rng = np.random.default_rng(kernel * 10 + groups)
    x = rng.standard_normal((2, 5, 6, 4 * groups)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, 4, 3 * groups)).astype(np.float32)
    oh = (5 + sum(pads[0]) - kernel) // strides[0] + 1
    ow = (6 + sum(pads[1]) - kernel) // strides[1] + 1
    dy = rng.standard_normal((2, oh, ow, w.shape[-1])).astype(np.float32)

    def f(x, w):
        return conv_canonical_grads(
            x, w, strides=strides, padding=padding, feature_group_count=groups
        )

    y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    want_y, want_dx, want_dw = _conv_and_grads_float64(x, w, dy, pads, groups, strides)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("x_shape", "strides", "c_out", "dtype", "tol"),
    [
        ((2, 7, 5), (2,), 3, jnp.float32, 1e-5),  # 1-D
        ((2, 5, 4, 6, 5), (2, 1, 3), 3, jnp.float32, 1e-5),  # 3-D
        ((2, 6, 5, 5), (2, 2), 3, jnp.bfloat16, 2e-2),
        # Wider out than in: dw multiplies with x on the left (above: dy on the left).
        ((2, 6, 5, 5), (1, 2), 8, jnp.float32, 1e-5),
        ((1, 2, 2, 5), (1, 1), 4, jnp.float32, 1e-5),  # 4 x (4 + 5) > 4 x 5: x on the left
    ],
)
def test_pointwise_conv_grads_equal_jax_in_any_rank_and_dtype(x_shape, strides, c_out, dtype, tol):
    """The 1x1 rule for 1 to 3 spatial axes and in bfloat16: JAX's own gradients, in x's dtype."""
    rank = len(x_shape) - 2
    rng = np.random.default_rng(rank)
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    w = jnp.asarray(rng.standard_normal((1,) * rank + (5, c_out)), dtype)
    sp = "DHW"[-rank:]

    def plain(x, w):
        dn = (f"N{sp}C", f"{sp}IO", f"N{sp}C")
        return jax.lax.conv_general_dilated(x, w, strides, "SAME", dimension_numbers=dn)

    def ours(x, w):
        return conv_canonical_grads(x, w, strides=strides)

    y, vjp = jax.vjp(ours, x, w)
    want_y, want_vjp = jax.vjp(plain, x, w)
    dy = jnp.asarray(rng.standard_normal(y.shape), dtype)
    for got, want in zip((y, *vjp(dy)), (want_y, *want_vjp(dy)), strict=True):
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
        )


def test_pointwise_conv_gradients_are_matrix_products_on_cpu():
    """An ungrouped 1x1 conv's gradients compile to matrix products, with no convolution (whose
    weight gradient XLA:CPU ran on transposed copies of x and dy); a 3x3 one keeps its
    convolutions."""
    x, dy = jnp.ones((2, 8, 8, 16)), jnp.ones((2, 4, 4, 32))

    def backward_hlo(kernel):
        w = jnp.ones((kernel, kernel, 16, 32))

        def vjp(x, w, dy):
            return jax.vjp(lambda x, w: conv_canonical_grads(x, w, strides=2), x, w)[1](dy)

        return jax.jit(vjp).lower(x, w, dy).compile().as_text()

    pointwise, spatial = backward_hlo(1), backward_hlo(3)
    assert "convolution(" not in pointwise and " dot(" in pointwise
    assert "convolution(" in spatial


def test_gradient_convolutions_in_a_scan_are_canonical_on_cpu():
    """The cause of the slow scanned step: XLA:CPU canonicalizes convolutions only outside loops.
    JAX's own gradients of a grouped conv in a scan body are non-canonical; ours are not."""
    x = jnp.ones((2, 6, 6, 8))
    kernels = jnp.ones((3, 3, 3, 4, 8)) * 0.01  # Three layers of a 2-group 3x3 conv.

    def plain(h, w):
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(
            h, w, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2
        )

    def ours(h, w):
        return conv_canonical_grads(h, w, feature_group_count=2)

    def labels(conv):
        def loss(x, ws):
            return jnp.sum(jax.lax.scan(lambda h, w: (conv(h, w), None), x, ws)[0] ** 2)

        hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, kernels).compile().as_text()
        return set(re.findall(r"dim_labels=([^,\s]+)", hlo))

    assert labels(plain) - {"b01f_01io->b01f"}  # The slow forms this fixes.
    assert labels(ours) == {"b01f_01io->b01f"}


def test_forward_mode_is_a_clear_error_and_forward_over_reverse_works():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 5, 5, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 6)), jnp.float32)

    def ours(w):
        return jnp.sum(conv_canonical_grads(x, w, feature_group_count=2) ** 2)

    def plain(w):
        dn = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn,
                                         feature_group_count=2)  # fmt: skip
        return jnp.sum(y**2)

    with pytest.raises(TypeError, match="supports reverse-mode differentiation only"):
        jax.jvp(ours, (w,), (w,))
    # Met inside a jit, the jvp raises JAX's own message (the docstrings quote it).
    with pytest.raises(TypeError, match=r"forward-mode autodiff \(jvp\) to a custom_vjp"):
        jax.jvp(jax.jit(ours), (w,), (w,))
    # Forward over reverse differentiates the rule's plain operations: the Hessian is exact.
    hessians = [np.asarray(jax.jit(jax.hessian(f))(w)) for f in (ours, plain)]
    np.testing.assert_allclose(hessians[0], hessians[1], rtol=1e-5, atol=1e-4)


def test_traced_for_another_backend_the_conv_keeps_jaxs_own_rule(monkeypatch):
    # The rule is picked when the program is traced, from the default backend.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 6)), jnp.float32)

    def loss(x, w):
        return jnp.sum(conv_canonical_grads(x, w, strides=2, feature_group_count=2) ** 2)

    def traced(backend):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        fresh = lambda x, w: loss(x, w)  # noqa: E731 (a new function: JAX caches traces)
        return str(jax.make_jaxpr(fresh)(x, w)), str(jax.make_jaxpr(jax.grad(fresh, 1))(x, w))

    cpu, tpu = traced("cpu"), traced("tpu")
    assert "custom_vjp_call" in cpu[0] and "custom_vjp_call" not in tpu[0]
    assert tpu[1] == str(jax.make_jaxpr(jax.grad(_plain_loss, 1))(x, w))
    assert cpu[1] != tpu[1]
    # ... where forward mode works, as for the plain model.
    tangent = jax.jvp(lambda w: loss(x, w), (w,), (w,))[1]
    want = jax.jvp(lambda w: _plain_loss(x, w), (w,), (w,))[1]
    np.testing.assert_allclose(tangent, want, rtol=1e-6)


def _plain_loss(x, w):
    dn = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dn,
                                     feature_group_count=2)  # fmt: skip
    return jnp.sum(y**2)


def _filled(module_fn, seed):
    """A module built under eval_shape, its parameters filled with NumPy normals (non-zero
    skip gains, so that every branch counts)."""
    model = nnx.eval_shape(module_fn)
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for _, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        var.set_value(jnp.asarray(0.5 * rng.standard_normal(shape), jnp.float32))
    nnx.update(model, state)
    return model


def test_scanned_stack_gradients_equal_unrolled_blocks():
    common = dict(expansion=0.5, group_size=2, alpha=0.2, activation=scaled_activation("gelu"))
    betas = (0.9, 0.7)
    stack = _filled(
        lambda: residual_run(
            functools.partial(NFBlock, 8, 8, **common),
            betas,
            (0.0, 0.0),
            scan=True,
            rngs=nnx.Rngs(0),
            stacked_kwargs={"conv": CanonicalGradWSConv},  # as NFNet(scan_blocks=True) builds it
        )[0],
        seed=1,
    )
    assert stack.block.conv1.kernel.shape == (2, 3, 3, 2, 4)  # 2 groups of 2 channels, stacked.
    blocks = nnx.eval_shape(
        lambda: nnx.List([NFBlock(8, 8, beta=b, rngs=nnx.Rngs(0), **common) for b in betas])
    )
    stacked = nnx.to_flat_state(nnx.state(stack, nnx.Param))
    for layer, block in enumerate(blocks):
        state = nnx.state(block, nnx.Param)
        for (path, var), (spath, svar) in zip(nnx.to_flat_state(state), stacked, strict=True):
            assert path == spath[1:]  # Same leaves, minus the stack's `block` prefix.
            var.set_value(svar.get_value()[layer])
        nnx.update(block, state)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))

    def unrolled(blocks, x):
        res_vars = []
        for block in blocks:
            x, res_var = block(x)
            res_vars.append(res_var)
        return jnp.sum(jnp.sin(x)) + jnp.sum(jnp.stack(res_vars))

    def scanned(stack, x):
        out, res_vars, metrics = stack(x, return_metrics=False)
        assert metrics == {}  # Not computed in the loop unless asked for.
        return jnp.sum(jnp.sin(out)) + jnp.sum(res_vars)

    def loss_and_grads(loss, module):
        graph, params = nnx.split(module)
        pure = jax.value_and_grad(lambda p, x: loss(nnx.merge(graph, p), x), argnums=(0, 1))
        value, (grads, dx) = jax.jit(pure)(params, x)
        return value, {path: v.get_value() for path, v in nnx.to_flat_state(grads)}, dx

    want_loss, want, want_dx = loss_and_grads(unrolled, blocks)
    got_loss, got, got_dx = loss_and_grads(scanned, stack)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_dx), np.asarray(want_dx), rtol=1e-4, atol=1e-5)
    assert len(got) * len(betas) == len(want)
    for path, grad in got.items():
        for layer in range(len(betas)):
            np.testing.assert_allclose(
                np.asarray(grad[layer]),
                np.asarray(want[(layer, *path[1:])]),
                rtol=1e-4,
                atol=1e-5,
                err_msg=f"{path} layer {layer}",
            )


def test_auto_resolves_per_backend_and_follows_into_the_unit_rules():
    assert resolve_scan_blocks("auto", backend="cpu") is SCAN_BLOCKS_AUTO["cpu"] is False
    assert resolve_scan_blocks("auto", backend="tpu") is True
    assert resolve_scan_blocks("auto", backend="gpu") is True
    assert resolve_scan_blocks("auto", backend="metal") is False  # Unknown: unrolled.
    assert resolve_scan_blocks(np.bool_(True)) is True
    # From the command line (`--model-arg scan_blocks=auto`) through the registry, on this CPU.
    kwargs = parse_model_args(["scan_blocks=auto"])
    model = nnx.eval_shape(lambda: create_model("nfnet_f0", 10, rngs=nnx.Rngs(0), **kwargs))
    assert jax.default_backend() == "cpu" and model.scan_blocks is False
    assert model.agc_unit_axes is None
    scanned = nnx.eval_shape(
        lambda: create_model("nfnet_f0", 10, rngs=nnx.Rngs(0), scan_blocks=True)
    )
    assert scanned.scan_blocks is True and scanned.agc_unit_axes is SCANNED_UNIT_AXES


@pytest.mark.parametrize("bad", ["yes", "Auto", 1, None, 0.0])
def test_bad_scan_blocks_values_name_the_argument(bad):
    with pytest.raises(ValueError, match=r'`scan_blocks`: expected True, False or "auto"'):
        resolve_scan_blocks(bad)
    with pytest.raises(ValueError, match="`scan_blocks`"):
        nnx.eval_shape(lambda: create_model("nfnet_f0", 10, rngs=nnx.Rngs(0), scan_blocks=bad))


def test_canonical_conv_grads_from_the_command_line_builds_every_conv_canonical():
    """``--model-arg canonical_conv_grads=true`` (read as True) through the registry:
    NFNet's stem, transitions (strided, projections), blocks and final conv, with the default
    model's parameter leaves."""
    kwargs = parse_model_args(["canonical_conv_grads=true", "depths=(1,2,1,1)"])
    assert kwargs["canonical_conv_grads"] is True
    model = nnx.eval_shape(lambda: create_model("nfnet_f0", 10, rngs=nnx.Rngs(0), **kwargs))
    plain = nnx.eval_shape(
        lambda: create_model("nfnet_f0", 10, rngs=nnx.Rngs(0), depths=(1, 2, 1, 1))
    )
    convs = {path: m for path, m in nnx.iter_graph(model) if isinstance(m, WSConv)}
    assert model.canonical_conv_grads is True and plain.canonical_conv_grads is False
    assert {type(m) for m in convs.values()} == {CanonicalGradWSConv}
    assert {("stem", "conv0"), ("blocks", 1, "conv1"), ("final_conv",)} <= set(convs)
    assert convs[("blocks", 1, "conv1")].strides == (2, 2)  # strided and grouped
    assert {type(m) for _, m in nnx.iter_graph(plain) if isinstance(m, WSConv)} == {WSConv}
    flat = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    want = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(plain, nnx.Param))}
    assert flat == want
    off = parse_model_args(["canonical_conv_grads=False", "depths=(1,1,1,1)"])
    unset = nnx.eval_shape(lambda: create_model("nfnet_f0", 10, rngs=nnx.Rngs(0), **off))
    assert unset.canonical_conv_grads is False


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_canonical_conv_grads_values_name_the_argument(bad):
    with pytest.raises(ValueError, match=r"`canonical_conv_grads`: expected True or False, got"):
        nnx.eval_shape(
            lambda: create_model("nf_resnet26", 10, rngs=nnx.Rngs(0), canonical_conv_grads=bad)
        )

"""Tests of the shared normalizer-free layers against independent float64 references."""

from __future__ import annotations

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agc_optax.models.layers import (
    GAMMAS,
    EfficientChannelAttention,
    SqueezeExcite,
    StochasticDepth,
    WSConv,
    avg_pool_same,
    estimate_gamma,
    max_pool_same,
    nf_schedule,
    scaled_activation,
    signal_metrics,
)

from .reference import reference_file

# ----------------------------------------------------------------------------- references


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """XLA/TF 'SAME': the odd pad goes at the end."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def np_standardize(w: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """DeepMind's scaled WS in float64, written from the paper's formula."""
    w = w.astype(np.float64)
    axes = tuple(range(w.ndim - 1))
    mean = w.mean(axis=axes, keepdims=True)
    var = w.var(axis=axes, keepdims=True)
    fan_in = math.prod(w.shape[:-1])
    return (w - mean) / np.sqrt(np.maximum(var * fan_in, 1e-4)) * gain.astype(np.float64)


def np_conv(x, w, b, strides, groups):
    """Grouped N-D channels-last convolution with 'SAME' padding, in float64."""
    x = x.astype(np.float64)
    rank = x.ndim - 2
    ks = w.shape[:rank]
    pads = [_same_pads(x.shape[1 + d], ks[d], strides[d]) for d in range(rank)]
    xp = np.pad(x, [(0, 0)] + pads + [(0, 0)])
    out_sizes = [-(-x.shape[1 + d] // strides[d]) for d in range(rank)]
    cin_g = w.shape[-2]
    cout_g = w.shape[-1] // groups
    y = np.zeros((x.shape[0], *out_sizes, w.shape[-1]))
    for offset in itertools.product(*(range(k) for k in ks)):
        sl = tuple(
            slice(offset[d], offset[d] + strides[d] * out_sizes[d], strides[d]) for d in range(rank)
        )
        patch = xp[(slice(None), *sl, slice(None))]
        for g in range(groups):
            xi = patch[..., g * cin_g : (g + 1) * cin_g]
            wi = w[(*offset, slice(None), slice(g * cout_g, (g + 1) * cout_g))]
            y[..., g * cout_g : (g + 1) * cout_g] += xi @ wi
    return y + b


def _randomize(conv: WSConv, seed: int, *, kernel=None) -> None:
    rng = np.random.default_rng(seed)
    if kernel is None:
        kernel = rng.standard_normal(conv.kernel.shape)
    conv.kernel[...] = jnp.asarray(kernel, jnp.float32)
    conv.gain[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(conv.gain.shape), jnp.float32)
    conv.bias[...] = jnp.asarray(rng.standard_normal(conv.bias.shape), jnp.float32)


# ----------------------------------------------------------------------------- WSConv


@pytest.mark.parametrize(
    "in_shape, kernel, stride, groups",
    [
        ((2, 8, 8, 4), 3, 2, 1),  # Even input, stride 2: pads (0, 1), not (1, 1).
        ((2, 7, 9, 4), 3, 2, 2),  # Odd input, grouped.
        ((1, 6, 6, 6), 1, 1, 3),
        ((2, 5, 5, 4), (3, 1), (1, 2), 1),
        ((2, 9, 4), (3,), 2, 2),  # 1D.
        ((1, 5, 4, 6, 4), (3, 3, 3), 2, 2),  # 3D.
    ],
)
def test_wsconv_matches_float64_reference(in_shape, kernel, stride, groups):
    rank = len(in_shape) - 2
    cin, cout = in_shape[-1], 6
    conv = WSConv(cin, cout, kernel, strides=stride, feature_group_count=groups, rngs=nnx.Rngs(0))
    assert conv.kernel.shape[-2:] == (cin // groups, cout)
    assert len(conv.kernel.shape) == rank + 2
    _randomize(conv, 1)
    x = np.random.default_rng(2).standard_normal(in_shape).astype(np.float32)
    strides = (stride,) * rank if isinstance(stride, int) else stride
    w_hat = np_standardize(np.asarray(conv.kernel[...]), np.asarray(conv.gain[...]))
    want = np_conv(x, w_hat, np.asarray(conv.bias[...], np.float64), strides, groups)
    got = conv(jnp.asarray(x))
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(conv.standardized_kernel()), w_hat, atol=1e-6)


def test_wsconv_constant_kernel_uses_the_variance_floor():
    conv = WSConv(3, 2, 3, rngs=nnx.Rngs(0))
    _randomize(conv, 3, kernel=np.full(conv.kernel.shape, 0.7))
    w_hat = np_standardize(np.asarray(conv.kernel[...]), np.asarray(conv.gain[...]))
    np.testing.assert_allclose(np.asarray(conv.standardized_kernel()), w_hat, atol=1e-7)
    assert np.all(np.isfinite(np.asarray(conv.standardized_kernel())))


def test_wsconv_params_and_init():
    conv = WSConv(64, 32, 3, feature_group_count=2, rngs=nnx.Rngs(0))
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(conv, nnx.Param))}
    assert names == {"kernel", "gain", "bias"}
    assert conv.kernel.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(np.asarray(conv.gain[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(conv.bias[...]), 0.0)
    # VarianceScaling(1, fan_in, normal): std 1/sqrt(3*3*32) = 0.0589.
    assert abs(float(jnp.std(conv.kernel[...])) - 1 / math.sqrt(288)) < 0.003


def test_wsconv_bf16_standardizes_in_float32():
    # A kernel with a large common offset: (w - mean) vanishes if computed in bf16.
    rng = np.random.default_rng(4)
    kernel = 100.0 + 0.01 * rng.standard_normal((3, 3, 4, 8))
    conv = WSConv(4, 8, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    _randomize(conv, 5, kernel=kernel)
    x = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
    got = conv(jnp.asarray(x, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    assert conv.kernel.dtype == jnp.float32
    assert conv.standardized_kernel().dtype == jnp.float32
    w_hat = np_standardize(np.asarray(conv.kernel[...]), np.asarray(conv.gain[...]))
    want = np_conv(x, w_hat, np.asarray(conv.bias[...], np.float64), (1, 1), 1)
    err = np.abs(np.asarray(got, np.float32) - want).max()
    assert err < 0.05 * np.abs(want).max(), err


def test_wsconv_user_errors():
    with pytest.raises(ValueError, match="feature_group_count"):
        WSConv(6, 4, 3, feature_group_count=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_bias"):
        WSConv(6, 4, 3, use_bias=False, rngs=nnx.Rngs(0))
    conv = WSConv(6, 4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="6 channels"):
        conv(jnp.zeros((1, 5, 5, 3)))


# ----------------------------------------------------------------------------- gammas


def test_gammas_equal_deepmind_constants():
    published = json.loads(reference_file("gammas.json").read_text())
    assert GAMMAS == published
    assert len(GAMMAS) == 16


@pytest.mark.parametrize("name", sorted(set(GAMMAS) - {"glu", "log_softmax"}))
def test_scaled_activation_is_f_times_gamma(name):
    x = jnp.linspace(-4.0, 4.0, 101)
    base = {
        "gelu": lambda v: jax.nn.gelu(v, approximate=True),
        "tanh": jnp.tanh,
        "identity": lambda v: v,
    }.get(name, getattr(jax.nn, name, None))
    np.testing.assert_allclose(
        np.asarray(scaled_activation(name)(x)), np.asarray(base(x)) * GAMMAS[name], rtol=1e-6
    )


def test_scaled_gelu_is_the_tanh_approximation():
    x = jnp.linspace(-4.0, 4.0, 101)
    tanh_gelu = 0.5 * x * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(
        np.asarray(scaled_activation("gelu")(x)),
        np.asarray(tanh_gelu) * GAMMAS["gelu"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_scaled_activation_keeps_bf16():
    assert scaled_activation("relu")(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_unknown_activation_lists_names():
    with pytest.raises(ValueError, match=r"'swish'.*'gelu'"):
        scaled_activation("swish")


def _elementwise(name):
    return {
        "gelu": lambda v: jax.nn.gelu(v, approximate=True),
        "tanh": jnp.tanh,
        "identity": lambda v: v,
    }.get(name) or getattr(jax.nn, name)


@pytest.mark.parametrize("name", sorted(set(GAMMAS) - {"glu", "log_softmax"}))
def test_estimate_gamma_matches_exact_quadrature(name):
    exact = json.loads(reference_file("gammas_rederived.json").read_text())["summary"][name]
    got = estimate_gamma(_elementwise(name))
    assert abs(got - exact["rederived_quadrature"]) < 2e-3


def test_estimate_gamma_closed_forms():
    assert estimate_gamma(jax.nn.relu) == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), abs=1e-5)
    assert estimate_gamma(jax.nn.selu) == pytest.approx(1.0, abs=1e-4)
    mc = estimate_gamma(jax.nn.relu, method="monte_carlo", key=jax.random.key(0))
    assert mc == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), abs=5e-3)


def test_estimate_gamma_errors():
    with pytest.raises(ValueError, match="key"):
        estimate_gamma(jax.nn.relu, method="monte_carlo")
    with pytest.raises(ValueError, match="method"):
        estimate_gamma(jax.nn.relu, method="simpson")
    with pytest.raises(ValueError, match="variance"):
        estimate_gamma(jnp.zeros_like)


# ----------------------------------------------------------------------------- SE, metrics, pools


def test_squeeze_excite_matches_numpy():
    se = SqueezeExcite(8, 6, se_ratio=0.5, rngs=nnx.Rngs(0))
    assert se.fc0.kernel.shape == (8, 4) and se.fc1.kernel.shape == (4, 6)
    rng = np.random.default_rng(0)
    for lin in (se.fc0, se.fc1):
        lin.bias[...] = jnp.asarray(rng.standard_normal(lin.bias.shape), jnp.float32)
    x = rng.standard_normal((3, 5, 4, 8)).astype(np.float32)
    h = x.astype(np.float64).mean(axis=(1, 2))
    h = np.maximum(h @ np.asarray(se.fc0.kernel[...]) + np.asarray(se.fc0.bias[...]), 0)
    h = h @ np.asarray(se.fc1.kernel[...]) + np.asarray(se.fc1.bias[...])
    want = (1 / (1 + np.exp(-h)))[:, None, None, :]
    got = se(jnp.asarray(x))
    assert got.shape == (3, 1, 1, 6)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    assert SqueezeExcite(3, 3, se_ratio=0.25, rngs=nnx.Rngs(0)).hidden_features == 1
    assert SqueezeExcite(8, 8, hidden_features=5, rngs=nnx.Rngs(0)).hidden_features == 5


def test_signal_metrics_definitions():
    x = np.random.default_rng(1).standard_normal((4, 3, 5, 6)) * np.arange(1, 7) + np.arange(6)
    m = signal_metrics(jnp.asarray(x, jnp.float32), 3)
    assert set(m) == {"avg_sq_mean_3", "avg_var_3"}
    np.testing.assert_allclose(float(m["avg_sq_mean_3"]), np.mean(x.mean((0, 1, 2)) ** 2), 1e-5)
    np.testing.assert_allclose(float(m["avg_var_3"]), np.mean(x.var((0, 1, 2))), 1e-5)


def test_nf_schedule_resets_at_every_stage():
    schedule = nf_schedule((2, 3), alpha=0.5, stochdepth_rate=0.5)
    assert [b.index for b in schedule] == [0, 1, 0, 1, 2]
    # Each block adds alpha^2 = 0.25; the first block of a stage starts again from one.
    np.testing.assert_array_equal([b.variance for b in schedule], [1.25, 1.5, 1.25, 1.5, 1.75])
    # beta is one over the std of the block's input: the previous block's output, or 1.
    np.testing.assert_allclose(
        [b.beta for b in schedule], 1 / np.sqrt([1.0, 1.25, 1.5, 1.25, 1.5]), rtol=1e-15
    )
    np.testing.assert_allclose([b.stochdepth_rate for b in schedule], [0, 0.1, 0.2, 0.3, 0.4])
    assert all(b.stochdepth_rate == 0.0 for b in nf_schedule((2, 3), alpha=0.5))


def test_avg_pool_same_excludes_padding():
    x = np.random.default_rng(2).standard_normal((2, 5, 7, 3))
    got = np.asarray(avg_pool_same(jnp.asarray(x, jnp.float32)))
    want = np.zeros((2, 3, 4, 3))
    for i, j in itertools.product(range(3), range(4)):
        # SAME with window 2, stride 2 on odd sizes pads one cell at the end only.
        want[:, i, j] = x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(axis=(1, 2))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_pools_are_differentiable_under_jit():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 5, 5, 2)), jnp.float32)
    g_avg = jax.jit(jax.grad(lambda v: avg_pool_same(v).sum()))(x)
    # Each input cell feeds one window, with weight 1 / (cells in that window).
    assert float(g_avg[0, 0, 0, 0]) == pytest.approx(0.25)
    assert float(g_avg[0, 4, 4, 0]) == pytest.approx(1.0)
    g_max = jax.jit(jax.grad(lambda v: max_pool_same(v).sum()))(x)
    assert np.all(np.isfinite(np.asarray(g_max))) and float(g_max.sum()) == pytest.approx(18.0)


def test_max_pool_same_pads_with_minus_infinity():
    x = -1.0 - np.random.default_rng(3).random((1, 6, 5, 2))  # All negative.
    got = np.asarray(max_pool_same(jnp.asarray(x, jnp.float32)))
    want = np.zeros((1, 3, 3, 2))
    for i, j in itertools.product(range(3), range(3)):
        lo_i, lo_j = 2 * i - _same_pads(6, 3, 2)[0], 2 * j - _same_pads(5, 3, 2)[0]
        win = x[:, max(lo_i, 0) : lo_i + 3, max(lo_j, 0) : lo_j + 3]
        want[:, i, j] = win.max(axis=(1, 2))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.all(got < 0)


# ----------------------------------------------------------------------------- stochastic depth


class _Holder(nnx.Module):
    def __init__(self, rate):
        self.sd = StochasticDepth(rate, rngs=nnx.Rngs(dropout=0))


def test_stochastic_depth_masks_examples_without_rescaling():
    holder = _Holder(0.5)
    x = jnp.ones((4000, 3, 2))
    y = np.asarray(holder.sd(x))
    per_example = y.reshape(4000, -1)
    assert set(np.unique(per_example)) <= {0.0, 1.0}  # No 1/keep rescale.
    assert np.all(per_example.min(axis=1) == per_example.max(axis=1))  # Whole example.
    assert abs(per_example[:, 0].mean() - 0.5) < 0.03
    # A second call draws a fresh mask.
    assert not np.array_equal(np.asarray(holder.sd(x)), y)


def test_stochastic_depth_follows_train_and_eval():
    holder = _Holder(0.9)
    x = jnp.ones((64, 2))
    holder.eval()
    assert holder.sd.deterministic
    np.testing.assert_array_equal(np.asarray(holder.sd(x)), np.asarray(x))
    holder.train()
    assert not holder.sd.deterministic
    assert float(holder.sd(x).mean()) < 0.5
    view = nnx.view(holder, deterministic=True)
    np.testing.assert_array_equal(np.asarray(view.sd(x)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(_Holder(0.0).sd(x)), np.asarray(x))


def test_stochastic_depth_errors():
    with pytest.raises(ValueError, match="rate"):
        StochasticDepth(1.0)
    with pytest.raises(ValueError, match="rngs"):
        StochasticDepth(0.5)(jnp.ones((2, 2)))


# ----------------------------------------------------------------------------- timm's numerics


@pytest.mark.parametrize("gamma", [1.0, GAMMAS["silu"]])
def test_wsconv_timm_epsilon_matches_float64_formula(gamma):
    """timm's ScaledStdConv2d: (w - mean) / sqrt(var + eps) * gain * gamma / sqrt(fan_in)."""
    conv = WSConv(4, 6, 3, strides=2, feature_group_count=2, epsilon=1e-5, gamma=gamma,
                  rngs=nnx.Rngs(0))  # fmt: skip
    _randomize(conv, 5)
    w = np.asarray(conv.kernel[...], np.float64) * 0.01  # Small: eps matters (var ~ 1e-4).
    conv.kernel[...] = jnp.asarray(w, jnp.float32)
    w = np.asarray(conv.kernel[...], np.float64)
    mean, var = w.mean(axis=(0, 1, 2), keepdims=True), w.var(axis=(0, 1, 2), keepdims=True)
    fan_in = 3 * 3 * 2
    gain = np.asarray(conv.gain[...], np.float64)
    want = (w - mean) / np.sqrt(var + 1e-5) * gain * gamma / math.sqrt(fan_in)
    np.testing.assert_allclose(np.asarray(conv.standardized_kernel()), want, rtol=2e-6, atol=1e-7)
    # And not DeepMind's floor, which differs clearly at this weight scale.
    deepmind = np_standardize(w, gain) * gamma
    assert np.abs(want - deepmind).max() > 1e-2 * np.abs(want).max()
    x = np.random.default_rng(6).standard_normal((2, 7, 7, 4)).astype(np.float32)
    expect = np_conv(x, want, np.asarray(conv.bias[...], np.float64), (2, 2), 2)
    np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))), expect, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("channels, kernel_size", [(256, 5), (1536, 5), (16, 3)])
def test_eca_matches_numpy_cross_correlation(channels, kernel_size):
    eca = EfficientChannelAttention(channels, rngs=nnx.Rngs(0))
    assert eca.kernel.shape == (kernel_size,)  # ECA's adaptive size, as timm computes it.
    rng = np.random.default_rng(7)
    eca.kernel[...] = jnp.asarray(rng.standard_normal(kernel_size), jnp.float32)
    x = rng.standard_normal((2, 3, 5, channels)).astype(np.float32)
    y = x.astype(np.float64).mean(axis=(1, 2))
    k, pad = np.asarray(eca.kernel[...], np.float64), (kernel_size - 1) // 2
    padded = np.pad(y, ((0, 0), (pad, pad)))
    conv = np.stack(
        [sum(k[j] * padded[:, c + j] for j in range(kernel_size)) for c in range(channels)], -1
    )
    want = 1 / (1 + np.exp(-conv))
    got = np.asarray(eca(jnp.asarray(x)))
    assert got.shape == (2, 1, 1, channels)
    np.testing.assert_allclose(got[:, 0, 0], want, rtol=1e-5, atol=1e-6)


def test_stochastic_depth_scale_by_keep_rescales_kept_examples():
    sd = StochasticDepth(0.25, scale_by_keep=True, rngs=nnx.Rngs(dropout=0))
    per_example = np.asarray(sd(jnp.ones((4000, 3)))).reshape(4000, -1)
    assert set(np.unique(per_example)) == {0.0, np.float32(1 / 0.75)}
    assert abs(per_example.mean() - 1.0) < 0.05  # Unbiased, unlike DeepMind's.

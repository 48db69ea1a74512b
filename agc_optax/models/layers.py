"""Building blocks shared by the normalizer-free model families.

Everything here reproduces the numerics of DeepMind's Haiku reference
(google-deepmind/deepmind-research, ``nfnets/base.py``): scaled weight
standardization, activations with their published gamma constants,
squeeze-excite, batchwise stochastic depth without rescaling, the signal
metrics, TF-style SAME pooling, and the normalizer-free schedule of ``beta``
and expected variance that every NF family and the signal propagation plots
share.

References:
  Brock, De, Smith, Simonyan 2021, "Characterizing signal propagation to close
  the performance gap in unnormalized ResNets", arXiv:2101.08692.
  Brock, De, Smith, Simonyan 2021, "High-Performance Large-Scale Image
  Recognition Without Normalization", arXiv:2102.06171.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agc_optax.models._config import check_num_classes

Array = jax.Array
Dtype = Any

# DeepMind's published constants (nfnets/base.py). They are slightly off the
# exact 1/std values (see gammas_rederived.json), but released checkpoints were
# trained with them, so parity requires these and not re-derived ones.
GAMMAS: dict[str, float] = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "glu": 1.8484294414520264,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "log_softmax": 1.0002083778381348,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}

# `jax.nn.gelu` defaults to the tanh approximation, which is what DeepMind used;
# the exact-erf GELU shifts logits by ~3e-4 on the parity model.
_BASE_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "celu": jax.nn.celu,
    "elu": jax.nn.elu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "glu": jax.nn.glu,
    "leaky_relu": jax.nn.leaky_relu,
    "log_sigmoid": jax.nn.log_sigmoid,
    "log_softmax": jax.nn.log_softmax,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "selu": jax.nn.selu,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "soft_sign": jax.nn.soft_sign,
    "softplus": jax.nn.softplus,
    "tanh": jnp.tanh,
}


def scaled_activation(name: str) -> Callable[[Array], Array]:
    """Returns DeepMind's activation ``f(x) * gamma`` for a named nonlinearity.

    Args:
      name: one of the keys of `GAMMAS` (``"relu"``, ``"gelu"``, ``"silu"``, ...).

    Returns:
      A function of one array. The gamma is a Python float, so a bfloat16 input
      stays bfloat16.

    Raises:
      ValueError: if ``name`` is not a known activation.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(scaled_activation("relu")(jnp.array(1.0))), 4)
      1.714
    """
    if name not in GAMMAS:
        raise ValueError(
            f"`activation`: unknown name {name!r}; expected one of {sorted(GAMMAS)}. "
            "For another function, scale it by `estimate_gamma(fn)` yourself."
        )
    fn = _BASE_ACTIVATIONS[name]
    gamma = GAMMAS[name]
    if gamma == 1.0:
        return fn

    def act(x: Array) -> Array:
        return fn(x) * gamma

    act.__name__ = f"scaled_{name}"
    return act


def estimate_gamma(
    fn: Callable[[Array], Array],
    *,
    method: str = "quadrature",
    num_samples: int = 1_000_000,
    key: Array | None = None,
) -> float:
    """Estimates ``gamma = 1 / std(fn(z))`` for ``z ~ N(0, 1)``.

    Use it to bring an activation that `GAMMAS` does not list into the
    normalizer-free scheme: ``lambda x: fn(x) * estimate_gamma(fn)`` preserves unit
    variance at initialization.

    Args:
      fn: an elementwise function of a float32 array.
      method: ``"quadrature"`` (deterministic; the trapezoid rule against the
        normal density on [-12, 12], accurate to ~1e-6 for the usual activations) or
        ``"monte_carlo"`` (``num_samples`` normal draws from ``key``).
      num_samples: number of draws for ``"monte_carlo"``.
      key: a `jax.random` key for ``"monte_carlo"``; required there.

    Returns:
      The gamma as a Python float.

    Raises:
      ValueError: on an unknown ``method``, a missing ``key``, or a function
        whose output has zero or non-finite variance.
    """
    if method == "quadrature":
        # A dense grid beats adaptive quadrature here: it needs one vectorised call
        # of `fn`, and kinks (relu, relu6) cost only O(h^2) accuracy.
        z = np.linspace(-12.0, 12.0, 480_001)
        w = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        w[0] *= 0.5
        w[-1] *= 0.5
        w *= z[1] - z[0]
        f = np.asarray(fn(jnp.asarray(z, jnp.float32)), dtype=np.float64)
        if f.shape != z.shape:
            raise ValueError(
                f"`fn`: expected an elementwise function, got output shape {f.shape} "
                f"for input shape {z.shape}"
            )
        mean = np.sum(w * f)
        var = np.sum(w * (f - mean) ** 2)
    elif method == "monte_carlo":
        if key is None:
            raise ValueError("`key`: method='monte_carlo' needs a jax.random key")
        z = jax.random.normal(key, (int(num_samples),), jnp.float32)
        f = np.asarray(fn(z), dtype=np.float64)
        var = np.var(f)
    else:
        raise ValueError(f"`method`: expected 'quadrature' or 'monte_carlo', got {method!r}")
    if not np.isfinite(var) or var <= 0.0:
        raise ValueError(f"`fn`: output variance is {var}; gamma is undefined")
    return float(1.0 / math.sqrt(var))


def signal_metrics(x: Array, index: int | str) -> dict[str, Array]:
    """DeepMind's signal-propagation statistics of a channels-last activation.

    Args:
      x: activation of shape ``(N, *spatial, C)``.
      index: suffix of the keys (``0`` is the stem output in DeepMind's models).

    Returns:
      ``{"avg_sq_mean_<index>": mean_C(mean_NHW(x)^2),
      "avg_var_<index>": mean_C(var_NHW(x))}``, computed in float32, with the
      biased (ddof=0) variance.
    """
    x = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    return {
        f"avg_sq_mean_{index}": jnp.mean(jnp.mean(x, axis=axes) ** 2),
        f"avg_var_{index}": avg_channel_var(x),
    }


def avg_channel_var(x: Array) -> Array:
    """``mean_C(var_NHW(x))`` of a channels-last activation, in float32 (biased variance)."""
    x = x.astype(jnp.float32)
    return jnp.mean(jnp.var(x, axis=tuple(range(x.ndim - 1))))


def run_residual_blocks(
    stem_out: Array, blocks: Any, return_metrics: bool
) -> tuple[Array, dict[str, Array]]:
    """Runs blocks that return ``(out, res_avg_var)``, collecting DeepMind's metric dict.

    Shared by the families' ``forward_features``: with ``return_metrics``, the dict holds
    :func:`signal_metrics` of the stem output (``avg_sq_mean_0``, ``avg_var_0``) and of each
    block output (index ``block + 1``), and ``res_avg_var_<block>`` of each residual branch.
    A `BlockStack` counts as its ``num_layers`` blocks, with the same keys.
    """
    outputs: dict[str, Array] = {}
    out = stem_out
    if return_metrics:
        outputs.update(signal_metrics(out, 0))
    i = 0
    for block in blocks:
        if isinstance(block, BlockStack):
            out, res_avg_vars, stats = block(out, return_metrics=return_metrics)
            if return_metrics:
                for layer in range(block.num_layers):
                    outputs[f"avg_sq_mean_{i + 1}"] = stats["avg_sq_mean"][layer]
                    outputs[f"avg_var_{i + 1}"] = stats["avg_var"][layer]
                    outputs[f"res_avg_var_{i}"] = res_avg_vars[layer]
                    i += 1
            else:
                i += block.num_layers
            continue
        out, res_avg_var = block(out)
        if return_metrics:
            outputs.update(signal_metrics(out, i + 1))
            outputs[f"res_avg_var_{i}"] = res_avg_var
        i += 1
    return out, outputs


# ----------------------------------------------------------------------------- NF schedule


class ScheduledBlock(NamedTuple):
    """One residual block's entry in the normalizer-free schedule (see `nf_schedule`).

    Attributes:
      index: position in its stage; 0 is the stage's first (transition) block.
      beta: input scale of the residual branch, ``1 / expected_std`` of the block's input.
      stochdepth_rate: the block's stochastic-depth rate.
      variance: the expected variance of the block's output at initialization.
    """

    index: int
    beta: float
    stochdepth_rate: float
    variance: float


def nf_schedule(
    depths: Sequence[int], alpha: float, stochdepth_rate: float | None = None
) -> list[ScheduledBlock]:
    """The per-block ``beta``, stochastic-depth rate and expected variance of an NF network.

    A residual branch whose input is scaled by ``beta = 1 / expected_std`` outputs unit variance
    at initialization, so every block adds ``alpha**2`` to the variance of the skip path. The
    first block of each stage has a shortcut on the normalized input, so the variance restarts
    from one there (plus that block's ``alpha**2``). Block ``i`` of ``n`` gets the stochastic
    depth rate ``stochdepth_rate * i / n`` (zero when ``stochdepth_rate`` is None).

    ``beta`` follows DeepMind's recurrence on the standard deviation,
    ``expected_std = sqrt(expected_std**2 + alpha**2)``, which parity needs to the last bit;
    ``variance`` is the exact sum ``1 + k * alpha**2``.

    Args:
      depths: blocks per stage.
      alpha: the residual-branch scale.
      stochdepth_rate: the rate of the last block.

    Returns:
      One `ScheduledBlock` per block, in order.

    Example:
      >>> [round(b.beta, 4) for b in nf_schedule((2, 2), alpha=0.2)]
      [1.0, 0.9806, 0.9623, 0.9806]
    """
    schedule = []
    expected_std = variance = 1.0
    num_blocks = sum(depths)
    for depth in depths:
        for index in range(depth):
            beta = 1.0 / expected_std
            rate = 0.0 if stochdepth_rate is None else stochdepth_rate * len(schedule) / num_blocks
            if index == 0:
                expected_std = variance = 1.0
            expected_std = (expected_std**2 + alpha**2) ** 0.5
            variance += alpha**2
            schedule.append(ScheduledBlock(index, beta, rate, variance))
    return schedule


# ----------------------------------------------------------------------------- pooling


def _window(x: Array, size: int) -> tuple[int, ...]:
    return (1,) + (size,) * (x.ndim - 2) + (1,)


def avg_pool_same(x: Array, window: int = 2, stride: int = 2) -> Array:
    """Average pool over the spatial axes with TF 'SAME' padding.

    Like ``hk.avg_pool(..., padding="SAME")``, padded cells do not count in the
    average (Flax's ``nnx.avg_pool`` counts them by default, which changes border
    values on odd-sized inputs).

    Args:
      x: array of shape ``(N, *spatial, C)``.
      window: window size along every spatial axis.
      stride: stride along every spatial axis.

    Returns:
      The pooled array, of the same dtype.
    """
    # Python/NumPy init values let JAX recognise the sum monoid (differentiable).
    total = jax.lax.reduce_window(
        x, np.zeros((), x.dtype), jax.lax.add, _window(x, window), _window(x, stride), "SAME"
    )
    # The count of real (unpadded) cells is static: build it in NumPy, per axis.
    count = np.ones((), np.float32)
    for size in x.shape[1:-1]:
        out = -(-size // stride)
        low = max((out - 1) * stride + window - size, 0) // 2
        starts = np.arange(out) * stride - low
        per_axis = np.minimum(starts + window, size) - np.maximum(starts, 0)
        count = count[..., None] * per_axis.astype(np.float32)
    return total / jnp.asarray(count[None, ..., None], x.dtype)


def max_pool_same(x: Array, window: int = 3, stride: int = 2) -> Array:
    """Max pool over the spatial axes with TF 'SAME' padding (pads with -inf).

    Arguments and result as in `avg_pool_same`.
    """
    return jax.lax.reduce_window(
        x, np.array(-np.inf, x.dtype), jax.lax.max, _window(x, window), _window(x, stride), "SAME"
    )


def _as_tuple(value: int | Sequence[int], rank: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * rank
    value = tuple(value)
    if len(value) != rank or not all(isinstance(v, int) for v in value):
        raise ValueError(f"`{name}`: expected an int or {rank} ints, got {value!r}")
    return value


_SPATIAL = "DHW"


class WSConv(nnx.Module):
    """Convolution with scaled weight standardization, gain and bias.

    The kernel is standardized on every call, exactly as DeepMind's ``WSConv2D``:
    with ``mean`` and the biased ``var`` over all axes but the output axis and
    ``fan_in = prod(kernel.shape[:-1])`` (per group),
    ``scale = rsqrt(max(var * fan_in, 1e-4)) * gain`` and
    ``w_hat = kernel * scale - mean * scale``. With ``epsilon`` set it follows timm's
    ``ScaledStdConv2d`` instead: ``w_hat = (kernel - mean) * rsqrt(var + epsilon) * gain *
    gamma / sqrt(fan_in)`` (timm ``layers/std_conv.py``; the two differ by ~3e-3 in the
    logits of an untrained model). Standardization runs in float32
    even when ``dtype`` is bfloat16; only ``w_hat`` is cast. Padding ``"SAME"``
    follows XLA/TF (the odd pad goes at the end).

    Parameters: ``kernel`` (``(*kernel_size, in_features // groups,
    out_features)``), ``gain`` (``(out_features,)``, ones) and ``bias``
    (``(out_features,)``, zeros).

    Args:
      in_features: input channels.
      out_features: output channels.
      kernel_size: an int (2D) or a tuple whose length sets the spatial rank.
      strides: an int or one per spatial axis.
      feature_group_count: number of groups; must divide both channel counts.
      padding: ``"SAME"``, ``"VALID"`` or explicit ``(low, high)`` pairs.
      use_bias: kept for API symmetry with ``nnx.Conv``; DeepMind always adds a
        bias, and ``False`` is rejected so that checkpoints stay loadable.
      epsilon: ``None`` for DeepMind's ``max(var * fan_in, 1e-4)``; a float for timm's
        ``var + epsilon`` with the ``1 / sqrt(fan_in)`` scale (timm's NFNets use 1e-5).
      gamma: an extra constant factor of ``w_hat``: timm's NFNets without gamma in the
        activations fold the activation's gamma into every conv this way.
      dtype: computation dtype (``None``: inferred from input and params).
      param_dtype: parameter dtype.
      precision: passed to ``lax.conv_general_dilated``.
      rngs: an ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> conv = WSConv(8, 16, 3, strides=2, feature_group_count=2, rngs=nnx.Rngs(0))
      >>> conv.kernel.shape, conv(jnp.ones((1, 9, 9, 8))).shape
      ((3, 3, 4, 16), (1, 5, 5, 16))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        feature_group_count: int = 1,
        padding: str | Sequence[tuple[int, int]] = "SAME",
        use_bias: bool = True,
        epsilon: float | None = None,
        gamma: float = 1.0,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: jax.lax.Precision | None = None,
        rngs: nnx.Rngs,
    ):
        rank = 2 if isinstance(kernel_size, int) else len(tuple(kernel_size))
        if not 1 <= rank <= 3:
            raise ValueError(f"`kernel_size`: expected 1 to 3 spatial axes, got {kernel_size!r}")
        if (
            feature_group_count < 1
            or in_features % feature_group_count
            or (out_features % feature_group_count)
        ):
            raise ValueError(
                f"`feature_group_count`: {feature_group_count} must divide in_features "
                f"({in_features}) and out_features ({out_features})"
            )
        if not use_bias:
            raise ValueError("`use_bias`: WSConv always has a bias, as DeepMind's WSConv2D does")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = _as_tuple(kernel_size, rank, "kernel_size")
        self.strides = _as_tuple(strides, rank, "strides")
        self.feature_group_count = feature_group_count
        self.padding = padding
        self.epsilon = epsilon
        self.gamma = float(gamma)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        shape = self.kernel_size + (in_features // feature_group_count, out_features)
        # DeepMind: VarianceScaling(1.0, 'fan_in', 'normal'), an untruncated normal.
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))
        self.gain = nnx.Param(jnp.ones((out_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))

    def standardized_kernel(self) -> Array:
        """Returns the standardized kernel ``w_hat`` in float32."""
        w = self.kernel[...].astype(jnp.float32)
        axes = tuple(range(w.ndim - 1))
        mean = jnp.mean(w, axis=axes, keepdims=True)
        var = jnp.var(w, axis=axes, keepdims=True)
        fan_in = math.prod(w.shape[:-1])
        gain = self.gain[...].astype(jnp.float32)
        if self.epsilon is not None:  # timm: eps added to the variance, then 1/sqrt(fan_in).
            scale = jax.lax.rsqrt(var + self.epsilon) * (gain * (self.gamma / math.sqrt(fan_in)))
            return (w - mean) * scale
        scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, 1e-4)) * gain
        if self.gamma != 1.0:
            scale = scale * self.gamma
        return w * scale - mean * scale

    def __call__(self, x: Array) -> Array:
        """Applies the convolution to channels-last input ``(N, *spatial, C)``."""
        rank = len(self.kernel_size)
        if x.ndim != rank + 2 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"WSConv: expected input of rank {rank + 2} with {self.in_features} "
                f"channels last, got shape {x.shape}"
            )
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        w_hat = self.standardized_kernel().astype(dtype)
        sp = _SPATIAL[-rank:]
        dn = jax.lax.conv_dimension_numbers(x.shape, w_hat.shape, (f"N{sp}C", f"{sp}IO", f"N{sp}C"))
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            w_hat,
            window_strides=self.strides,
            padding=self.padding,
            dimension_numbers=dn,
            feature_group_count=self.feature_group_count,
            precision=self.precision,
        )
        return y + self.bias[...].astype(dtype)


class SqueezeExcite(nnx.Module):
    """DeepMind's squeeze-excite gate: mean over space, fc0, relu, fc1, sigmoid.

    Returns the gate of shape ``(N, 1, ..., 1, out_features)``, not the gated
    input: the NFNet block multiplies by ``2 * gate`` to keep the signal's
    variance. The hidden activation is a plain relu, without a gamma.

    Args:
      in_features: channels of the input.
      out_features: channels of the gate.
      se_ratio: hidden width is ``max(1, int(in_features * se_ratio))``.
      hidden_features: explicit hidden width (overrides ``se_ratio``).
      dtype: computation dtype.
      param_dtype: parameter dtype.
      rngs: an ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        se_ratio: float | None = 0.5,
        hidden_features: int | None = None,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if hidden_features is None:
            if se_ratio is None:
                raise ValueError("SqueezeExcite: give one of `se_ratio` or `hidden_features`")
            hidden_features = max(1, int(in_features * se_ratio))
        self.hidden_features = hidden_features

        def linear(n_in: int, n_out: int) -> nnx.Linear:
            # hk.Linear's default: truncated normal with stddev 1/sqrt(fan_in) before
            # truncation at two standard deviations.
            init = nnx.initializers.truncated_normal(1.0 / math.sqrt(n_in))
            kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            return nnx.Linear(n_in, n_out, kernel_init=init, **kw)

        self.fc0 = linear(in_features, hidden_features)
        self.fc1 = linear(hidden_features, out_features)

    def __call__(self, x: Array) -> Array:
        """Computes the gate for channels-last ``x``."""
        h = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
        h = self.fc1(jax.nn.relu(self.fc0(h)))
        gate = jax.nn.sigmoid(h)
        return gate.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (gate.shape[-1],))


class EfficientChannelAttention(nnx.Module):
    """ECA's channel gate (Wang et al. 2020, arXiv:1910.03151), as timm's ``EcaModule``.

    The spatial mean of each channel goes through a 1-D cross-correlation along the channel
    axis (``kernel_size`` taps, zero padding ``(kernel_size - 1) // 2`` on each side, no bias),
    then a sigmoid. Like `SqueezeExcite`, it returns the gate ``(N, 1, ..., 1, C)``, not the
    gated input.

    Args:
      features: channels of the input (sets the default kernel size).
      kernel_size: taps of the channel convolution; ``None`` takes ECA's adaptive size
        ``t = int(|log2(features) + 1| / 2)``, made odd (``t + 1`` if even), at least 3
        (timm ``layers/eca.py``): 5 for 256 to 2047 channels.
      param_dtype: parameter dtype.
      rngs: an ``nnx.Rngs`` with a ``params`` stream.

    Parameters: ``kernel`` of shape ``(kernel_size,)`` (torch's ``Conv1d`` init,
    ``U(-1/sqrt(k), 1/sqrt(k))``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> eca = EfficientChannelAttention(512, rngs=nnx.Rngs(0))
      >>> eca.kernel.shape, eca(jnp.ones((2, 4, 4, 512))).shape
      ((5,), (2, 1, 1, 512))
    """

    def __init__(
        self,
        features: int,
        kernel_size: int | None = None,
        *,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if kernel_size is None:
            t = int(abs(math.log2(features) + 1) / 2)
            kernel_size = max(t if t % 2 else t + 1, 3)
        if kernel_size < 1:
            raise ValueError(f"`kernel_size`: expected a positive int, got {kernel_size}")
        self.features = features
        self.kernel_size = kernel_size
        bound = 1.0 / math.sqrt(kernel_size)
        self.kernel = nnx.Param(
            jax.random.uniform(rngs.params(), (kernel_size,), param_dtype, -bound, bound)
        )

    def __call__(self, x: Array) -> Array:
        """Computes the gate for channels-last ``x``."""
        y = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))  # (N, C)
        k, channels = self.kernel_size, y.shape[-1]
        low = (k - 1) // 2
        padded = jnp.pad(y, ((0, 0), (low, k - 1 - low)))
        kernel = self.kernel[...].astype(y.dtype)
        # Cross-correlation: out[c] = sum_j kernel[j] * y[c + j - low].
        out = sum(kernel[j] * padded[:, j : j + channels] for j in range(k))
        gate = jax.nn.sigmoid(out)
        return gate.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (channels,))


class StochasticDepth(nnx.Module):
    """Batchwise drop-path with DeepMind's semantics.

    In training, each example's residual branch is kept with probability
    ``1 - rate`` via the mask ``floor(1 - rate + U)``, ``U ~ U[0, 1)``, and is
    NOT rescaled by ``1 / (1 - rate)`` (unlike timm's DropPath). It is an identity
    when ``deterministic`` is true or ``rate == 0``. Like ``nnx.Dropout``, the
    ``deterministic`` attribute is flipped by ``model.train()`` / ``model.eval()``
    and by ``nnx.view(model, deterministic=...)``.

    Args:
      rate: probability of dropping an example's branch.
      deterministic: start in evaluation mode if true.
      rng_collection: the ``nnx.Rngs`` stream to draw from.
      scale_by_keep: divide kept branches by ``1 - rate``, as timm's DropPath does.
      rngs: an ``nnx.Rngs`` (or ``None`` when a key is passed at call time).
    """

    def __init__(
        self,
        rate: float,
        *,
        deterministic: bool = False,
        rng_collection: str = "dropout",
        scale_by_keep: bool = False,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
    ):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"`rate`: expected a value in [0, 1), got {rate}")
        self.rate = rate
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.scale_by_keep = scale_by_keep
        if isinstance(rngs, nnx.Rngs):
            self.rngs = rngs[rng_collection].fork()
        elif isinstance(rngs, nnx.RngStream):
            self.rngs = rngs.fork()
        else:
            self.rngs = nnx.data(None)

    def set_view(self, deterministic: bool | None = None) -> None:
        """Hook for ``nnx.view``."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(
        self,
        x: Array,
        *,
        rate: float | Array | None = None,
        deterministic: bool | None = None,
        key: Array | None = None,
    ) -> Array:
        """Applies drop-path to ``x`` of shape ``(N, ...)``.

        Args:
          x: the residual branch.
          rate: overrides the constructor's rate (it may be traced, which the
            scanned NFNet blocks use).
          deterministic: overrides the module's mode.
          key: overrides the module's rng stream.

        Returns:
          ``x`` times a per-example 0/1 mask, or ``x`` itself.
        """
        deterministic = self.deterministic if deterministic is None else deterministic
        rate = self.rate if rate is None else rate
        if deterministic or (isinstance(rate, float | int) and rate == 0.0):
            return x
        if key is None:
            if self.rngs is None:
                raise ValueError(
                    "StochasticDepth: training mode needs `rngs` at construction or `key`"
                )
            key = self.rngs()
        u = jax.random.uniform(key, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
        mask = jnp.floor((1.0 - rate) + u).astype(x.dtype)
        if self.scale_by_keep:
            mask = mask / (1.0 - rate)
        return x * mask


# ----------------------------------------------------------------------------- NF block pieces


def optional_stochastic_depth(
    rate: float | None, rngs: nnx.Rngs | nnx.RngStream | None
) -> StochasticDepth | None:
    """A `StochasticDepth` for a rate in (0, 1), else None, as DeepMind's blocks decide."""
    return StochasticDepth(rate, rngs=rngs) if rate is not None and 0.0 < rate < 1.0 else None


def pooled_shortcut(x: Array, out: Array, stride: int, conv_shortcut: Any) -> Array:
    """The shortcut of NFNet and NF-RegNet blocks, from the block input ``x`` and ``out``.

    ``out`` is ``act(x) * beta``. A strided block takes ``conv_shortcut(avg_pool_same(out))``
    (or the pool alone without a conv), a channel change ``conv_shortcut(out)``, any other block
    ``x`` itself: not activated, so that the signal's scale keeps accumulating.
    """
    if stride > 1:
        shortcut = avg_pool_same(out, window=2, stride=stride)
        return shortcut if conv_shortcut is None else conv_shortcut(shortcut)
    return x if conv_shortcut is None else conv_shortcut(out)


def nf_residual(
    block: nnx.Module,
    branch: Array,
    shortcut: Array,
    stochdepth_rate: float | Array | None = None,
) -> tuple[Array, Array]:
    """The end of an NF block: ``stoch_depth(branch) * skip_gain * alpha + shortcut``.

    Args:
      block: the NF block, with attributes ``alpha`` (the residual-branch scale),
        ``skip_gain`` (its scalar SkipInit gain, or None for none) and ``stoch_depth`` (a
        `StochasticDepth` or None).
      branch: the residual branch's output.
      shortcut: the skip path (cast to the branch's dtype).
      stochdepth_rate: overrides the stochastic-depth rate (traced per layer by the scanned
        NFNet stacks).

    Returns:
      ``(output, res_avg_var)``, the latter the branch's `avg_channel_var` before stochastic
      depth and ``skip_gain``.
    """
    res_avg_var = avg_channel_var(branch)
    if block.stoch_depth is not None:
        branch = block.stoch_depth(branch, rate=stochdepth_rate)
    if block.skip_gain is not None:
        branch = branch * block.skip_gain[...].astype(branch.dtype)
    return branch * block.alpha + shortcut.astype(branch.dtype), res_avg_var


# ----------------------------------------------------------------------------- stacked blocks


# What ``scan_blocks="auto"`` becomes on each backend, read from `jax.default_backend()` when the
# model is built; every normalizer-free family resolves it here. CPU, measured
# (benchmarks/RESULTS.md, "scan_blocks on CPU"): with the canonical gradient convs the scanned
# NFNet step is no slower than the plain unrolled one (F0 0.62-0.91x, F3 0.93x, F6 0.99x) and F3
# and F6 compile 3-9x faster (F6: 23 vs 209 s), but the unrolled model with
# `canonical_conv_grads=True`, which agc-train builds, steps faster still (F6 0.87x the plain
# one, F0 0.46-0.49x), F0's compile is a wash, and NF-ResNet-50's scanned trainer step compiles
# slower than its unrolled one (12.8 vs 11.5 s) and steps slower (0.80x vs 0.76x the bare step),
# so "auto" unrolls on CPU (ask for True on CPU for F3 and deeper when compile time matters more
# than a few hundred steps). GPU and TPU, not measured here:
# scanning repeated layers is the usual way to bound compile time there (MaxText defaults to
# ``scan_layers: True``; big_vision's large-model configs set ``scan=True``), and the CPU problem
# the canonical convs work around is a CPU compiler pass's scope, so "auto" scans.
SCAN_BLOCKS_AUTO: dict[str, bool] = {"cpu": False, "gpu": True, "tpu": True}


def resolve_scan_blocks(scan_blocks: bool | str, backend: str | None = None) -> bool:
    """``scan_blocks`` as a bool: ``True``/``False`` as given, ``"auto"`` per backend.

    Args:
      scan_blocks: ``True``, ``False`` or ``"auto"``.
      backend: the backend ``"auto"`` is resolved for (default `jax.default_backend()`);
        backends not in `SCAN_BLOCKS_AUTO` unroll.

    Raises:
      ValueError: naming ``scan_blocks`` for any other value.

    Example:
      >>> resolve_scan_blocks("auto", backend="cpu"), resolve_scan_blocks("auto", "tpu")
      (False, True)
    """
    if isinstance(scan_blocks, bool | np.bool_):
        return bool(scan_blocks)
    if isinstance(scan_blocks, str) and scan_blocks == "auto":
        return SCAN_BLOCKS_AUTO.get(backend or jax.default_backend(), False)
    raise ValueError(
        f'`scan_blocks`: expected True, False or "auto", got {scan_blocks!r} '
        f"({type(scan_blocks).__name__})"
    )


class BlockStack(nnx.Module):
    """A run of residual blocks of one structure, stacked on a leading layer axis and applied
    with ``nnx.scan``: XLA compiles the block once instead of ``num_layers`` times.

    Every parameter (and RNG stream) of ``block`` carries a leading axis of length
    ``num_layers``; layer ``i`` of it is the ``i``-th block of the unrolled run. The blocks are
    created with ``nnx.vmap`` over ``rngs`` split once per layer. What differs from block to
    block without changing the structure (the input scale ``beta``, the stochastic-depth rate)
    is a *layer input*: one float per layer, scanned along with the parameters and passed to
    the block as a keyword (cast to the signal's dtype, as Python floats are).

    Args:
      make_block: ``make_block(rngs) -> block``, the template; a block's ``__call__(x,
        **layer_inputs)`` returns ``(output, res_avg_var)`` with ``output`` of ``x``'s shape and
        dtype. A block that has stochastic depth in any layer must have it in the template.
      layer_inputs: keyword -> one float per layer (all of one length, at least 1).
      rngs: the streams the blocks are created from (each split ``num_layers`` ways).

    Attributes:
      block: the stacked block (leaf paths ``.../block/conv0/kernel``, shapes ``(L, ...)``).
      num_layers: ``L``.
      layer_inputs: ``{keyword: tuple of floats}``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> class Block(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.dense = nnx.Linear(4, 4, rngs=rngs)
      ...     def __call__(self, x, *, beta):
      ...         branch = self.dense(x * beta)
      ...         return x + branch, jnp.var(branch)
      >>> stack = BlockStack(Block, {"beta": [1.0, 0.5, 0.25]}, rngs=nnx.Rngs(0))
      >>> stack.block.dense.kernel.shape
      (3, 4, 4)
      >>> out, res_avg_var, metrics = stack(jnp.ones((2, 4)), return_metrics=True)
      >>> out.shape, res_avg_var.shape, sorted(metrics), metrics["avg_var"].shape
      ((2, 4), (3,), ['avg_sq_mean', 'avg_var'], (3,))
    """

    def __init__(
        self,
        make_block: Callable[[nnx.Rngs], nnx.Module],
        layer_inputs: dict[str, Sequence[float]],
        *,
        rngs: nnx.Rngs,
    ):
        values = {name: tuple(float(v) for v in run) for name, run in layer_inputs.items()}
        lengths = {name: len(run) for name, run in values.items()}
        if len(set(lengths.values())) != 1 or min(lengths.values()) < 1:
            raise ValueError(
                "BlockStack `layer_inputs`: expected one value per layer, the same number (at "
                f"least 1) for every keyword, got lengths {lengths}"
            )
        self.num_layers = next(iter(lengths.values()))
        # Tuples, not a dict: static attributes of an NNX module must be hashable.
        self.input_names = tuple(values)
        self.input_values = tuple(values.values())

        @nnx.split_rngs(splits=self.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(layer_rngs: nnx.Rngs) -> nnx.Module:
            return make_block(layer_rngs)

        self.block = make(rngs)

    @property
    def layer_inputs(self) -> dict[str, tuple[float, ...]]:
        """``{keyword: one float per layer}``, as given."""
        return dict(zip(self.input_names, self.input_values, strict=True))

    def __call__(
        self, x: Array, *, return_metrics: bool = False
    ) -> tuple[Array, Array, dict[str, Array]]:
        """Runs the layers in order.

        Args:
          x: the first layer's input.
          return_metrics: also compute DeepMind's `signal_metrics` of every layer's output
            (inside the scanned body, so they cost nothing when not asked for).

        Returns:
          ``(output, res_avg_var, metrics)``: the last layer's output, each layer's
          ``res_avg_var`` ``(L,)``, and ``{"avg_sq_mean": (L,), "avg_var": (L,)}`` (empty
          without ``return_metrics``).
        """
        inputs = {
            name: jnp.asarray(run, jnp.float32)
            for name, run in zip(self.input_names, self.input_values, strict=True)
        }

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
        def body(h, block, layer):
            h, res_avg_var = block(h, **{k: v.astype(h.dtype) for k, v in layer.items()})
            if not return_metrics:
                return h, (res_avg_var, {})
            stats = signal_metrics(h, "")
            metrics = {"avg_sq_mean": stats["avg_sq_mean_"], "avg_var": stats["avg_var_"]}
            return h, (res_avg_var, metrics)

        out, (res_avg_var, metrics) = body(x, self.block, inputs)
        return out, res_avg_var, metrics


def residual_run(
    make_block: Callable[..., nnx.Module],
    betas: Sequence[float],
    stochdepth_rates: Sequence[float],
    *,
    scan: bool,
    rngs: nnx.Rngs,
    stacked_kwargs: dict[str, Any] | None = None,
) -> list[nnx.Module]:
    """Blocks of one structure (a stage's identity-shortcut blocks), unrolled or stacked.

    Args:
      make_block: ``make_block(beta=..., stochdepth_rate=..., rngs=...) -> block``; the block
        has stochastic depth when its rate is in (0, 1) (DeepMind's and timm's rule), and its
        ``__call__(x, *, beta, stochdepth_rate)`` overrides both.
      betas: each block's ``beta``.
      stochdepth_rates: each block's stochastic-depth rate.
      scan: stack a run of two or more blocks into one `BlockStack` (a single block stays a
        block); otherwise build one block each, in order.
      rngs: the model's streams.
      stacked_kwargs: more keywords of ``make_block`` for a stacked block only, e.g. the
        families' ``conv=CanonicalGradWSConv`` (`agc_optax.models.canonical_conv`: same
        parameters and outputs, gradients that XLA:CPU keeps on its fast path inside a loop).

    Returns:
      The blocks: ``[BlockStack]`` when stacked, else one block per ``beta``.

    In a stack, a layer whose rate is outside (0, 1) gets rate 0 (an identity: the mask
    ``floor(1 + U)`` is 1, and rescaling by ``1 / (1 - 0)`` changes nothing), so the stack has
    one structure and the unrolled model's numbers.
    """
    if len(betas) != len(stochdepth_rates):
        raise ValueError(
            f"residual_run: {len(betas)} betas for {len(stochdepth_rates)} stochastic-depth rates"
        )
    if not scan or len(betas) < 2:
        return [
            make_block(beta=beta, stochdepth_rate=rate, rngs=rngs)
            for beta, rate in zip(betas, stochdepth_rates, strict=True)
        ]
    rates = [float(r) if 0.0 < r < 1.0 else 0.0 for r in stochdepth_rates]
    template_rate = max(rates)  # 0: no layer drops, and the template has no stochastic depth

    def template(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make_block(
            beta=betas[0], stochdepth_rate=template_rate, rngs=layer_rngs, **(stacked_kwargs or {})
        )

    inputs = {"beta": betas, "stochdepth_rate": rates}
    return [BlockStack(template, inputs, rngs=rngs)]


def block_locations(blocks: Sequence[Any]) -> list[tuple[int, int | None]]:
    """Maps each block of the unrolled model to ``(position in blocks, layer)``.

    ``layer`` is ``None`` for a plain block and the index along the stacked axis for a
    `BlockStack` (or any item with ``num_layers``): what the weight loaders use to fill stacked
    leaves from per-block checkpoints.

    Example:
      >>> class Stack:
      ...     num_layers = 2
      >>> block_locations(["block", Stack(), "block"])
      [(0, None), (1, 0), (1, 1), (2, None)]
    """
    locations: list[tuple[int, int | None]] = []
    for position, item in enumerate(blocks):
        layers = getattr(item, "num_layers", None)
        if layers is None:
            locations.append((position, None))
        else:
            locations.extend((position, layer) for layer in range(layers))
    return locations


def stacked_unit_axes(
    stack: str, whole_unit_kernels: Sequence[str] = ()
) -> list[tuple[str, tuple[int, ...]]]:
    """AGC unit-axes rules (``(regex, axes)`` pairs) for the leaves of stacked blocks.

    A stacked leaf ``(L, *shape)`` has the units of one block's leaf, per layer: a conv or
    dense kernel one per ``(layer, output channel)``, ``(0, -1)``; a gain, bias or
    ``skip_gain`` (one unit in a block) one per layer, ``(0,)``. Leaves outside the stacks
    match no rule and keep the default rules.

    Args:
      stack: a regex matching the path of a stacked block, up to and including ``block/``,
        e.g. ``r"blocks/\\d+/block/"``; it is anchored at the start of the path.
      whole_unit_kernels: regexes (below the block) of kernels of rank 1 in a block, which are
        one unit there (timm's ECA ``attn_last/kernel``): ``(0,)`` once stacked.

    Example:
      >>> stacked_unit_axes(r"blocks/\\d+/block/")
      [('^blocks/\\\\d+/block/.*kernel$', (0, -1)), ('^blocks/\\\\d+/block/', (0,))]
    """
    rules = [(f"^{stack}{kernel}$", (0,)) for kernel in whole_unit_kernels]
    return rules + [(f"^{stack}.*kernel$", (0, -1)), (f"^{stack}", (0,))]


# ----------------------------------------------------------------------------- Haiku names

# How DeepMind's Haiku checkpoints name these layers' parameters (see
# `agc_optax.models.weights.HaikuNames`): WSConv2D has `w`, `gain` and `bias`, hk.Linear `w`
# and `b`. No tensor needs a transpose: Haiku's HWIO kernels and (in, out) weights are Flax's.
WS_CONV_PARAMS = {"w": "kernel", "gain": "gain", "bias": "bias"}
LINEAR_PARAMS = {"w": "kernel", "b": "bias"}

# The layers inside a residual block, named alike by the three NF families: Haiku module path
# below the block (a regex, full match) -> (NNX path template, parameter names).
NF_BLOCK_LAYERS = {
    "(conv0|conv1|conv1b|conv2|conv_shortcut)": (r"\1", WS_CONV_PARAMS),
    "squeeze_excite/linear": ("se/fc0", LINEAR_PARAMS),
    "squeeze_excite/linear_1": ("se/fc1", LINEAR_PARAMS),
}


# ----------------------------------------------------------------------------- model-zoo API


class ClassifierHead:
    """The model-zoo API every family shares, with timm's names.

    A family (an ``nnx.Module`` listing this class first among its bases) defines
    ``forward_features(x)``, the final feature map ``(N, H, W, num_features)``,
    ``_finish(out)``, what turns the last block's output into that map; it sets ``fc_init``
    (and optionally ``fc_bias_init``), the initialisers of its classifier, ``dtype`` and
    ``param_dtype``, and
    ``stem``, ``blocks`` (one flat list; a scanned stack counts ``num_layers`` blocks),
    ``depths`` and ``widths`` (per stage, the first stage at stride 4 and each later one
    halving the resolution), ``num_features``, ``num_classes``, ``head`` and, if it has one,
    ``dropout``. This class adds pooling and the classifier (``forward_head``), replacing the
    classifier (``reset_classifier``), per-stage features (``forward_intermediates``,
    ``feature_info``) and ``__call__``.
    """

    num_features: int
    num_classes: int
    head: Any
    stem: Any
    blocks: Any
    depths: tuple[int, ...]
    widths: tuple[int, ...]

    def forward_features(self, x: Array) -> Array:  # pragma: no cover - defined by families
        raise NotImplementedError

    def _finish(self, out: Array) -> Array:  # pragma: no cover - defined by families
        raise NotImplementedError

    def _new_head(self, num_classes: int, rngs: nnx.Rngs) -> nnx.Linear | None:
        """The classifier for ``num_classes`` (``None`` for 0: the model returns its pooled
        features), initialised with the family's ``fc_init`` (and ``fc_bias_init``, zeros
        unless the family sets one)."""
        if not num_classes:
            return None
        return nnx.Linear(
            self.num_features,
            num_classes,
            kernel_init=self.fc_init,
            bias_init=getattr(self, "fc_bias_init", nnx.initializers.zeros_init()),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=rngs,
        )

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """Each stage's output as a backbone feature: ``{"num_chs", "reduction", "module"}``,
        where ``module`` keys `forward_intermediates` (timm's ``feature_info``)."""
        return [
            dict(num_chs=int(w), reduction=4 * 2**i, module=f"stages.{i}")
            for i, w in enumerate(self.widths)
        ]

    def forward_intermediates(self, x: Array) -> dict[str, Array]:
        """Every stage's output, for detection or segmentation backbones.

        Returns:
          ``{"stem", "stages.0", ..., "features"}`` (NHWC maps; ``features`` is
          ``forward_features``'s) and ``"pool"``, the pooled ``(N, num_features)``.
        """
        outputs = {"stem": self.stem(x)}
        out, stage, done = outputs["stem"], 0, 0
        ends = np.cumsum(self.depths)
        for item in self.blocks:
            out = item(out)[0]
            done += getattr(item, "num_layers", 1)
            while stage < len(ends) and done == ends[stage]:
                outputs[f"stages.{stage}"] = out
                stage += 1
        outputs["features"] = self._finish(out)
        outputs["pool"] = self.forward_head(outputs["features"], pre_logits=True)
        return outputs

    def forward_head(self, features: Array, *, pre_logits: bool = False) -> Array:
        """Mean-pools ``forward_features``'s output, then dropout and the classifier.

        Args:
          features: ``(N, H, W, num_features)``.
          pre_logits: return the pooled features ``(N, num_features)`` (no dropout, no
            classifier), as a model without a classifier always does.
        """
        pool = jnp.mean(features, axis=tuple(range(1, features.ndim - 1)))
        if pre_logits or self.head is None:
            return pool
        dropout = getattr(self, "dropout", None)
        return self.head(pool if dropout is None else dropout(pool))

    def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None) -> None:
        """Replaces ``head`` by a freshly initialized classifier, as timm's method does.

        Args:
          num_classes: outputs of the new classifier; 0 removes it (the model then returns its
            pooled features).
          rngs: keys of its initialization (default ``nnx.Rngs(0)``).
        """
        self.num_classes = check_num_classes(num_classes)
        self.head = self._new_head(self.num_classes, rngs or nnx.Rngs(0))

    def __call__(self, x: Array) -> Array:
        """Returns the logits (no softmax) for NHWC images, or the pooled features without a
        classifier."""
        return self.forward_head(self.forward_features(x))

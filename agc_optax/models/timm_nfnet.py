"""timm's NFNets: ``dm_nfnet_f0`` ... ``dm_nfnet_f6``, ``nfnet_l0``, ``eca_nfnet_l0`` ... ``l2``.

The same network as `agc_optax.models.NFNet` with timm's numerics, so that timm's checkpoints
load and give timm's logits (timm 1.0 ``models/nfnet.py``, ``NormFreeNet``):

* ``Stem`` (timm's ``deep_quad``): four 3x3 scaled-WS convs, ``stem_width // 8`` s2,
  ``// 4``, ``// 2``, ``stem_width`` s2, with the activation between them but not after the last.
* ``TimmNFBlock``: ``out = act(x) * beta``; the shortcut is ``downsample(avg_pool(out))``
  when strided, ``downsample(out)`` on a channel change, else ``x``; the branch is
  ``conv1 1x1 -> act -> conv2 3x3 grouped, strided -> act -> conv2b 3x3 grouped -> act ->
  conv3 1x1``, gated by squeeze-excite or ECA (``attn_last``) times ``attention_gain = 2``,
  drop-path, the scalar ``skip_gain`` (``dm_*`` only), and ``out * alpha + shortcut``.
* Head: ``final_conv`` 1x1 to ``num_features``, act, mean over H and W, dropout, ``head``.

What differs from DeepMind's numerics (each changes the logits; see
``shared/reference/timm/README.md``): weight standardization adds ``ws_epsilon = 1e-5`` to
the variance and scales by ``1 / sqrt(fan_in)`` (DeepMind: ``rsqrt(max(fan_in * var, 1e-4))``);
GELU is the exact erf form; ``dm_*`` models multiply every activation by its gamma and pad
TF-'SAME' like DeepMind, while ``nfnet_l0`` and ``eca_nfnet_l*`` fold gamma into every conv
(including the stem's first and ``final_conv``), use plain activations and symmetric padding
``((stride - 1) + (kernel - 1)) // 2``, and have no ``skip_gain`` (their ``conv3`` gain starts
at zero instead). Drop-path follows timm: per example, rescaled by ``1 / keep``, rates
``linspace(0, drop_path_rate, num_blocks)``. Channel counts are rounded as timm rounds them
(`make_divisible`).

Parameters are named as in timm's ``state_dict()`` where the NNX conventions allow:
``stem/conv1/kernel``, ``stages/1/0/conv2/gain``, ``stages/1/0/downsample/kernel``,
``stages/0/2/attn_last/fc0/kernel`` (SE) or ``stages/0/2/attn_last/kernel`` (ECA),
``stages/0/0/skip_gain``, ``final_conv/bias``, ``head/kernel``. `TIMM_NAMES` maps timm's keys
and tensor layouts to them (read by `agc_optax.models.load_timm_state_dict`).

References:
  Brock, De, Smith, Simonyan 2021, "High-Performance Large-Scale Image Recognition Without
  Normalization", arXiv:2102.06171. Wang et al. 2020, "ECA-Net", arXiv:1910.03151.
  Wightman, PyTorch Image Models (timm), ``timm/models/nfnet.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from agc_optax.models._config import check_num_classes, check_stages, resolve_config
from agc_optax.models.canonical_conv import CanonicalGradWSConv, wsconv_class
from agc_optax.models.layers import (
    GAMMAS,
    ClassifierHead,
    EfficientChannelAttention,
    SqueezeExcite,
    StochasticDepth,
    WSConv,
    block_locations,
    nf_residual,
    pooled_shortcut,
    residual_run,
    resolve_scan_blocks,
    stacked_unit_axes,
)
from agc_optax.models.weights import TimmNames

Array = jax.Array
Dtype = Any

# timm's NFNet activations; GELU is the exact erf form (F.gelu), not JAX's tanh default.
_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}
_CHANNEL_DIVISOR = 8  # timm's NfCfg.ch_div


def make_divisible(value: float, divisor: int = _CHANNEL_DIVISOR, round_limit: float = 0.9) -> int:
    """timm's channel rounding: the nearest multiple of ``divisor`` (at least ``divisor``),
    one step up if that loses more than ``1 - round_limit`` of ``value``.

    Example:
      >>> make_divisible(40 * 0.5, round_limit=0.0), make_divisible(100), make_divisible(3)
      (24, 104, 8)
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


@dataclasses.dataclass(frozen=True)
class TimmNFNetConfig:
    """One timm NFNet variant (timm's ``NfCfg`` for the deep-quad-stem NFNets).

    Attributes:
      variant: the registry (and timm) name, e.g. ``"eca_nfnet_l0"``.
      depths: blocks per stage (the first stage has stride 1, every later one stride 2).
      widths: output channels of each stage (timm's ``channels``).
      num_features: channels of ``final_conv``. timm fixes it per variant, so overriding
        ``widths`` alone keeps it; give it explicitly with narrower widths.
      stem_width: output channels of the stem.
      group_size: channels per group of the 3x3 convs.
      bottleneck_ratio: bottleneck width as a fraction of the block's output width.
      attention: ``"se"`` (squeeze-excite) or ``"eca"``, after ``conv3``.
      se_ratio: squeeze-excite hidden width as a fraction of the channels (rounded to 8).
      activation: ``"gelu"``, ``"silu"`` or ``"relu"``.
      gamma_in_activation: multiply every activation by its gamma (``dm_*``, as DeepMind);
        otherwise fold gamma into every conv.
      same_padding: TF-'SAME' padding (``dm_*``); otherwise symmetric padding.
      skipinit: a scalar ``skip_gain`` per block (``dm_*``).
      ws_epsilon: the epsilon added to the kernel variance in weight standardization.
      alpha: residual-branch scale.
      attention_gain: factor of the gated output (2 restores the variance the gate halves).
      train_imsize: timm's training resolution of the pretrained weights.
      test_imsize: timm's evaluation resolution of the pretrained weights.
    """

    variant: str
    depths: tuple[int, ...]
    widths: tuple[int, ...] = (256, 512, 1536, 1536)
    num_features: int = 3072
    stem_width: int = 128
    group_size: int = 128
    bottleneck_ratio: float = 0.5
    attention: str = "se"
    se_ratio: float = 0.5
    activation: str = "gelu"
    gamma_in_activation: bool = True
    same_padding: bool = True
    skipinit: bool = True
    ws_epsilon: float = 1e-5
    alpha: float = 0.2
    attention_gain: float = 2.0
    train_imsize: int = 224
    test_imsize: int = 224

    def __post_init__(self) -> None:
        check_stages(self, ("depths",))
        if self.attention not in ("se", "eca"):
            raise ValueError(
                f"TimmNFNetConfig `attention`: expected 'se' or 'eca', got {self.attention!r}"
            )
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"TimmNFNetConfig `activation`: expected one of {sorted(_ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if self.num_features < 1:
            raise ValueError(
                f"TimmNFNetConfig `num_features`: expected a positive channel count, got "
                f"{self.num_features}"
            )


def _variants() -> dict[str, TimmNFNetConfig]:
    configs: dict[str, TimmNFNetConfig] = {}
    # dm_nfnet_f0 ... f6: DeepMind's F-series depths (1, 2, 6, 3) * (i + 1) and resolutions.
    sizes = [(192, 256), (224, 320), (256, 352), (320, 416), (384, 512), (416, 544), (448, 576)]
    for i, (train, test) in enumerate(sizes):
        depths = tuple((i + 1) * d for d in (1, 2, 6, 3))
        configs[f"dm_nfnet_f{i}"] = TimmNFNetConfig(
            f"dm_nfnet_f{i}", depths, train_imsize=train, test_imsize=test
        )
    # timm's own NFNets: narrower bottlenecks, SiLU, gamma in the convs, symmetric padding.
    light = dict(
        group_size=64,
        bottleneck_ratio=0.25,
        activation="silu",
        gamma_in_activation=False,
        same_padding=False,
        skipinit=False,
    )
    configs["nfnet_l0"] = TimmNFNetConfig(
        "nfnet_l0", (1, 2, 6, 3), num_features=2304, se_ratio=0.25, **light,
        train_imsize=224, test_imsize=288,
    )  # fmt: skip
    for name, depths, num_features, train, test in (
        ("eca_nfnet_l0", (1, 2, 6, 3), 2304, 224, 288),
        ("eca_nfnet_l1", (2, 4, 12, 6), 3072, 256, 320),
        ("eca_nfnet_l2", (3, 6, 18, 9), 3072, 320, 384),
    ):
        configs[name] = TimmNFNetConfig(
            name, depths, num_features=num_features, attention="eca", **light,
            train_imsize=train, test_imsize=test,
        )  # fmt: skip
    return configs


TIMM_NFNET_VARIANTS: dict[str, TimmNFNetConfig] = _variants()

# timm state_dict keys -> NNX paths: module (regex, full match) -> (NNX template, {timm
# parameter: (NNX parameter, layout)}). Layouts are defined in `agc_optax.models.weights`:
# "oihw" conv kernels become HWIO, "gain" (O, 1, 1, 1) becomes (O,), "conv_as_linear" 1x1
# conv weights (out, in, 1, 1) become (in, out) Dense kernels, "linear" (out, in) becomes
# (in, out), "eca" (1, 1, k) becomes (k,), None is copied as is.
_WS_CONV = {"weight": ("kernel", "oihw"), "bias": ("bias", None), "gain": ("gain", "gain")}
_CONV_AS_LINEAR = {"weight": ("kernel", "conv_as_linear"), "bias": ("bias", None)}
_BLOCK = r"stages\.(\d+)\.(\d+)"
TIMM_NAMES = TimmNames(
    {
        r"stem\.(conv[1-4])": (r"stem/\1", _WS_CONV),
        _BLOCK + r"\.downsample\.conv": (r"stages/\1/\2/downsample", _WS_CONV),
        _BLOCK + r"\.(conv1|conv2|conv2b|conv3)": (r"stages/\1/\2/\3", _WS_CONV),
        _BLOCK + r"\.attn_last\.fc1": (r"stages/\1/\2/attn_last/fc0", _CONV_AS_LINEAR),
        _BLOCK + r"\.attn_last\.fc2": (r"stages/\1/\2/attn_last/fc1", _CONV_AS_LINEAR),
        _BLOCK + r"\.attn_last\.conv": (r"stages/\1/\2/attn_last", {"weight": ("kernel", "eca")}),
        _BLOCK: (r"stages/\1/\2", {"skipinit_gain": ("skip_gain", None)}),
        "final_conv": ("final_conv", _WS_CONV),
        r"head\.fc": ("head", {"weight": ("kernel", "linear"), "bias": ("bias", None)}),
    }
)


#: AGC's unit rules for a model built with ``scan_blocks=True``: a stacked leaf's units are one
#: block's, per layer (see `agc_optax.models.layers.stacked_unit_axes`); ECA's 1-D kernel is one
#: unit per block, so one per layer.
SCANNED_UNIT_AXES = stacked_unit_axes(r"stages/\d+/\d+/block/", ["attn_last/kernel"])


class _ConvFactory:
    """Builds the scaled-WS convs of one model: its epsilon, gamma placement and padding."""

    def __init__(self, config: TimmNFNetConfig, conv_class: type[WSConv] = WSConv, **kw: Any):
        self.config = config
        self.conv_class = conv_class
        self.gamma = 1.0 if config.gamma_in_activation else GAMMAS[config.activation]
        self.kw = kw

    def with_rngs(self, rngs: nnx.Rngs) -> _ConvFactory:
        """The same factory drawing from ``rngs`` (a stacked block's per-layer streams)."""
        return _ConvFactory(self.config, self.conv_class, **{**self.kw, "rngs": rngs})

    def with_class(self, conv_class: type[WSConv]) -> _ConvFactory:
        """The same factory building ``conv_class`` (a `WSConv` subclass)."""
        return _ConvFactory(self.config, conv_class, **self.kw)

    def __call__(
        self, in_features: int, out_features: int, kernel: int, stride: int = 1, groups: int = 1
    ) -> WSConv:
        if self.config.same_padding:
            padding: Any = "SAME"
        else:
            pad = ((stride - 1) + (kernel - 1)) // 2
            padding = ((pad, pad), (pad, pad))
        return self.conv_class(
            in_features,
            out_features,
            kernel,
            strides=stride,
            feature_group_count=groups,
            padding=padding,
            epsilon=self.config.ws_epsilon,
            gamma=self.gamma,
            **self.kw,
        )


def _activation(config: TimmNFNetConfig) -> Callable[[Array], Array]:
    fn = _ACTIVATIONS[config.activation]
    if not config.gamma_in_activation:
        return fn
    gamma = GAMMAS[config.activation]
    return lambda x: fn(x) * gamma


class Stem(nnx.Module):
    """timm's deep-quad stem: 3x3 convs to ``width // 8`` s2, ``// 4``, ``// 2``, ``width`` s2."""

    def __init__(
        self,
        in_features: int,
        width: int,
        conv: _ConvFactory,
        activation: Callable[[Array], Array],
    ):
        self.activation = activation
        self.conv1 = conv(in_features, width // 8, 3, stride=2)
        self.conv2 = conv(width // 8, width // 4, 3)
        self.conv3 = conv(width // 4, width // 2, 3)
        self.conv4 = conv(width // 2, width, 3, stride=2)

    def forward_with_tap(self, x: Array) -> tuple[Array, Array]:
        """Returns ``(conv3's output, the stem's output)``; timm taps the first at stride 2."""
        x = self.activation(self.conv1(x))
        x = self.activation(self.conv2(x))
        tap = self.conv3(x)
        # No activation after conv4: each block starts with one.
        return tap, self.conv4(self.activation(tap))

    def __call__(self, x: Array) -> Array:
        return self.forward_with_tap(x)[1]


class TimmNFBlock(nnx.Module):
    """timm's ``NormFreeBlock`` with ``extra_conv`` (see the module docstring for the figure).

    Args:
      in_features: input channels.
      out_features: output channels.
      config: the variant (bottleneck, groups, attention, skipinit).
      conv: the model's conv factory.
      activation: the model's activation.
      stride: stride of ``conv2`` and of the shortcut's average pool.
      beta: input scale, ``1 / sqrt(expected variance)``.
      drop_path_rate: per-example drop rate of the branch (timm's DropPath, rescaled).
      param_dtype: parameter dtype.
      dtype: computation dtype.
      rngs: ``nnx.Rngs`` with ``params`` and (for training) ``dropout`` streams.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        config: TimmNFNetConfig,
        conv: _ConvFactory,
        activation: Callable[[Array], Array],
        stride: int = 1,
        beta: float = 1.0,
        drop_path_rate: float = 0.0,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        conv = conv.with_rngs(rngs)
        width = make_divisible(out_features * config.bottleneck_ratio)
        groups = width // config.group_size
        if groups < 1:
            raise ValueError(
                f"TimmNFBlock: bottleneck width {width} is below `group_size` "
                f"{config.group_size}; use wider stages"
            )
        if config.group_size % _CHANNEL_DIVISOR == 0:
            width = config.group_size * groups  # timm snaps the width to whole groups.
        self.in_features, self.out_features = in_features, out_features
        self.width, self.groups, self.stride = width, groups, stride
        self.beta, self.alpha = beta, config.alpha
        self.attention_gain = config.attention_gain
        self.activation = activation
        has_projection = in_features != out_features or stride != 1
        self.downsample = conv(in_features, out_features, 1) if has_projection else None
        self.conv1 = conv(in_features, width, 1)
        self.conv2 = conv(width, width, 3, stride=stride, groups=groups)
        self.conv2b = conv(width, width, 3, groups=groups)
        self.conv3 = conv(width, out_features, 1)
        if not config.skipinit:  # Without a skip gain, timm zero-initializes conv3's gain.
            self.conv3.gain = nnx.Param(jnp.zeros((out_features,), param_dtype))
        if config.attention == "se":
            hidden = make_divisible(out_features * config.se_ratio, round_limit=0.0)
            self.attn_last: nnx.Module = SqueezeExcite(
                out_features,
                out_features,
                hidden_features=hidden,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        else:
            self.attn_last = EfficientChannelAttention(
                out_features, param_dtype=param_dtype, rngs=rngs
            )
        self.stoch_depth = (
            StochasticDepth(drop_path_rate, scale_by_keep=True, rngs=rngs)
            if 0.0 < drop_path_rate < 1.0
            else None
        )
        self.skip_gain = nnx.Param(jnp.zeros((), param_dtype)) if config.skipinit else None

    def __call__(
        self,
        x: Array,
        *,
        beta: float | Array | None = None,
        stochdepth_rate: float | Array | None = None,
    ) -> tuple[Array, Array]:
        """Runs the block on ``(N, H, W, in_features)``; returns ``(output, res_avg_var)``.

        ``beta`` and ``stochdepth_rate`` (the drop-path rate) override the block's own (a
        `agc_optax.models.layers.BlockStack` passes them per layer).
        """
        out = self.activation(x) * (self.beta if beta is None else beta)
        shortcut = pooled_shortcut(x, out, self.stride, self.downsample)
        out = self.conv1(out)
        out = self.conv2(self.activation(out))
        out = self.conv2b(self.activation(out))
        out = self.conv3(self.activation(out))
        out = (out * self.attn_last(out)) * self.attention_gain
        return nf_residual(self, out, shortcut, stochdepth_rate)


def _identity_block(features: int, *, stochdepth_rate: float, **kw: Any) -> TimmNFBlock:
    """A block keeping shape and channels, with the keywords of `residual_run`."""
    return TimmNFBlock(features, features, drop_path_rate=stochdepth_rate, **kw)


class TimmNFNet(ClassifierHead, nnx.Module):
    """timm's NFNets in Flax NNX: loads timm's checkpoints and reproduces their logits.

    Args:
      num_classes: classifier outputs; 0 builds no classifier (the model returns its pooled
        features, as timm does).
      variant: a key of `TIMM_NFNET_VARIANTS` (``"dm_nfnet_f0"``, ``"eca_nfnet_l0"``, ...) or a
        `TimmNFNetConfig`.
      widths: stage widths, replacing the variant's (timm's ``channels``; rounded to 8).
      depths: blocks per stage, replacing the variant's.
      num_features: ``final_conv`` channels, replacing the variant's (not derived from
        ``widths``, as in timm).
      drop_rate: dropout before the classifier (timm's default 0).
      drop_path_rate: drop-path rate of the last block, linear from 0 over all blocks.
      scan_blocks: stack each stage's identity-shortcut blocks (all but the first, when there
        are at least two) into an `agc_optax.models.layers.BlockStack` run with ``nnx.scan``,
        which compiles one block per stage instead of every block. Outputs and parameter
        counts are unchanged; those leaves gain a leading layer axis
        (``stages/<s>/1/block/conv2/kernel`` holds timm's ``stages.<s>.1`` ...
        ``stages.<s>.<depth - 1>``), so AGC needs the unit rules of ``agc_unit_axes`` (the
        training code passes them on), and `agc_optax.models.load_timm_state_dict` fills them
        from timm's per-block keys. ``"auto"`` resolves per backend as NFNet's does
        (`agc_optax.models.layers.resolve_scan_blocks`); the attribute holds the resolved bool.
      canonical_conv_grads: build every weight-standardized conv (stem, blocks, transitions,
        ``final_conv``; unrolled or stacked) as `agc_optax.models.CanonicalGradWSConv`, whose
        gradients XLA:CPU runs faster (ECA-NFNet-L0's bare train step: 0.41x the time at batch 8,
        128 px; a CPU training loop of your own wants it on); reverse-mode differentiation only
        (what it changes and costs: `agc_optax.models.canonical_conv.wsconv_class`). ``agc-train``
        turns it on for training; the attribute holds the bool.
      in_features: input channels.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); weight standardization stays float32.
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` with a ``params`` stream, and ``dropout`` for training.

    Inputs are NHWC (timm's NCHW images transposed), normalized with timm's ImageNet mean and
    std for its pretrained weights.

    Example (shapes only; ``nnx.eval_shape`` allocates nothing):
      >>> import jax
      >>> from flax import nnx
      >>> model = nnx.eval_shape(lambda: TimmNFNet(10, "eca_nfnet_l0", rngs=nnx.Rngs(0)))
      >>> images = jax.ShapeDtypeStruct((2, 224, 224, 3), "float32")
      >>> nnx.eval_shape(lambda m, x: m(x), model, images).shape, model.num_features
      ((2, 10), 2304)
      >>> nnx.eval_shape(lambda m, x: m.forward_features(x), model, images).shape
      (2, 7, 7, 2304)

    Attributes:
      stem, stages, final_conv, dropout, head: the submodules; ``stages`` is a list of lists
        of `TimmNFBlock`, so leaf paths read ``stages/1/0/conv2/kernel`` like timm's keys.
      config: the resolved `TimmNFNetConfig`.
      num_features: channels of the features the head reads.
    """

    timm_names: ClassVar[TimmNames] = TIMM_NAMES

    def __init__(
        self,
        num_classes: int = 1000,
        variant: str | TimmNFNetConfig = "eca_nfnet_l0",
        *,
        widths: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        num_features: int | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        scan_blocks: bool | str = False,
        canonical_conv_grads: bool = False,
        in_features: int = 3,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        config = resolve_config(
            variant,
            TIMM_NFNET_VARIANTS,
            TimmNFNetConfig,
            widths=widths,
            depths=depths,
            num_features=num_features,
        )
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"`drop_rate`: expected a value in [0, 1), got {drop_rate}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"`drop_path_rate`: expected a value in [0, 1), got {drop_path_rate}")
        self.config = config
        self.train_imsize, self.test_imsize = config.train_imsize, config.test_imsize
        self.drop_rate = float(drop_rate)
        self.scan_blocks = resolve_scan_blocks(scan_blocks)
        self.activation = _activation(config)
        self.dtype, self.param_dtype = dtype, param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        conv = _ConvFactory(config, wsconv_class(canonical_conv_grads), **kw)
        self.canonical_conv_grads = conv.conv_class is CanonicalGradWSConv

        ch = make_divisible(config.stem_width)
        self.stem = Stem(in_features, ch, conv, self.activation)
        num_blocks = sum(config.depths)
        # timm's expected variance: reset to 1 after a stage's first block, += alpha**2 after
        # every block; beta = 1 / sqrt(expected variance) of the block's input.
        expected_var, index, stages = 1.0, 0, []
        block_kw = dict(
            config=config, conv=conv, activation=self.activation, dtype=dtype,
            param_dtype=param_dtype,
        )  # fmt: skip

        for stage, (stage_width, depth) in enumerate(
            zip(config.widths, config.depths, strict=True)
        ):
            out_ch = make_divisible(stage_width)
            run_betas, run_rates = [], []
            for block in range(depth):
                rate = drop_path_rate * index / (num_blocks - 1) if num_blocks > 1 else 0.0
                beta = 1.0 / math.sqrt(expected_var)
                if block == 0:  # Changes the shape; the stage's other blocks share one structure.
                    first = TimmNFBlock(
                        ch,
                        out_ch,
                        stride=2 if stage > 0 else 1,
                        beta=beta,
                        drop_path_rate=rate,
                        rngs=rngs,
                        **block_kw,
                    )
                    expected_var = 1.0
                else:
                    run_betas.append(beta)
                    run_rates.append(rate)
                expected_var += config.alpha**2
                ch, index = out_ch, index + 1
            identity = functools.partial(_identity_block, ch, **block_kw)
            # Stacked blocks build CanonicalGradWSConv: same parameters and outputs, gradients
            # that stay fast in a loop on CPU (`agc_optax.models.canonical_conv`).
            rest = residual_run(
                identity,
                run_betas,
                run_rates,
                scan=self.scan_blocks,
                rngs=rngs,
                stacked_kwargs=dict(conv=conv.with_class(CanonicalGradWSConv)),
            )
            stages.append(nnx.List([first, *rest]))
        self.stages = nnx.List(stages)
        self.num_features = make_divisible(config.num_features)
        self.final_conv = conv(ch, self.num_features, 1)
        self.dropout = nnx.Dropout(self.drop_rate, rngs=rngs)
        self.fc_init = nnx.initializers.normal(0.01)  # timm's init of head.fc
        self.num_classes = check_num_classes(num_classes)
        self.head = self._new_head(self.num_classes, rngs)

    def stage_block_locations(self) -> list[list[tuple[int, int | None]]]:
        """Per stage, timm's block index -> ``(position in the stage, layer)`` (``layer``: the
        index along a stacked block's layer axis, ``None`` for a plain block); what
        `agc_optax.models.load_timm_state_dict` uses to fill stacked leaves."""
        return [block_locations(stage) for stage in self.stages]

    @property
    def agc_unit_axes(self) -> list[tuple[str, tuple[int, ...]]] | None:
        """AGC's unit rules for this parameter layout: `SCANNED_UNIT_AXES` with
        ``scan_blocks=True``, else ``None`` (the default rules fit). Training code passes it on
        as ``unit_axes``."""
        return SCANNED_UNIT_AXES if self.scan_blocks else None

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's ``feature_info``: one backbone feature per reduction, as
        ``{"num_chs", "reduction", "module"}``; ``module`` keys `forward_intermediates`.

        The stem's ``conv3`` (stride 2), every stage but the last, then ``final_conv`` (before
        its activation) in place of the last stage, as in timm.
        """
        info = [dict(num_chs=self.stem.conv3.out_features, reduction=2, module="stem.conv3")]
        reduction = 4
        for i, stage in enumerate(self.stages[:-1]):
            info.append(
                dict(num_chs=stage[0].out_features, reduction=reduction, module=f"stages.{i}")
            )
            reduction *= 2
        info.append(dict(num_chs=self.num_features, reduction=reduction, module="final_conv"))
        return info

    def forward_intermediates(self, x: Array) -> dict[str, Array]:
        """Every stage's output, keyed like timm's modules, for backbones and parity checks.

        Returns:
          ``{"stem.conv3", "stem", "stages.0", ..., "final_conv" (before its activation),
          "final_act", "pool"}``: NHWC feature maps and the pooled ``(N, num_features)``
          features. The maps that `feature_info` lists serve as a detection or segmentation
          backbone's features.
        """
        outputs: dict[str, Array] = {}
        outputs["stem.conv3"], outputs["stem"] = self.stem.forward_with_tap(x)
        out = outputs["stem"]
        for i, stage in enumerate(self.stages):
            for block in stage:
                out = block(out)[0]
            outputs[f"stages.{i}"] = out
        outputs["final_conv"] = self.final_conv(out)
        outputs["final_act"] = self.activation(outputs["final_conv"])
        outputs["pool"] = self.forward_head(outputs["final_act"], pre_logits=True)
        return outputs

    def forward_features(self, x: Array) -> Array:
        """The final feature map ``(N, H/32, W/32, num_features)``, after ``final_conv``'s
        activation (before pooling)."""
        out = self.stem(x)
        for stage in self.stages:
            for block in stage:
                out = block(out)[0]
        return self.activation(self.final_conv(out))

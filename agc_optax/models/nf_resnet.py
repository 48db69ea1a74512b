"""Normalizer-Free pre-activation ResNets (NF-ResNets), as in DeepMind's Haiku code.

The model follows ``nfnets/nf_resnet.py`` in google-deepmind/deepmind-research number for number:

* stem: a 7x7 stride-2 weight-standardized conv (with bias) followed by a 3x3 stride-2 SAME max
  pool whose padding is -inf, with no activation in between;
* body: bottleneck blocks ``out = act(x) * beta -> conv0 1x1 -> act -> conv1 3x3 (strided)
  -> act -> conv2 1x1 [-> 2 * SE(out) * out]``, returned as ``out * skip_gain * alpha + shortcut``,
  where the shortcut of a projection block is a strided 1x1 conv on ``act(x) * beta`` (no average
  pooling);
* head: ``pool = mean_hw(act(out))`` (no final conv), dropout, then the linear classifier ``head``.

``beta = 1 / expected_std`` keeps the input of every residual branch at unit variance at
initialization; ``expected_std`` grows by ``alpha^2`` in variance after every block and is reset to
one after the first block of each stage (`agc_optax.models.layers.nf_schedule`, shared by the NF
families).

References:
  Brock, De, Smith. Characterizing signal propagation to close the performance gap in unnormalized
  ResNets. ICLR 2021, arXiv:2101.08692.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from agc_optax.models import layers
from agc_optax.models._config import check_num_classes, check_stages, resolve_config
from agc_optax.models.canonical_conv import CanonicalGradWSConv, wsconv_class
from agc_optax.models.weights import HaikuNames

Initializer = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class NFResNetConfig:
    """One NF-ResNet variant (DeepMind's ``NF_ResNet.variant_dict`` entry).

    Attributes:
      variant: the name, e.g. ``"ResNet50"``.
      widths: output channels per stage, before the model's ``width`` multiplier.
      depths: bottleneck blocks per stage.
      drop_rate: dropout before the classifier when the constructor gets ``drop_rate=None``.
        DeepMind's table has none for NF-ResNets (its ``drop_rate=None`` default raises a
        ``KeyError``); zero is what every published configuration passes.
    """

    variant: str
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        check_stages(self, ("depths",))


NF_RESNET_VARIANTS: dict[str, NFResNetConfig] = {
    name: NFResNetConfig(name, (64, 128, 256, 512), depths)
    for name, depths in {
        # Not an official DeepMind variant: the depth used by the reference parity data.
        "ResNet26": (2, 2, 2, 2),
        "ResNet50": (3, 4, 6, 3),
        "ResNet101": (3, 4, 23, 3),
        "ResNet152": (3, 8, 36, 3),
        "ResNet200": (3, 24, 36, 3),
        "ResNet288": (24, 24, 24, 24),
        "ResNet600": (50, 50, 50, 50),
    }.items()
}

# DeepMind's Haiku names -> NNX paths (read by `agc_optax.models.load_haiku_params`). The stem
# conv has a bias although DeepMind's constructor says with_bias=False: WSConv2D always has one.
HAIKU_NAMES = HaikuNames(
    top_level="NF_ResNet",
    layers={
        "initial_conv": ("stem/conv", layers.WS_CONV_PARAMS),
        "linear": ("head", layers.LINEAR_PARAMS),
    },
    blocks="nf_res_block",
    block_layers=layers.NF_BLOCK_LAYERS,
)


#: AGC's unit rules for a model built with ``scan_blocks=True``: a stacked leaf's units are one
#: block's, per layer (see `layers.stacked_unit_axes`).
SCANNED_UNIT_AXES = layers.stacked_unit_axes(r"blocks/\d+/block/")


def _conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    strides: int = 1,
    scaled: bool,
    conv: type[layers.WSConv] = layers.WSConv,
    dtype: Any,
    param_dtype: Any,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """A weight-standardized conv (of class ``conv``), or a plain He-initialized conv for the
    unscaled baseline."""
    if scaled:
        return conv(
            in_features,
            out_features,
            kernel_size,
            strides=strides,
            padding="SAME",
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
    # He init preserves the second moment through relu + conv, which is the textbook unnormalized
    # ResNet the paper contrasts NF-ResNets with.
    return nnx.Conv(
        in_features,
        out_features,
        (kernel_size, kernel_size),
        strides=strides,
        padding="SAME",
        use_bias=True,
        kernel_init=nnx.initializers.variance_scaling(2.0, "fan_in", "normal"),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class NFResBlock(nnx.Module):
    """Normalizer-free pre-activation bottleneck block.

    Args:
      in_features: input channels.
      out_features: output channels; the bottleneck has ``int(out_features * bottleneck_ratio)``.
      stride: stride of ``conv1`` and of the shortcut conv.
      beta: the input scale ``1 / expected_std``.
      alpha: the residual-branch scale.
      activation: the (gamma-scaled) nonlinearity.
      stochdepth_rate: stochastic-depth drop rate; none is used outside ``(0, 1)``.
      skipinit_gain: initializer of the scalar ``skip_gain``.
      use_se: whether to add squeeze-excite on the block output.
      se_ratio: squeeze-excite hidden ratio.
      bottleneck_ratio: bottleneck width over ``out_features``.
      scaled: ``False`` builds the unscaled, unnormalized variant (plain convs).
      conv: the weight-standardized conv class (`NFResNet` passes
        `agc_optax.models.canonical_conv.CanonicalGradWSConv` to stacked blocks: same
        parameters and outputs, gradients that stay fast in a loop on CPU).
      dtype: computation dtype.
      param_dtype: parameter dtype.
      rngs: random keys.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        stride: int = 1,
        beta: float = 1.0,
        alpha: float = 0.2,
        activation: Callable[[jax.Array], jax.Array],
        stochdepth_rate: float | None = None,
        skipinit_gain: Initializer = nnx.initializers.zeros,
        use_se: bool = False,
        se_ratio: float = 0.25,
        bottleneck_ratio: float = 0.25,
        scaled: bool = True,
        conv: type[layers.WSConv] = layers.WSConv,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.stride = stride
        self.beta, self.alpha = beta, alpha
        self.activation = activation
        self.width = int(out_features * bottleneck_ratio)
        if self.width < 1:
            raise ValueError(
                f"`bottleneck_ratio`={bottleneck_ratio} gives a bottleneck of {self.width} "
                f"channels for {out_features} output channels; use wider stages"
            )
        conv = dict(scaled=scaled, conv=conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.use_projection = stride > 1 or in_features != out_features
        self.conv_shortcut = (
            _conv(in_features, out_features, 1, strides=stride, **conv)
            if self.use_projection
            else None
        )
        self.conv0 = _conv(in_features, self.width, 1, **conv)
        self.conv1 = _conv(self.width, self.width, 3, strides=stride, **conv)
        self.conv2 = _conv(self.width, out_features, 1, **conv)
        self.stoch_depth = layers.optional_stochastic_depth(stochdepth_rate, rngs)
        self.se = (
            layers.SqueezeExcite(out_features, out_features, se_ratio, rngs=rngs)
            if use_se
            else None
        )
        self.skip_gain = nnx.Param(skipinit_gain(rngs.params(), (), param_dtype))

    def __call__(
        self,
        x: jax.Array,
        *,
        beta: float | jax.Array | None = None,
        stochdepth_rate: float | jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Returns ``(output, residual-branch average channel variance)``.

        ``beta`` and ``stochdepth_rate`` override the block's own (a `layers.BlockStack` passes
        them per layer).
        """
        out = self.activation(x) * (self.beta if beta is None else beta)
        shortcut = self.conv_shortcut(out) if self.conv_shortcut is not None else x
        out = self.conv0(out)
        out = self.conv1(self.activation(out))
        out = self.conv2(self.activation(out))
        if self.se is not None:
            out = 2 * self.se(out) * out
        return layers.nf_residual(self, out, shortcut, stochdepth_rate)


class Stem(nnx.Module):
    """7x7 stride-2 conv and a 3x3 stride-2 max pool (SAME, -inf padding), no activation."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        scaled: bool,
        conv: type[layers.WSConv] = layers.WSConv,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.conv = _conv(
            in_features,
            out_features,
            7,
            strides=2,
            scaled=scaled,
            conv=conv,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.max_pool_same(self.conv(x), 3, 2)


class NFResNet(layers.ClassifierHead, nnx.Module):
    """Normalizer-Free pre-activation ResNet (DeepMind's ``NF_ResNet``).

    Keyword names and defaults follow DeepMind's constructor. The unscaled baseline of the paper's
    signal-propagation plots (an unnormalized ResNet without scaling) is
    ``NFResNet(..., scaled=False)``: plain He-initialized convs instead of weight standardization,
    ``beta = alpha = 1``, ``skip_gain`` initialized to one and activations without gamma.

    Args:
      num_classes: classifier outputs; 0 builds no classifier (the model returns its pooled
        features).
      variant: a key of :data:`NF_RESNET_VARIANTS` (``'ResNet26'``, ``'ResNet50'`` ...) or an
        `NFResNetConfig`.
      width: width multiplier: stages have ``widths * width`` channels (``(64, 128, 256, 512)``
        for DeepMind's variants) and the stem ``int(16 * width)``.
      alpha: residual-branch scale.
      stochdepth_rate: stochastic-depth rate of the last block (linear in the block index).
      drop_rate: dropout before the classifier; ``None`` takes the variant's (zero).
      activation: name of a gamma-scaled activation in :data:`agc_optax.models.layers.GAMMAS`.
      fc_init: initializer of ``head/kernel``; ``None`` gives DeepMind's N(0, 0.01).
      skipinit_gain: initializer of every block's scalar ``skip_gain`` (zeros: SkipInit).
      use_se: squeeze-excite on each block output.
      se_ratio: squeeze-excite hidden ratio.
      widths: stage widths before the ``width`` multiplier, replacing the variant's; the first
        stage has stride 1, every later one stride 2.
      depths: explicit blocks per stage, replacing the variant's.
      stem_width: explicit stem channels, replacing ``int(16 * width)``.
      scaled: ``False`` builds the unscaled, unnormalized comparison model (see above).
      scan_blocks: stack each stage's identity-shortcut blocks (all but the first, when there
        are at least two) into a `layers.BlockStack` run with ``nnx.scan``, which compiles one
        block per stage instead of every block. Outputs, metrics and parameter counts are
        unchanged; those leaves gain a leading layer axis (``blocks/<i>/block/conv0/kernel``),
        so AGC needs the unit rules of ``agc_unit_axes`` (the training code passes them on),
        and `agc_optax.models.load_haiku_params` fills them from DeepMind's per-block names.
        ``"auto"`` resolves per backend as for every family
        (`agc_optax.models.layers.resolve_scan_blocks`); the attribute holds the resolved bool.
      canonical_conv_grads: build every weight-standardized conv (stem, blocks, transitions,
        ``final_conv``; unrolled or stacked) as `agc_optax.models.CanonicalGradWSConv`, whose
        gradients XLA:CPU runs faster (NF-ResNet-50's train step: 0.75-0.82x the time at batch 16,
        128 px); reverse-mode differentiation only (what it changes and costs:
        `agc_optax.models.canonical_conv.wsconv_class`). ``agc-train`` turns it on for training; the
        attribute holds the bool.
      in_features: input channels.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); weight standardization stays float32.
      param_dtype: parameter dtype.
      rngs: keys for ``params``, ``dropout`` and stochastic depth.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> model = NFResNet(10, variant="ResNet26", width=1, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((1, 32, 32, 3))).shape
      (1, 10)
    """

    haiku_names: ClassVar[HaikuNames] = HAIKU_NAMES

    def __init__(
        self,
        num_classes: int,
        variant: str | NFResNetConfig = "ResNet50",
        width: float = 4,
        alpha: float = 0.2,
        stochdepth_rate: float = 0.1,
        drop_rate: float | None = None,
        activation: str = "relu",
        fc_init: Initializer | None = None,
        skipinit_gain: Initializer = nnx.initializers.zeros,
        use_se: bool = False,
        se_ratio: float = 0.25,
        *,
        widths: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        stem_width: int | None = None,
        scaled: bool = True,
        scan_blocks: bool | str = False,
        canonical_conv_grads: bool = False,
        in_features: int = 3,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        config = resolve_config(
            variant, NF_RESNET_VARIANTS, NFResNetConfig, widths=widths, depths=depths
        )
        self.config = config
        self.variant = config.variant
        self.depths = config.depths
        # As in NFNet and NF-RegNet, `width` multiplies the (variant's or given) stage widths.
        self.widths = tuple(int(w * width) for w in config.widths)
        self.drop_rate = float(config.drop_rate if drop_rate is None else drop_rate)
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"`drop_rate`={drop_rate} must be in [0, 1)")
        self.scaled = scaled
        self.scan_blocks = layers.resolve_scan_blocks(scan_blocks)
        conv = wsconv_class(canonical_conv_grads)
        self.canonical_conv_grads = conv is CanonicalGradWSConv
        self.activation = layers.scaled_activation(activation) if scaled else _plain(activation)
        if not scaled:
            alpha = 1.0
            skipinit_gain = nnx.initializers.ones
        self.alpha = alpha
        ch = int(16 * width) if stem_width is None else int(stem_width)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.stem = Stem(in_features, ch, scaled=scaled, conv=conv, **common)

        blocks: list[nnx.Module] = []
        schedule = iter(layers.nf_schedule(self.depths, alpha, stochdepth_rate))
        strides = (1,) + (2,) * (len(self.widths) - 1)
        block_kw = dict(
            alpha=alpha,
            activation=self.activation,
            skipinit_gain=skipinit_gain,
            use_se=use_se,
            se_ratio=se_ratio,
            scaled=scaled,
            conv=conv,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        for stage, (block_width, stride) in enumerate(zip(self.widths, strides, strict=True)):
            # The stage's first block changes the shape; the others share one structure.
            run_betas, run_rates = [], []
            for _ in range(self.depths[stage]):
                block_index, beta, rate, _ = next(schedule)
                beta = beta if scaled else 1.0
                if block_index > 0:
                    run_betas.append(beta)
                    run_rates.append(rate)
                    continue
                blocks.append(
                    NFResBlock(
                        ch,
                        block_width,
                        stride=stride,
                        beta=beta,
                        stochdepth_rate=rate,
                        rngs=rngs,
                        **block_kw,
                    )
                )
                ch = block_width
            identity = functools.partial(NFResBlock, ch, ch, **block_kw)
            blocks += layers.residual_run(
                identity,
                run_betas,
                run_rates,
                scan=self.scan_blocks,
                rngs=rngs,
                stacked_kwargs=dict(conv=CanonicalGradWSConv),
            )
        self.blocks = nnx.List(blocks)
        self.dropout = nnx.Dropout(self.drop_rate, rngs=rngs)
        self.num_features = ch
        self.dtype, self.param_dtype = dtype, param_dtype
        self.fc_init = nnx.initializers.normal(0.01) if fc_init is None else fc_init
        self.num_classes = check_num_classes(num_classes)
        self.head = self._new_head(self.num_classes, rngs)

    def block_locations(self) -> list[tuple[int, int | None]]:
        """Maps DeepMind's global block index to ``(position in blocks, layer)`` (``layer``:
        the index along a `layers.BlockStack`'s stacked axis, ``None`` for a plain block)."""
        return layers.block_locations(self.blocks)

    @property
    def agc_unit_axes(self) -> list[tuple[str, tuple[int, ...]]] | None:
        """AGC's unit rules for this parameter layout: `SCANNED_UNIT_AXES` with
        ``scan_blocks=True``, else ``None`` (the default rules fit). Training code passes it on
        as ``unit_axes``."""
        return SCANNED_UNIT_AXES if self.scan_blocks else None

    def _trunk(self, x: jax.Array, return_metrics: bool) -> tuple[jax.Array, dict[str, Any]]:
        out, outputs = layers.run_residual_blocks(self.stem(x), self.blocks, return_metrics)
        return self._finish(out), outputs

    def _finish(self, out: jax.Array) -> jax.Array:
        return self.activation(out)

    def forward_features(self, x: jax.Array) -> jax.Array:
        """The final feature map ``(N, H/32, W/32, num_features)``: the last block's output
        after the activation, before pooling (timm's ``forward_features``)."""
        return self._trunk(x, False)[0]

    def forward_outputs(self, x: jax.Array, *, return_metrics: bool = False) -> dict[str, Any]:
        """Runs the network on NHWC images; returns DeepMind's output dict.

        ``{'pool', 'logits'}``, plus with ``return_metrics`` the signal metrics of every block
        (keys as in `layers.run_residual_blocks`; the residual branch before the skip gain).
        """
        features, outputs = self._trunk(x, return_metrics)
        outputs["pool"] = self.forward_head(features, pre_logits=True)
        outputs["logits"] = self.forward_head(features)
        return outputs


def _plain(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation ``name`` without its gamma, for the unscaled baseline."""
    scaled = layers.scaled_activation(name)  # raises the ValueError for unknown names
    gamma = layers.GAMMAS[name]
    return lambda x: scaled(x) / gamma

"""Normalizer-Free RegNets (NF-RegNet B0-B8), as in DeepMind's Haiku code.

The model follows ``nfnets/nf_regnet.py`` of google-deepmind/deepmind-research:

* stem: one 3x3 stride-2 weight-standardized conv, no activation and no pooling;
* body: four stages whose first block has stride 2. A block computes ``out = act(x) * beta``;
  the shortcut is ``conv_shortcut(avg_pool_2x2(out))`` when strided (the average excludes padded
  cells), ``conv_shortcut(out)`` on a channel change and ``x`` otherwise; the branch is
  ``conv0 1x1 -> act -> conv1 3x3 grouped (strided) -> 2 * SE(.) * . -> act -> conv2 1x1``, with
  squeeze-excite on the expanded width, and the block returns ``out * skip_gain * alpha +
  shortcut``. The expanded width is ``in * expansion`` rounded down to a multiple of
  ``group_size``; the very first block uses an expansion of one, as EfficientNet does;
* head: ``final_conv`` 1x1 to ``1280 * ch // 440`` channels, act, spatial mean, dropout and the
  zero-initialized linear classifier ``head``.

The constructor's defaults are DeepMind's training arguments (``experiment_nf_regnets.py``):
width 0.75, expansion 2.25, group size 8, SE ratio 0.5, alpha 0.2, stochastic depth 0.1, the
variant's dropout and ``silu``; the registry's ``nf_regnet_b*`` models are built with them.

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
class NFRegNetConfig:
    """One NF-RegNet variant (a row of DeepMind's ``nf_regnet_params``).

    Attributes:
      variant: the name, e.g. ``"B0"``.
      widths: output channels per stage, before the model's ``width`` multiplier.
      depths: blocks per stage.
      train_imsize: training resolution.
      test_imsize: evaluation resolution.
      drop_rate: dropout before the classifier.
    """

    variant: str
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    train_imsize: int
    test_imsize: int
    drop_rate: float

    def __post_init__(self) -> None:
        check_stages(self, ("depths",))


NF_REGNET_VARIANTS: dict[str, NFRegNetConfig] = {
    config.variant: config
    for config in (
        NFRegNetConfig("B0", (48, 104, 208, 440), (1, 3, 6, 6), 192, 224, 0.2),
        NFRegNetConfig("B1", (48, 104, 208, 440), (2, 4, 7, 7), 224, 256, 0.2),
        NFRegNetConfig("B2", (56, 112, 232, 488), (2, 4, 8, 8), 240, 272, 0.3),
        NFRegNetConfig("B3", (56, 128, 248, 528), (2, 5, 9, 9), 288, 320, 0.3),
        NFRegNetConfig("B4", (64, 144, 288, 616), (2, 6, 11, 11), 320, 384, 0.4),
        NFRegNetConfig("B5", (80, 168, 336, 704), (3, 7, 14, 14), 384, 456, 0.4),
        NFRegNetConfig("B6", (88, 184, 376, 792), (3, 8, 16, 16), 448, 528, 0.5),
        NFRegNetConfig("B7", (96, 208, 416, 880), (4, 10, 19, 19), 512, 600, 0.5),
        NFRegNetConfig("B8", (104, 232, 456, 968), (4, 11, 22, 22), 600, 672, 0.5),
    )
}

# DeepMind's Haiku names -> NNX paths (read by `agc_optax.models.load_haiku_params`).
HAIKU_NAMES = HaikuNames(
    top_level="NF_RegNet",
    layers={
        "initial_conv": ("stem/conv", layers.WS_CONV_PARAMS),
        "final_conv": ("final_conv", layers.WS_CONV_PARAMS),
        "linear": ("head", layers.LINEAR_PARAMS),
    },
    blocks="nf_block",
    block_layers=layers.NF_BLOCK_LAYERS,
)


#: AGC's unit rules for a model built with ``scan_blocks=True``: a stacked leaf's units are one
#: block's, per layer (see `layers.stacked_unit_axes`).
SCANNED_UNIT_AXES = layers.stacked_unit_axes(r"blocks/\d+/block/")


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    # DeepMind's constructor default is 'swish', a name missing from its own table (the default
    # raises a KeyError there); every experiment passes 'silu', the same function.
    return layers.scaled_activation("silu" if name == "swish" else name)


class NFRegNetBlock(nnx.Module):
    """NF-RegNet inverted-bottleneck block with grouped 3x3 conv and squeeze-excite.

    Args:
      in_features: input channels.
      out_features: output channels.
      expansion: expanded width over ``in_features``, rounded down to a multiple of ``group_size``.
      se_ratio: squeeze-excite hidden ratio (of the expanded width).
      group_size: channels per group of ``conv1``.
      stride: stride of ``conv1`` and of the shortcut's average pool.
      beta: the input scale ``1 / expected_std``.
      alpha: the residual-branch scale.
      activation: the (gamma-scaled) nonlinearity.
      stochdepth_rate: stochastic-depth drop rate; none is used outside ``(0, 1)``.
      conv: the conv class (`NFRegNet` passes
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
        expansion: float = 2.25,
        se_ratio: float = 0.5,
        group_size: int = 8,
        stride: int = 1,
        beta: float = 1.0,
        alpha: float = 0.2,
        activation: Callable[[jax.Array], jax.Array],
        stochdepth_rate: float | None = None,
        conv: type[layers.WSConv] = layers.WSConv,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.stride = stride
        self.beta, self.alpha = beta, alpha
        self.activation = activation
        self.groups = int(in_features * expansion) // group_size
        if self.groups < 1:
            raise ValueError(
                f"`group_size`={group_size} exceeds the expanded width "
                f"{int(in_features * expansion)} of a block with {in_features} input channels; "
                "use a smaller group size or wider stages"
            )
        self.width = group_size * self.groups
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv0 = conv(in_features, self.width, 1, **common)
        self.conv1 = conv(
            self.width, self.width, 3, strides=stride, feature_group_count=self.groups, **common
        )
        self.se = layers.SqueezeExcite(self.width, self.width, se_ratio, **common)
        self.conv2 = conv(self.width, out_features, 1, **common)
        self.use_projection = stride > 1 or in_features != out_features
        # Unlike NF-ResNet, the projection is unstrided: striding is done by the average pool.
        self.conv_shortcut = (
            conv(in_features, out_features, 1, **common) if self.use_projection else None
        )
        self.stoch_depth = layers.optional_stochastic_depth(stochdepth_rate, rngs)
        self.skip_gain = nnx.Param(jnp.zeros((), param_dtype))

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
        shortcut = layers.pooled_shortcut(x, out, self.stride, self.conv_shortcut)
        out = self.conv1(self.activation(self.conv0(out)))
        # The factor 2 restores unit variance: a sigmoid gate averages about one half at init.
        out = 2 * self.se(out) * out
        out = self.conv2(self.activation(out))
        return layers.nf_residual(self, out, shortcut, stochdepth_rate)


class Stem(nnx.Module):
    """A single 3x3 stride-2 weight-standardized conv (of class ``conv``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        conv: type[layers.WSConv] = layers.WSConv,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.conv = conv(
            in_features, out_features, 3, strides=2, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class NFRegNet(layers.ClassifierHead, nnx.Module):
    """Normalizer-Free RegNet (DeepMind's ``NF_RegNet``).

    Keyword names and defaults follow DeepMind's constructor, except ``activation``: DeepMind's
    default ``'swish'`` is accepted as an alias of ``'silu'``, which its experiments use.

    Args:
      num_classes: classifier outputs; 0 builds no classifier (the model returns its pooled
        features).
      variant: a key of :data:`NF_REGNET_VARIANTS` (``'B0'`` ... ``'B8'``) or an
        `NFRegNetConfig`.
      width: multiplier of the variant's stage widths (each rounded down with ``int``).
      expansion: bottleneck expansion of every block but the first (which uses 1).
      group_size: channels per group of the 3x3 convs.
      se_ratio: squeeze-excite hidden ratio.
      alpha: residual-branch scale.
      stochdepth_rate: stochastic-depth rate of the last block (linear in the block index).
      drop_rate: dropout before the classifier; ``None`` takes the variant's.
      activation: name of a gamma-scaled activation in :data:`agc_optax.models.layers.GAMMAS`.
      fc_init: initializer of ``head/kernel`` (DeepMind: zeros).
      widths: explicit stage widths (before ``width``), replacing the variant's.
      depths: explicit blocks per stage, replacing the variant's.
      scan_blocks: stack each stage's identity-shortcut blocks (all but the first, when there
        are at least two) into a `layers.BlockStack` run with ``nnx.scan``, which compiles one
        block per stage instead of every block. Outputs, metrics and parameter counts are
        unchanged; those leaves gain a leading layer axis (``blocks/<i>/block/conv1/kernel``),
        so AGC needs the unit rules of ``agc_unit_axes`` (the training code passes them on),
        and `agc_optax.models.load_haiku_params` fills them from DeepMind's per-block names.
        ``"auto"`` resolves per backend as for every family
        (`agc_optax.models.layers.resolve_scan_blocks`); the attribute holds the resolved bool.
      canonical_conv_grads: build every weight-standardized conv (stem, blocks, transitions,
        ``final_conv``; unrolled or stacked) as `agc_optax.models.CanonicalGradWSConv`, whose
        gradients XLA:CPU runs faster (NF-RegNet-B0's bare train step: **0.034x** the time, 470 ms
        against 13.6 s at batch 16, 128 px, as JAX's gradients of its 8-channel groups are XLA:CPU's
        slowest convolutions; a CPU training loop of your own wants it on); reverse-mode
        differentiation only (what it changes and costs:
        `agc_optax.models.canonical_conv.wsconv_class`). ``agc-train`` turns it on for training; the
        attribute holds the bool.
      in_features: input channels.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); weight standardization stays float32.
      param_dtype: parameter dtype.
      rngs: keys for ``params``, ``dropout`` and stochastic depth.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> model = NFRegNet(10, "B0", depths=(1, 1, 1, 1), rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((1, 32, 32, 3))).shape
      (1, 10)
    """

    haiku_names: ClassVar[HaikuNames] = HAIKU_NAMES

    def __init__(
        self,
        num_classes: int,
        variant: str | NFRegNetConfig = "B0",
        width: float = 0.75,
        expansion: float = 2.25,
        group_size: int = 8,
        se_ratio: float = 0.5,
        alpha: float = 0.2,
        stochdepth_rate: float = 0.1,
        drop_rate: float | None = None,
        activation: str = "swish",
        fc_init: Initializer = nnx.initializers.zeros,
        *,
        widths: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        scan_blocks: bool | str = False,
        canonical_conv_grads: bool = False,
        in_features: int = 3,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        config = resolve_config(
            variant, NF_REGNET_VARIANTS, NFRegNetConfig, widths=widths, depths=depths
        )
        self.config = config
        self.variant = config.variant
        self.train_imsize, self.test_imsize = config.train_imsize, config.test_imsize
        self.depths = config.depths
        self.widths = tuple(int(w * width) for w in config.widths)
        self.drop_rate = float(config.drop_rate if drop_rate is None else drop_rate)
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"`drop_rate`={drop_rate} must be in [0, 1)")
        self.activation = _activation(activation)
        self.alpha = alpha
        self.scan_blocks = layers.resolve_scan_blocks(scan_blocks)
        conv = wsconv_class(canonical_conv_grads)
        self.canonical_conv_grads = conv is CanonicalGradWSConv
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        ch = self.widths[0]
        self.stem = Stem(in_features, ch, conv=conv, **common)
        blocks: list[nnx.Module] = []
        schedule = iter(layers.nf_schedule(self.depths, alpha, stochdepth_rate))
        block_kw = dict(
            se_ratio=se_ratio,
            group_size=group_size,
            alpha=alpha,
            activation=self.activation,
            conv=conv,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        for stage, (out_ch, depth) in enumerate(zip(self.widths, self.depths, strict=True)):
            # The stage's first block changes the shape; the others share one structure.
            run_betas, run_rates = [], []
            for _ in range(depth):
                block_index, beta, rate, _ = next(schedule)
                if block_index > 0:
                    run_betas.append(beta)
                    run_rates.append(rate)
                    continue
                blocks.append(
                    NFRegNetBlock(
                        ch,
                        out_ch,
                        # EfficientNet's first block does not expand.
                        expansion=1.0 if stage == 0 else expansion,
                        stride=2,
                        beta=beta,
                        stochdepth_rate=rate,
                        rngs=rngs,
                        **block_kw,
                    )
                )
                ch = out_ch
            identity = functools.partial(
                NFRegNetBlock, ch, ch, expansion=expansion, stride=1, **block_kw
            )
            blocks += layers.residual_run(
                identity,
                run_betas,
                run_rates,
                scan=self.scan_blocks,
                rngs=rngs,
                stacked_kwargs=dict(conv=CanonicalGradWSConv),
            )
        self.blocks = nnx.List(blocks)
        # EfficientNet-B0's head widens 320 -> 1280; DeepMind keeps that ratio relative to 440.
        self.num_features = 1280 * ch // 440
        self.final_conv = conv(ch, self.num_features, 1, **common)
        self.dropout = nnx.Dropout(self.drop_rate, rngs=rngs)
        self.dtype, self.param_dtype = dtype, param_dtype
        self.fc_init = fc_init
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
        return self.activation(self.final_conv(out))

    def forward_features(self, x: jax.Array) -> jax.Array:
        """The final feature map ``(N, H/32, W/32, num_features)``: ``final_conv`` and its
        activation, before pooling (timm's ``forward_features``)."""
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

"""NFNets: Normalizer-Free Networks F0-F7 and the wider "+" variants.

Reads top to bottom like Figure 2 of the paper, and matches DeepMind's Haiku
model (``nfnets/nfnet.py``) number for number:

* ``Stem``: four 3x3 WSConvs (16 s2, 32, 64, ``widths[0] // 2`` s2), with the
  scaled activation between them but not after the last.
* ``NFBlock``: ``out = act(x) * beta``; main branch ``conv0 1x1 -> act -> conv1
  3x3 grouped, strided -> act -> conv1b 3x3 grouped -> act -> conv2 1x1``, then
  ``2 * SE(out) * out``, stochastic depth and the scalar ``skip_gain``; the
  output is ``out * skip_gain * alpha + shortcut``. The shortcut is
  ``conv_shortcut(avg_pool(act(x) * beta))`` when strided,
  ``conv_shortcut(act(x) * beta)`` on a channel change, and the raw ``x``
  otherwise.
* Head: ``final_conv`` 1x1 to ``final_conv_mult * widths[-1]`` channels, act,
  mean over H and W (``pool``), dropout, ``head`` (``nnx.Linear``).

``beta = 1 / expected_std``, where ``expected_std`` starts at 1, grows as
``sqrt(expected_std**2 + alpha**2)`` after every block, and is reset to 1 after
the first block of each stage (before that growth). Block ``i`` of ``n`` drops
its branch with rate ``stochdepth_rate * i / n``. The NF families share this
schedule (`agc_optax.models.layers.nf_schedule`).

References:
  Brock, De, Smith, Simonyan 2021, "High-Performance Large-Scale Image
  Recognition Without Normalization", arXiv:2102.06171.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from agc_optax.models._config import check_num_classes, check_stages, resolve_config
from agc_optax.models.canonical_conv import CanonicalGradWSConv, wsconv_class
from agc_optax.models.layers import (
    LINEAR_PARAMS,
    NF_BLOCK_LAYERS,
    WS_CONV_PARAMS,
    ClassifierHead,
    SqueezeExcite,
    WSConv,
    block_locations,
    nf_residual,
    nf_schedule,
    optional_stochastic_depth,
    pooled_shortcut,
    residual_run,
    resolve_scan_blocks,
    run_residual_blocks,
    scaled_activation,
)
from agc_optax.models.weights import HaikuNames, fetch_cached

Array = jax.Array
Dtype = Any

_STAGE_STRIDES = (1, 2, 2, 2)


@dataclasses.dataclass(frozen=True)
class NFNetConfig:
    """One NFNet variant (DeepMind's ``base.nfnet_params`` entry).

    Attributes:
      variant: DeepMind's name, e.g. ``"F0"`` or ``"F0+"``.
      widths: output channels of each stage.
      depths: blocks per stage.
      train_imsize: training resolution.
      test_imsize: evaluation resolution.
      drop_rate: dropout rate before the classifier.
      ra_level: RandAugment level string of the training recipe.
      expansions: bottleneck ratio of each stage.
      group_widths: channels per group of the grouped 3x3 convs, per stage.
      big_widths: per stage, whether the bottleneck follows the output width
        (True) or the input width (False).
    """

    variant: str
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    train_imsize: int
    test_imsize: int
    drop_rate: float
    ra_level: str = "405"
    expansions: tuple[float, ...] = (0.5, 0.5, 0.5, 0.5)
    group_widths: tuple[int, ...] = (128, 128, 128, 128)
    big_widths: tuple[bool, ...] = (True, True, True, True)

    def __post_init__(self) -> None:
        check_stages(self, ("depths", "expansions", "group_widths", "big_widths"))
        n = len(self.widths)
        if n > len(_STAGE_STRIDES):
            raise ValueError(f"NFNetConfig `widths`: at most 4 stages, got {n}")


def _f_series() -> dict[str, NFNetConfig]:
    # (depth multiplier, train res, test res, RandAugment level, dropout) per F-variant.
    table = {
        "F0": (1, 192, 256, "405", 0.2),
        "F1": (2, 224, 320, "410", 0.3),
        "F2": (3, 256, 352, "410", 0.4),
        "F3": (4, 320, 416, "415", 0.4),
        "F4": (5, 384, 512, "415", 0.5),
        "F5": (6, 416, 544, "415", 0.5),
        "F6": (7, 448, 576, "415", 0.5),
        "F7": (8, 480, 608, "415", 0.5),
    }
    configs = {}
    for name, (mult, train, test, ra, drop) in table.items():
        depths = tuple(mult * d for d in (1, 2, 6, 3))
        configs[name] = NFNetConfig(name, (256, 512, 1536, 1536), depths, train, test, drop, ra)
        configs[name + "+"] = dataclasses.replace(
            configs[name], variant=name + "+", widths=(384, 768, 2048, 2048)
        )
    return configs


NFNET_VARIANTS: dict[str, NFNetConfig] = _f_series()

# DeepMind's Haiku names -> NNX paths (read by `agc_optax.models.load_haiku_params`).
HAIKU_NAMES = HaikuNames(
    top_level="NFNet",
    layers={
        r"stem_conv([0-3])": (r"stem/conv\1", WS_CONV_PARAMS),
        "final_conv": ("final_conv", WS_CONV_PARAMS),
        "linear": ("head", LINEAR_PARAMS),
    },
    blocks="nf_block",
    block_layers=NF_BLOCK_LAYERS,
)


# Unit-axes rules, as (regex, axes) pairs for `agc_optax.adaptive_grad_clip`, for a model
# built with `scan_blocks=True`: a stacked leaf's units are those of one block, per layer.
# Leaves outside the stacks match nothing here and keep the default rules.
SCANNED_UNIT_AXES: list[tuple[str, tuple[int, ...]]] = [
    (r"^blocks/\d+/block/.*kernel$", (0, -1)),  # One unit per (layer, output channel).
    (r"^blocks/\d+/block/", (0,)),  # Gains, biases, skip_gain: one unit per layer.
]


class Stem(nnx.Module):
    """Four 3x3 WSConvs (of class ``conv``) downsampling by 4: 16 s2 -> 32 -> 64 ->
    ``out_features`` s2."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: Callable[[Array], Array],
        *,
        conv: type[WSConv] = WSConv,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation
        self.conv0 = conv(in_features, 16, 3, strides=2, **kw)
        self.conv1 = conv(16, 32, 3, **kw)
        self.conv2 = conv(32, 64, 3, **kw)
        self.conv3 = conv(64, out_features, 3, strides=2, **kw)

    def __call__(self, x: Array) -> Array:
        x = self.activation(self.conv0(x))
        x = self.activation(self.conv1(x))
        x = self.activation(self.conv2(x))
        return self.conv3(x)  # No activation: each block starts with one.


class NFBlock(nnx.Module):
    """The NFNet bottleneck block (see the module docstring for the figure).

    Args:
      in_features: input channels.
      out_features: output channels.
      expansion: bottleneck ratio.
      se_ratio: squeeze-excite hidden ratio (of ``out_features``).
      group_size: channels per group in the 3x3 convs.
      stride: stride of ``conv1`` and of the shortcut's average pool.
      beta: input scale, ``1 / expected_std``.
      alpha: residual branch scale.
      activation: the scaled activation.
      big_width: bottleneck from ``out_features`` (True) or ``in_features``.
      use_two_convs: whether to have ``conv1b``.
      stochdepth_rate: drop-path rate; stochastic depth exists only when it is
        in (0, 1), as in DeepMind's code.
      conv: the class of every conv (stacked runs and ``NFNet(canonical_conv_grads=True)``
        pass `agc_optax.models.canonical_conv.CanonicalGradWSConv`, whose gradients are fast
        on CPU; same parameters and outputs as the default `WSConv`).
      dtype: computation dtype.
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` with ``params`` and (for training) ``dropout`` streams.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        expansion: float = 0.5,
        se_ratio: float = 0.5,
        group_size: int = 128,
        stride: int = 1,
        beta: float = 1.0,
        alpha: float = 0.2,
        activation: Callable[[Array], Array],
        big_width: bool = True,
        use_two_convs: bool = True,
        stochdepth_rate: float | None = None,
        conv: type[WSConv] = WSConv,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        width = int((out_features if big_width else in_features) * expansion)
        groups = width // group_size
        if groups < 1:
            raise ValueError(
                f"NFBlock: bottleneck width {width} is below `group_size` {group_size}, so "
                "the grouped convs would have 0 groups; use wider stages or a larger `width`"
            )
        self.in_features, self.out_features = in_features, out_features
        self.width = group_size * groups
        self.groups = groups
        self.stride = stride
        self.beta, self.alpha = beta, alpha
        self.activation = activation
        self.use_projection = stride > 1 or in_features != out_features
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv0 = conv(in_features, self.width, 1, **kw)
        self.conv1 = conv(
            self.width, self.width, 3, strides=stride, feature_group_count=groups, **kw
        )
        self.conv1b = (
            conv(self.width, self.width, 3, feature_group_count=groups, **kw)
            if use_two_convs
            else None
        )
        self.conv2 = conv(self.width, out_features, 1, **kw)
        self.conv_shortcut = (
            conv(in_features, out_features, 1, **kw) if self.use_projection else None
        )
        self.se = SqueezeExcite(out_features, out_features, se_ratio, **kw)
        self.stoch_depth = optional_stochastic_depth(stochdepth_rate, rngs)
        self.skip_gain = nnx.Param(jnp.zeros((), param_dtype))

    def __call__(
        self,
        x: Array,
        *,
        beta: float | Array | None = None,
        stochdepth_rate: float | Array | None = None,
    ) -> tuple[Array, Array]:
        """Runs the block.

        Args:
          x: input of shape ``(N, H, W, in_features)``.
          beta: overrides ``self.beta`` (traced per layer by the scanned stacks).
          stochdepth_rate: overrides the stochastic depth rate (same reason).

        Returns:
          ``(output, res_avg_var)``, the latter being the average channel variance
          of the residual branch before stochastic depth and ``skip_gain``.
        """
        beta = self.beta if beta is None else beta
        out = self.activation(x) * beta
        shortcut = pooled_shortcut(x, out, self.stride, self.conv_shortcut)
        out = self.conv0(out)
        out = self.conv1(self.activation(out))
        if self.conv1b is not None:
            out = self.conv1b(self.activation(out))
        out = self.conv2(self.activation(out))
        out = (self.se(out) * 2) * out  # x2 restores the variance halved by the gate.
        return nf_residual(self, out, shortcut, stochdepth_rate)


class NFNet(ClassifierHead, nnx.Module):
    """Normalizer-Free Network with DeepMind's constructor and numerics.

    Args:
      num_classes: classifier outputs; 0 builds no classifier (the model returns its pooled
        features).
      variant: ``"F0"`` ... ``"F7"``, ``"F0+"`` ... ``"F7+"``, or an `NFNetConfig`.
      width: multiplier of the stage widths.
      se_ratio: squeeze-excite hidden ratio.
      alpha: residual branch scale.
      stochdepth_rate: drop-path rate of the last block (linear in block index).
      drop_rate: dropout before the classifier (``None``: the variant's rate).
      activation: a name from `agc_optax.models.GAMMAS`.
      fc_init: initializer of ``head/kernel`` (``None``: normal with stddev 0.01).
      final_conv_mult: ``final_conv`` channels as a multiple of the last width.
      final_conv_ch: explicit ``final_conv`` channels (when ``final_conv_mult`` is None).
      use_two_convs: whether blocks have the second grouped conv ``conv1b``.
      widths: override the variant's stage widths.
      depths: override the variant's stage depths.
      scan_blocks: run each stage's identity-shortcut blocks (all but the first) with ``nnx.scan``
        (a `layers.BlockStack`), which compiles each stage's block once instead of once per layer.
        ``"auto"`` picks per backend when the model is built (`layers.resolve_scan_blocks`,
        `layers.SCAN_BLOCKS_AUTO`: unrolled on CPU, where it was measured not to pay both ways;
        scanned on GPU and TPU, not measured here); the attribute ``scan_blocks`` holds the resolved
        bool. The default stays False: scanning changes the parameter tree (stacked leaves, other
        AGC unit rules, other checkpoint paths), which should not depend on the machine a model is
        built on unless asked for. Outputs and parameter counts are unchanged, but the stacked
        blocks' leaves gain a leading layer axis (paths ``blocks/<j>/block/...``): for adaptive
        gradient clipping, the unit of a stacked kernel is ``(layer, output channel)``, so such
        leaves need the unit axes ``(0, -1)``, and the stacked gains, biases and ``skip_gain`` need
        ``(0,)``. `SCANNED_UNIT_AXES` holds these rules as ``(regex, axes)`` pairs, and
        ``agc_unit_axes`` returns them when the resolved ``scan_blocks`` is True.
        `agc_optax.models.load_haiku_params` fills stacked leaves from DeepMind's per-block names.
        The stacked blocks' convs have a custom VJP (fast on CPU, see
        `agc_optax.models.conv_canonical_grads`): reverse-mode differentiation only.
      canonical_conv_grads: build every weight-standardized conv (stem, blocks, transitions,
        ``final_conv``; unrolled or stacked) as `agc_optax.models.CanonicalGradWSConv`, whose
        gradients XLA:CPU runs faster (NFNet-F0's unrolled train step: 0.44-0.49x the time at batch
        8, 128 px); reverse-mode differentiation only (what it changes and costs:
        `agc_optax.models.canonical_conv.wsconv_class`). ``agc-train`` turns it on for training; the
        attribute holds the bool.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); weight standardization
        always runs in float32.
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` with a ``params`` stream, and ``dropout`` for training.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = NFNet(10, "F0", widths=[256] * 4, depths=[1] * 4, rngs=nnx.Rngs(0))
      >>> model.eval()
      >>> model(jnp.ones((2, 32, 32, 3))).shape
      (2, 10)
      >>> sorted(model.forward_outputs(jnp.ones((2, 32, 32, 3)), return_metrics=True))[:3]
      ['avg_sq_mean_0', 'avg_sq_mean_1', 'avg_sq_mean_2']

    Attributes:
      stem, blocks, final_conv, dropout, head: the submodules; ``blocks`` is an
        ``nnx.List``, so leaf paths read ``blocks/0/conv0/kernel``.
      config: the resolved `NFNetConfig`.
      num_features: channels of the features the head reads (``final_conv``'s).

    Model-zoo API (timm's names, shared by every family): ``forward_features(x)`` (the final
    feature map), ``forward_head(features, pre_logits=False)``, ``reset_classifier(n)``,
    ``forward_intermediates(x)`` and ``feature_info`` (per-stage backbone features);
    ``forward_outputs(x, return_metrics=...)`` returns DeepMind's output dict.
    """

    haiku_names: ClassVar[HaikuNames] = HAIKU_NAMES

    def __init__(
        self,
        num_classes: int = 1000,
        variant: str | NFNetConfig = "F0",
        width: float = 1.0,
        se_ratio: float = 0.5,
        alpha: float = 0.2,
        stochdepth_rate: float = 0.1,
        drop_rate: float | None = None,
        activation: str = "gelu",
        fc_init: Callable[..., Array] | None = None,
        final_conv_mult: float | None = 2,
        final_conv_ch: int | None = None,
        use_two_convs: bool = True,
        *,
        widths: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        scan_blocks: bool | str = False,
        canonical_conv_grads: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        config = resolve_config(variant, NFNET_VARIANTS, NFNetConfig, widths=widths, depths=depths)
        if final_conv_mult is None and final_conv_ch is None:
            raise ValueError("NFNet: give one of `final_conv_mult` or `final_conv_ch`")
        self.config = config
        self.num_classes = num_classes
        self.alpha = alpha
        self.drop_rate = config.drop_rate if drop_rate is None else drop_rate
        self.train_imsize, self.test_imsize = config.train_imsize, config.test_imsize
        self.activation = scaled_activation(activation)
        self.scan_blocks = scan_blocks = resolve_scan_blocks(scan_blocks)
        conv = wsconv_class(canonical_conv_grads)
        self.canonical_conv_grads = conv is CanonicalGradWSConv
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        ch = config.widths[0] // 2
        self.stem = Stem(3, ch, self.activation, conv=conv, **kw)

        blocks: list[nnx.Module] = []
        schedule = iter(nf_schedule(config.depths, alpha, stochdepth_rate))
        stages = zip(
            config.widths,
            config.depths,
            config.expansions,
            config.group_widths,
            config.big_widths,
            _STAGE_STRIDES,
            strict=False,
        )
        for stage_width, depth, expansion, group_size, big_width, stride in stages:
            out_ch = int(stage_width * width)
            common = dict(
                expansion=expansion,
                se_ratio=se_ratio,
                group_size=group_size,
                alpha=alpha,
                activation=self.activation,
                big_width=big_width,
                use_two_convs=use_two_convs,
                conv=conv,
                **kw,
            )
            run_betas: list[float] = []
            run_rates: list[float] = []
            for _ in range(depth):
                block_index, beta, sd_rate, _ = next(schedule)
                if block_index == 0:  # the transition block: stride, maybe a projection
                    blocks.append(
                        NFBlock(
                            ch, out_ch, stride=stride, beta=beta, stochdepth_rate=sd_rate, **common
                        )
                    )
                    ch = out_ch
                else:  # identity shortcut: one run, stacked with scan_blocks
                    run_betas.append(beta)
                    run_rates.append(sd_rate)
            block_kwargs = {k: v for k, v in common.items() if k != "rngs"}
            blocks += residual_run(
                functools.partial(NFBlock, ch, ch, **block_kwargs),
                run_betas,
                run_rates,
                scan=self.scan_blocks,
                rngs=rngs,
                stacked_kwargs={"conv": CanonicalGradWSConv},
            )
        self.blocks = nnx.List(blocks)
        self.num_blocks = sum(config.depths)
        self.depths = config.depths
        self.widths = tuple(int(w * width) for w in config.widths)

        final_ch = final_conv_ch if final_conv_mult is None else int(final_conv_mult * ch)
        self.final_conv = conv(ch, final_ch, 1, **kw)
        self.dropout = nnx.Dropout(self.drop_rate, rngs=rngs)
        self.num_features = final_ch
        self.dtype, self.param_dtype = dtype, param_dtype
        self.fc_init = fc_init or nnx.initializers.normal(0.01)
        self.num_classes = check_num_classes(num_classes)
        self.head = self._new_head(self.num_classes, rngs)

    def block_locations(self) -> list[tuple[int, int | None]]:
        """Maps DeepMind's global block index to ``(position in blocks, layer)``.

        ``layer`` is ``None`` for an unrolled `NFBlock` and the index along the
        stacked axis for a `BlockStack`.
        """
        return block_locations(self.blocks)

    @property
    def agc_unit_axes(self) -> list[tuple[str, tuple[int, ...]]] | None:
        """The unit-axes rules this model's parameter layout needs for AGC.

        `SCANNED_UNIT_AXES` with ``scan_blocks=True`` (stacked leaves carry a layer axis), else
        ``None``: the default rules already fit. Training code passes it on as ``unit_axes``.
        """
        return SCANNED_UNIT_AXES if self.scan_blocks else None

    def _trunk(self, x: Array, return_metrics: bool) -> tuple[Array, dict[str, Array]]:
        """The final feature map, and DeepMind's signal metrics when asked for."""
        out, outputs = run_residual_blocks(self.stem(x), self.blocks, return_metrics)
        return self._finish(out), outputs

    def _finish(self, out: Array) -> Array:
        return self.activation(self.final_conv(out))

    def forward_features(self, x: Array) -> Array:
        """The final feature map ``(N, H/32, W/32, num_features)``: ``final_conv`` and its
        activation, before pooling (timm's ``forward_features``)."""
        return self._trunk(x, False)[0]

    def forward_outputs(self, x: Array, *, return_metrics: bool = False) -> dict[str, Array]:
        """Runs the network and returns DeepMind's output dict.

        Args:
          x: images of shape ``(N, H, W, 3)``.
          return_metrics: also return ``avg_sq_mean_<i>``, ``avg_var_<i>`` (``i = 0``
            is the stem output, ``i`` the output of block ``i - 1``) and
            ``res_avg_var_<i>`` (the residual branch of block ``i``).

        Returns:
          A dict with ``pool`` (the pooled features), ``logits`` and the metrics.
        """
        features, outputs = self._trunk(x, return_metrics)
        outputs["pool"] = self.forward_head(features, pre_logits=True)
        outputs["logits"] = self.forward_head(features)
        return outputs


_RELEASED_URL = "https://storage.googleapis.com/dm-nfnets/{variant}_haiku.npz"
_RELEASED = ("F0", "F1", "F2", "F3", "F4", "F5", "F6")


def download_nfnet_weights(
    variant: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    sha256: str | None = None,
) -> Path:
    """Downloads DeepMind's released ImageNet weights for an NFNet (needs network).

    The file is a dill pickle of the nested Haiku dict; load it with
    ``load_haiku_params(NFNet(1000, variant), path, allow_pickle=True)`` (needs
    ``dill``).

    Args:
      variant: ``"F0"`` ... ``"F6"``.
      cache_dir: where to keep the file (default ``~/.cache/agc_optax``).
      sha256: the expected digest, if you have one; otherwise the digest of the
        first download is recorded and later cache hits are checked against it.

    Returns:
      The path of the cached file.
    """
    if variant not in _RELEASED:
        raise ValueError(f"`variant`: DeepMind released {list(_RELEASED)}, got {variant!r}")
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "agc_optax"
    url = _RELEASED_URL.format(variant=variant)
    return fetch_cached(url, cache / f"{variant}_haiku.npz", sha256)

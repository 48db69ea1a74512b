"""A standard BatchNorm ResNet (torchvision's ResNet-50 v1.5 layout) in Flax NNX.

The normalized baseline that NF models are compared with. It matches torchvision's
``resnet50`` parameter for parameter (25,557,032): a 7x7 stride-2 conv, BatchNorm, relu and a
3x3 stride-2 max pool; post-activation bottleneck blocks ``conv0 1x1 -> bn0 -> relu -> conv1
3x3 (strided, "v1.5") -> bn1 -> relu -> conv2 1x1 -> bn2``, added to the shortcut (a strided 1x1
conv and BatchNorm on a shape change) and passed through relu; global average pooling and
``head``.
Convolutions have no bias and use explicit symmetric padding as PyTorch does.

It has the same call signature as the NF families: ``model(x)`` returns logits,
``model.forward_outputs(x, return_metrics=True)`` adds the signal-propagation metrics, and
``model.train()`` / ``model.eval()`` switch BatchNorm between batch and running statistics.

References:
  He, Zhang, Ren, Sun. Deep residual learning for image recognition. CVPR 2016, arXiv:1512.03385.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from agc_optax.models import layers
from agc_optax.models._config import check_num_classes, check_stages, resolve_config


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """One BatchNorm ResNet variant; the defaults are torchvision's ResNet-50.

    Attributes:
      variant: the name, e.g. ``"ResNet50"``.
      widths: output channels per stage (four times the bottleneck width).
      depths: bottleneck blocks per stage.
      stem_width: channels of the stem conv.
    """

    variant: str = "ResNet50"
    widths: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    stem_width: int = 64

    def __post_init__(self) -> None:
        check_stages(self, ("depths",))


RESNET_VARIANTS: dict[str, ResNetConfig] = {"ResNet50": ResNetConfig()}

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv_bn(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    strides: int = 1,
    bn_momentum: float,
    dtype: Any,
    param_dtype: Any,
    rngs: nnx.Rngs,
) -> tuple[nnx.Conv, nnx.BatchNorm]:
    pad = kernel_size // 2
    conv = nnx.Conv(
        in_features,
        out_features,
        (kernel_size, kernel_size),
        strides=strides,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_CONV_INIT,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    bn = nnx.BatchNorm(
        out_features,
        momentum=bn_momentum,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    return conv, bn


class ResNetBlock(nnx.Module):
    """Post-activation bottleneck block (stride on the 3x3 conv, torchvision's v1.5).

    Args:
      in_features: input channels.
      out_features: output channels; the bottleneck has ``out_features // 4``.
      stride: stride of ``conv1`` and of the shortcut conv.
      bn_momentum: BatchNorm running-average momentum (Flax convention).
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
        bn_momentum: float = 0.9,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        width = out_features // 4
        if width < 1:
            raise ValueError(f"`out_features`={out_features}: a bottleneck needs at least 4")
        common = dict(bn_momentum=bn_momentum, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv0, self.bn0 = _conv_bn(in_features, width, 1, **common)
        self.conv1, self.bn1 = _conv_bn(width, width, 3, strides=stride, **common)
        self.conv2, self.bn2 = _conv_bn(width, out_features, 1, **common)
        if stride > 1 or in_features != out_features:
            self.conv_shortcut, self.bn_shortcut = _conv_bn(
                in_features, out_features, 1, strides=stride, **common
            )
        else:
            self.conv_shortcut = self.bn_shortcut = None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns ``(output, residual-branch average channel variance)``."""
        if self.conv_shortcut is not None:
            shortcut = self.bn_shortcut(self.conv_shortcut(x))
        else:
            shortcut = x
        out = jax.nn.relu(self.bn0(self.conv0(x)))
        out = jax.nn.relu(self.bn1(self.conv1(out)))
        out = self.bn2(self.conv2(out))
        return jax.nn.relu(out + shortcut), layers.avg_channel_var(out)


class Stem(nnx.Module):
    """7x7 stride-2 conv, BatchNorm, relu, 3x3 stride-2 max pool (padding 1, -inf)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bn_momentum: float,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.conv, self.bn = _conv_bn(
            in_features,
            out_features,
            7,
            strides=2,
            bn_momentum=bn_momentum,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn(self.conv(x)))
        return nnx.max_pool(out, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet(layers.ClassifierHead, nnx.Module):
    """BatchNorm bottleneck ResNet; the defaults give torchvision's ResNet-50.

    Args:
      num_classes: classifier outputs; 0 builds no classifier (the model returns its pooled
        features).
      variant: a key of :data:`RESNET_VARIANTS` (``'ResNet50'``) or a `ResNetConfig`.
      widths: output channels per stage (four times the bottleneck width), replacing the
        variant's.
      depths: blocks per stage, replacing the variant's.
      stem_width: channels of the stem conv, replacing the variant's.
      bn_momentum: BatchNorm momentum in Flax's convention (torchvision's 0.1 is 0.9 here).
      in_features: input channels.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      rngs: keys for ``params``.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> model = ResNet(10, depths=(1, 1), widths=(64, 128), stem_width=16, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """

    def __init__(
        self,
        num_classes: int,
        variant: str | ResNetConfig = "ResNet50",
        *,
        widths: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        stem_width: int | None = None,
        bn_momentum: float = 0.9,
        in_features: int = 3,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        config = resolve_config(
            variant,
            RESNET_VARIANTS,
            ResNetConfig,
            widths=widths,
            depths=depths,
            stem_width=stem_width,
        )
        self.config = config
        self.variant, self.depths, self.widths = config.variant, config.depths, config.widths
        common = dict(bn_momentum=bn_momentum, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.stem = Stem(in_features, config.stem_width, **common)
        blocks = []
        ch = config.stem_width
        for stage, (width, depth) in enumerate(zip(self.widths, self.depths, strict=True)):
            for index in range(depth):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(ResNetBlock(ch, width, stride=stride, **common))
                ch = width
        self.blocks = nnx.List(blocks)
        self.num_features = ch
        self.dtype, self.param_dtype = dtype, param_dtype
        # torchvision's nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernel and bias.
        self.fc_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        self.fc_bias_init = _uniform_bias(self.num_features)
        self.num_classes = check_num_classes(num_classes)
        self.head = self._new_head(self.num_classes, rngs)

    def _trunk(self, x: jax.Array, return_metrics: bool) -> tuple[jax.Array, dict[str, Any]]:
        out, outputs = layers.run_residual_blocks(self.stem(x), self.blocks, return_metrics)
        return self._finish(out), outputs

    def _finish(self, out: jax.Array) -> jax.Array:
        return out  # The blocks end with their ReLU.

    def forward_features(self, x: jax.Array) -> jax.Array:
        """The final feature map ``(N, H/32, W/32, num_features)``: the last block's output,
        before pooling (timm's ``forward_features``)."""
        return self._trunk(x, False)[0]

    def forward_outputs(self, x: jax.Array, *, return_metrics: bool = False) -> dict[str, Any]:
        """Runs the network on NHWC images; returns ``{'pool', 'logits'}`` like the NF families.

        With ``return_metrics``, also the signal metrics of every block (keys as in
        `layers.run_residual_blocks`; the residual branch after its last BatchNorm, before the
        addition).
        """
        features, outputs = self._trunk(x, return_metrics)
        outputs["pool"] = self.forward_head(features, pre_logits=True)
        outputs["logits"] = self.forward_head(features)
        return outputs


def _uniform_bias(fan_in: int):
    bound = 1.0 / fan_in**0.5

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init

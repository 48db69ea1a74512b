"""Model names -> configs; a config's type picks the family class that builds it.

Every family is a frozen config dataclass with named presets and a model class whose constructor
takes ``(num_classes, variant, ..., *, dtype, param_dtype, rngs)``, where ``variant`` is a preset
name or a config. Adding a family is one entry in ``_FAMILIES`` and its names in ``_CONFIGS``.
"""

from __future__ import annotations

import difflib
from typing import Any

import jax.numpy as jnp
from flax import nnx

from agc_optax.models._config import check_float_dtype, check_num_classes
from agc_optax.models.nf_regnet import NF_REGNET_VARIANTS, NFRegNet, NFRegNetConfig
from agc_optax.models.nf_resnet import NF_RESNET_VARIANTS, NFResNet, NFResNetConfig
from agc_optax.models.nfnet import NFNET_VARIANTS, NFNet, NFNetConfig
from agc_optax.models.resnet import RESNET_VARIANTS, ResNet, ResNetConfig
from agc_optax.models.timm_nfnet import TIMM_NFNET_VARIANTS, TimmNFNet, TimmNFNetConfig

# Config type -> the model class it configures.
_FAMILIES: dict[type, type[nnx.Module]] = {
    NFNetConfig: NFNet,
    NFResNetConfig: NFResNet,
    NFRegNetConfig: NFRegNet,
    ResNetConfig: ResNet,
    TimmNFNetConfig: TimmNFNet,
}

_CONFIGS: dict[str, Any] = {
    # nfnet_f0 ... nfnet_f7, nfnet_f0_plus ... nfnet_f7_plus
    **{
        "nfnet_" + name.lower().replace("+", "_plus"): config
        for name, config in NFNET_VARIANTS.items()
    },
    # nf_resnet26 ... nf_resnet200 (not the 288- and 600-layer variants)
    **{
        f"nf_resnet{depth}": NF_RESNET_VARIANTS[f"ResNet{depth}"]
        for depth in (26, 50, 101, 152, 200)
    },
    # nf_regnet_b0 ... nf_regnet_b8
    **{f"nf_regnet_{name.lower()}": config for name, config in NF_REGNET_VARIANTS.items()},
    "resnet50": RESNET_VARIANTS["ResNet50"],
    # timm's names: dm_nfnet_f0 ... dm_nfnet_f6, nfnet_l0, eca_nfnet_l0 ... eca_nfnet_l2
    **TIMM_NFNET_VARIANTS,
}


def list_models() -> list[str]:
    """Returns the registered model names, sorted."""
    return sorted(_CONFIGS)


def get_config(name: str) -> Any:
    """Returns the frozen config dataclass registered under ``name``.

    Raises:
      TypeError: when ``name`` is not a string.
      ValueError: for an unknown name, listing the valid ones (close matches first).
    """
    if not isinstance(name, str):
        raise TypeError(
            f"`name`: expected a model name (str) from list_models(), got "
            f"{type(name).__name__} {name!r}"
        )
    if name not in _CONFIGS:
        valid = list_models()
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"`name`: unknown model {name!r}.{hint} Valid names: {', '.join(valid)}")
    return _CONFIGS[name]


def create_model(
    name: str,
    num_classes: int = 1000,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
    **overrides: Any,
) -> nnx.Module:
    """Builds a registered model.

    Args:
      name: a name from `list_models`, e.g. ``"nfnet_f0"``.
      num_classes: size of the classifier (``head``). ``0`` builds the model without a
        classifier, as timm does: it has no ``head`` and returns its pooled features
        ``(batch, num_features)`` in place of logits (a backbone for feature extraction).
      dtype: computation dtype (parameters stay in ``param_dtype``): float16, bfloat16,
        float32 or float64, or ``None`` to follow the inputs and parameters.
      param_dtype: parameter dtype: float16, bfloat16, float32 or float64.
      rngs: an ``nnx.Rngs`` with ``params`` (and ``dropout`` for training) streams.
      **overrides: constructor keywords of the family class (for example
        ``stochdepth_rate=0.25``, ``depths=(1, 1, 1, 1)`` or ``scan_blocks=True``). Every
        family takes ``depths=`` and ``widths=``; timm's names also ``num_features=`` (the
        final conv's width, which timm does not derive from ``widths``).

    Returns:
      The model, in training mode (call ``model.eval()`` for inference).

    Raises:
      TypeError: for a ``name`` that is not a string, a ``num_classes`` that is not an int, or a
        ``dtype`` / ``param_dtype`` that is not a dtype (each message names the argument).
      ValueError: for an unknown name (listing the valid ones), a negative ``num_classes``, or a
        non-float dtype (int32, the float8 formats).

    Example:
      >>> from flax import nnx
      >>> from agc_optax.models import create_model
      >>> model = nnx.eval_shape(lambda: create_model("nfnet_f0", rngs=nnx.Rngs(0)))
      >>> model.head.kernel.shape
      (3072, 1000)
    """
    config = get_config(name)
    num_classes = check_num_classes(num_classes)
    check_float_dtype(dtype, "dtype", allow_none=True)
    check_float_dtype(param_dtype, "param_dtype")
    model_class = _FAMILIES[type(config)]
    return model_class(
        num_classes, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **overrides
    )

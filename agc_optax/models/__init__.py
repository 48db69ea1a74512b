"""Normalizer-free networks in Flax NNX, with DeepMind parity and weight loading."""

from agc_optax.models.canonical_conv import CanonicalGradWSConv, conv_canonical_grads
from agc_optax.models.export import export, load_exported
from agc_optax.models.layers import (
    GAMMAS,
    EfficientChannelAttention,
    SqueezeExcite,
    StochasticDepth,
    WSConv,
    estimate_gamma,
    scaled_activation,
    signal_metrics,
)
from agc_optax.models.nf_regnet import NFRegNet, NFRegNetConfig
from agc_optax.models.nf_resnet import NFResNet, NFResNetConfig
from agc_optax.models.nfnet import NFNet, NFNetConfig, download_nfnet_weights
from agc_optax.models.pretrained import (
    ModelDefaults,
    PretrainedWeightsError,
    WeightsFile,
    fetch_pretrained,
)
from agc_optax.models.registry import (
    create_model,
    default_config,
    get_config,
    list_models,
    model_class,
    model_info,
)
from agc_optax.models.resnet import ResNet, ResNetConfig
from agc_optax.models.timm_nfnet import TimmNFNet, TimmNFNetConfig
from agc_optax.models.weights import (
    HaikuWeightsError,
    TimmWeightsError,
    WeightsError,
    load_haiku_params,
    load_params,
    load_timm_state_dict,
    read_state_dict,
    save_params,
)

__all__ = [
    "GAMMAS",
    "CanonicalGradWSConv",
    "EfficientChannelAttention",
    "HaikuWeightsError",
    "ModelDefaults",
    "NFNet",
    "NFNetConfig",
    "NFRegNet",
    "NFRegNetConfig",
    "NFResNet",
    "NFResNetConfig",
    "PretrainedWeightsError",
    "ResNet",
    "ResNetConfig",
    "SqueezeExcite",
    "StochasticDepth",
    "TimmNFNet",
    "TimmNFNetConfig",
    "TimmWeightsError",
    "WSConv",
    "WeightsError",
    "WeightsFile",
    "conv_canonical_grads",
    "create_model",
    "default_config",
    "download_nfnet_weights",
    "estimate_gamma",
    "export",
    "fetch_pretrained",
    "get_config",
    "list_models",
    "load_exported",
    "load_haiku_params",
    "load_params",
    "load_timm_state_dict",
    "model_class",
    "model_info",
    "read_state_dict",
    "save_params",
    "scaled_activation",
    "signal_metrics",
]

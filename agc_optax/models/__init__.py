"""Normalizer-free networks in Flax NNX, with DeepMind parity and weight loading."""

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
from agc_optax.models.registry import create_model, get_config, list_models
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
    "EfficientChannelAttention",
    "HaikuWeightsError",
    "NFNet",
    "NFNetConfig",
    "NFRegNet",
    "NFRegNetConfig",
    "NFResNet",
    "NFResNetConfig",
    "ResNet",
    "ResNetConfig",
    "SqueezeExcite",
    "StochasticDepth",
    "TimmNFNet",
    "TimmNFNetConfig",
    "TimmWeightsError",
    "WSConv",
    "WeightsError",
    "create_model",
    "download_nfnet_weights",
    "estimate_gamma",
    "get_config",
    "list_models",
    "load_haiku_params",
    "load_params",
    "load_timm_state_dict",
    "read_state_dict",
    "save_params",
    "scaled_activation",
    "signal_metrics",
]

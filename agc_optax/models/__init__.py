"""Normalizer-free networks in Flax NNX, with DeepMind parity and weight loading."""

from agc_optax.models.layers import (
    GAMMAS,
    SqueezeExcite,
    StochasticDepth,
    WSConv,
    estimate_gamma,
    scaled_activation,
    signal_metrics,
)
from agc_optax.models.nf_regnet import NFRegNet, NFRegNetConfig
from agc_optax.models.nf_resnet import NFResNet, NFResNetConfig
from agc_optax.models.nfnet import NFNet, NFNetConfig
from agc_optax.models.registry import create_model, get_config, list_models
from agc_optax.models.resnet import ResNet, ResNetConfig

__all__ = [
    "GAMMAS",
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
    "WSConv",
    "create_model",
    "estimate_gamma",
    "get_config",
    "list_models",
    "scaled_activation",
    "signal_metrics",
]

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
from agc_optax.models.nfnet import NFNet, NFNetConfig
from agc_optax.models.registry import create_model, get_config, list_models

__all__ = [
    "GAMMAS",
    "NFNet",
    "NFNetConfig",
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

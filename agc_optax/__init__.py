"""agc_optax: Adaptive Gradient Clipping for optax, and normalizer-free networks for Flax NNX."""

from agc_optax.clipping import AdaptiveGradClipState, adaptive_grad_clip
from agc_optax.optimizers import (
    HEAD_PATTERN,
    AdamWAgcState,
    SgdAgcState,
    adamw_agc,
    sgd_agc,
    weight_decay_mask,
)
from agc_optax.unit_axes import (
    UnitInfo,
    UnitTable,
    describe,
    infer_unit_axes,
    leaf_paths,
    unitwise_norm,
)

__version__ = "0.1.0"

__all__ = [
    "HEAD_PATTERN",
    "AdamWAgcState",
    "AdaptiveGradClipState",
    "SgdAgcState",
    "UnitInfo",
    "UnitTable",
    "adamw_agc",
    "adaptive_grad_clip",
    "describe",
    "infer_unit_axes",
    "leaf_paths",
    "sgd_agc",
    "unitwise_norm",
    "weight_decay_mask",
]

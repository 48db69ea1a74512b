"""agc_optax: Adaptive Gradient Clipping for optax, and normalizer-free networks for Flax NNX."""

from agc_optax._guard import SkipNonfiniteState
from agc_optax._norms import unitwise_norm
from agc_optax._plan import UnitInfo, UnitTable, describe
from agc_optax.adagc import AdaGCState, adagc
from agc_optax.clipping import AdaptiveGradClipState, UnitOffsetsState, adaptive_grad_clip
from agc_optax.optimizers import (
    HEAD_PATTERN,
    AdamWAgcState,
    SgdAgcState,
    adamw_agc,
    sgd_agc,
    sgd_agc_step,
    weight_decay_mask,
)
from agc_optax.unit_axes import TORCH_LAYOUT, infer_unit_axes, leaf_paths
from agc_optax.zclip import ZClipState, zclip

__version__ = "0.1.0"

# Signal-propagation tools need the models (Flax); import them on first use so that
# `import agc_optax` for the optax transforms stays light.
_LAZY = {
    "signal_propagation": "agc_optax.models.spp",
    "plot_signal_propagation": "agc_optax.models.spp",
    "expected_variance": "agc_optax.models.spp",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agc_optax' has no attribute {name!r}")


__all__ = [
    "HEAD_PATTERN",
    "TORCH_LAYOUT",
    "AdaGCState",
    "AdamWAgcState",
    "AdaptiveGradClipState",
    "SgdAgcState",
    "SkipNonfiniteState",
    "UnitInfo",
    "UnitOffsetsState",
    "UnitTable",
    "ZClipState",
    "adagc",
    "adamw_agc",
    "adaptive_grad_clip",
    "describe",
    "expected_variance",
    "infer_unit_axes",
    "leaf_paths",
    "plot_signal_propagation",
    "sgd_agc",
    "sgd_agc_step",
    "signal_propagation",
    "unitwise_norm",
    "weight_decay_mask",
    "zclip",
]

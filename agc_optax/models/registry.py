"""Model names -> (config, builder), merged from every family's ``MODEL_CONFIGS``.

Each family module exposes ``MODEL_CONFIGS: dict[str, <frozen dataclass>]`` and a
``build(config, *, num_classes, dtype, param_dtype, rngs, **overrides)`` function.
Adding a family is one entry in ``_FAMILIES`` below.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx

__all__ = ["create_model", "get_config", "list_models"]

# Module paths (relative to this package) of the families; each must define
# `MODEL_CONFIGS` and `build`. Imported lazily so one broken family file does not
# break the others.
_FAMILIES: tuple[str, ...] = (
    ".nfnet",
    ".nf_resnet",
    ".nf_regnet",
    ".resnet",
)


def config_builder(model_class: type[nnx.Module]) -> Callable[..., nnx.Module]:
    """A family's registry ``build``: the config's fields (then ``overrides``) as keywords.

    For families whose frozen config dataclass mirrors the constructor's keywords.
    """

    def build(
        config: Any,
        *,
        num_classes: int,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
        **overrides: Any,
    ) -> nnx.Module:
        kwargs = {**dataclasses.asdict(config), **overrides}
        return model_class(num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kwargs)

    build.__doc__ = f"Builds a :class:`{model_class.__name__}` from a registry config."
    return build


def _table() -> dict[str, tuple[Any, Callable[..., nnx.Module]]]:
    table: dict[str, tuple[Any, Callable[..., nnx.Module]]] = {}
    for family in _FAMILIES:
        module = importlib.import_module(family, __package__)
        for name, config in module.MODEL_CONFIGS.items():
            if name in table:
                raise RuntimeError(f"model name {name!r} is registered twice")
            table[name] = (config, module.build)
    return table


def list_models() -> list[str]:
    """Returns the registered model names, sorted."""
    return sorted(_table())


def _unknown(name: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ValueError(f"`name`: unknown model {name!r}.{hint} Valid names: {', '.join(valid)}")


def get_config(name: str) -> Any:
    """Returns the frozen config dataclass registered under ``name``.

    Raises:
      ValueError: for an unknown name, listing the valid ones (close matches first).
    """
    table = _table()
    if name not in table:
        raise _unknown(name, sorted(table))
    return table[name][0]


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
      num_classes: size of the classifier (``head``).
      dtype: computation dtype (parameters stay in ``param_dtype``).
      param_dtype: parameter dtype.
      rngs: an ``nnx.Rngs`` with ``params`` (and ``dropout`` for training) streams.
      **overrides: constructor keywords of the family class (for example
        ``stochdepth_rate=0.25`` or ``scan_blocks=True``).

    Returns:
      The model, in training mode (call ``model.eval()`` for inference).

    Raises:
      ValueError: for an unknown name, listing the valid ones.

    Example:
      >>> from flax import nnx
      >>> from agc_optax.models import create_model
      >>> model = nnx.eval_shape(lambda: create_model("nfnet_f0", rngs=nnx.Rngs(0)))
      >>> model.head.kernel.shape
      (3072, 1000)
    """
    table = _table()
    if name not in table:
        raise _unknown(name, sorted(table))
    config, build = table[name]
    return build(
        config,
        num_classes=num_classes,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **overrides,
    )

"""What every family's frozen config shares: per-stage checks and preset lookup with overrides."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


def check_stages(config: Any, per_stage: Sequence[str]) -> None:
    """Validates a family config: ``per_stage`` fields have one entry per stage, like ``widths``.

    Raises:
      ValueError: naming the config and field, for a length mismatch or a stage without blocks.
    """
    name, num_stages = type(config).__name__, len(config.widths)
    for field in per_stage:
        value = getattr(config, field)
        if len(value) != num_stages:
            raise ValueError(
                f"{name} `{field}`: expected {num_stages} entries (one per stage, like "
                f"`widths`), got {value!r}"
            )
    if any(d < 1 for d in config.depths):
        raise ValueError(
            f"{name} `depths`: every stage needs at least one block, got {config.depths!r}"
        )


def resolve_config(
    variant: str | Any, presets: Mapping[str, Any], config_type: type, **overrides: Any
) -> Any:
    """A family's config: the preset named ``variant`` (or ``variant`` itself), with overrides.

    Args:
      variant: a key of ``presets`` or a ``config_type`` instance.
      presets: the family's named configs.
      config_type: the family's frozen config dataclass.
      **overrides: config fields to replace; ``None`` keeps the config's value, a sequence
        becomes a tuple of ints.

    Raises:
      ValueError: for an unknown name, listing the presets.
    """
    if isinstance(variant, config_type):
        config = variant
    elif isinstance(variant, str) and variant in presets:
        config = presets[variant]
    else:
        raise ValueError(
            f"`variant`: unknown {config_type.__name__.removesuffix('Config')} variant "
            f"{variant!r}; expected one of {list(presets)} or a config ({config_type.__name__}); "
            "give `widths=`/`depths=` for custom sizes"
        )
    changes = {
        k: tuple(int(x) for x in v) if isinstance(v, Sequence) else v
        for k, v in overrides.items()
        if v is not None
    }
    return dataclasses.replace(config, **changes) if changes else config


def check_num_classes(num_classes: Any) -> int:
    """Validates a classifier size shared by every family: an int >= 0.

    ``0`` means no classifier (as in timm): the model has no ``head`` and returns its pooled
    features, of width ``num_features``, in place of logits.

    Raises:
      TypeError: for a bool or a non-integer, naming ``num_classes``.
      ValueError: for a negative value.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise TypeError(
            f"`num_classes`: expected an int (0 for no classifier), got "
            f"{type(num_classes).__name__} {num_classes!r}"
        )
    if num_classes < 0:
        raise ValueError(
            f"`num_classes`: expected >= 0 (0 for no classifier: the model returns its pooled "
            f"features), got {num_classes}"
        )
    return int(num_classes)


_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_float_dtype(dtype: Any, argument: str, *, allow_none: bool = False) -> Any:
    """Validates a model's ``dtype`` / ``param_dtype``: float16, bfloat16, float32 or float64.

    Raises:
      TypeError: naming ``argument`` when the value is not a dtype at all (``"float8"``).
      ValueError: naming ``argument`` for a dtype that is not one of those floats (int32, the
        float8 formats, complex).
    """
    if dtype is None:
        if allow_none:
            return None
        raise TypeError(f"`{argument}`: expected a float dtype such as jnp.float32, got None")
    try:
        parsed = jnp.dtype(dtype)
    except TypeError as error:
        raise TypeError(
            f"`{argument}`: {dtype!r} is not a dtype; expected one of {', '.join(_FLOAT_DTYPES)}"
        ) from error
    if parsed.name not in _FLOAT_DTYPES:
        raise ValueError(
            f"`{argument}`: {parsed.name} is not supported; expected one of "
            f"{', '.join(_FLOAT_DTYPES)}"
        )
    return dtype

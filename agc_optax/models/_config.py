"""What every family's frozen config shares: per-stage checks and preset lookup with overrides."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any


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

"""The divergence guard's arithmetic, shared by the fused optimizers and the train step.

A guarded buffer update is ``kept(finite, increment) + decay(finite, d) * buffer``: on a skipped
step the increment is 0 and the factor 1, so the buffer keeps its value bit for bit. It selects
the increment and the factor, not the buffer: selecting between the new and the old buffer
keeps the old one alive next to the new one, and XLA then copies every donated buffer
(+534 MiB per NFNet-F0 step, ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SkipNonfiniteState(NamedTuple):
    """What a fused optimizer built with ``skip_nonfinite=True`` records of its guard.

    The field names are those of ``optax.ApplyIfFiniteState``, so
    ``optax.tree.get(state, "total_notfinite")`` reads either.

    Attributes:
      last_finite: bool scalar: the last step was finite and applied.
      total_notfinite: int32 scalar: how many steps were skipped in all.
    """

    last_finite: jax.Array
    total_notfinite: jax.Array


def initial_guard(skip_nonfinite: bool) -> Any:
    """The guard's record before the first step, or ``optax.EmptyState()`` without a guard."""
    if not skip_nonfinite:
        return optax.EmptyState()
    return SkipNonfiniteState(jnp.ones((), bool), jnp.zeros((), jnp.int32))


def next_guard(guard: Any, finite: jax.Array | None) -> Any:
    """The record after a step whose flag is ``finite`` (``None``: no guard)."""
    if finite is None:
        return guard
    return SkipNonfiniteState(finite, guard.total_notfinite + (~finite).astype(jnp.int32))


def kept(finite: jax.Array | None, increment: Any) -> Any:
    """``increment`` on a finite step, else 0 (``finite`` ``None``: always ``increment``)."""
    return increment if finite is None else jnp.where(finite, increment, 0)


def decay(finite: jax.Array | None, factor: Any) -> Any:
    """``factor`` on a finite step, else 1 (``finite`` ``None``: always ``factor``)."""
    return factor if finite is None else jnp.where(finite, factor, 1)


def next_count(finite: jax.Array | None, count: jax.Array) -> jax.Array:
    """A step count after a step: it advances on finite steps only."""
    new = optax.safe_increment(count)
    return new if finite is None else jnp.where(finite, new, count)


def find_guard(opt_state: Any) -> SkipNonfiniteState | None:
    """The :class:`SkipNonfiniteState` in an optimizer state, or ``None`` when it has none."""
    found = [
        node
        for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SkipNonfiniteState))
        if isinstance(node, SkipNonfiniteState)
    ]
    if len(found) > 1:
        raise ValueError(
            "The optimizer state holds more than one skip_nonfinite guard; build the chain with "
            "skip_nonfinite=True on one fused optimizer only."
        )
    return found[0] if found else None

"""Argument and tree checks shared by every transform (private).

Each check raises a ``ValueError``/``TypeError`` that names the argument or the leaf path and
says what to pass instead. Only concrete values can be checked: traced ones (``jit``,
``optax.inject_hyperparams``) pass through.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_value(value: Any) -> np.ndarray | None:
    """``value`` as a NumPy array if it is a concrete number or array, else ``None``.

    ``None`` for tracers (``jit``, ``optax.inject_hyperparams`` under ``jit``), whose values are
    not known at trace time, and for anything that is not a number or an array.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, numbers.Number | np.ndarray | np.generic | jax.Array):
        return np.asarray(value)
    return None


def _real_value(name: str, value: Any, example: str = "0.9") -> np.ndarray | None:
    """:func:`concrete_value`, after a ``TypeError`` for a value that is not a real number.

    ``None`` and tracers give ``None`` (nothing to check); a string, a complex number or any
    other object is a ``TypeError`` naming the argument.
    """
    if value is None or isinstance(value, jax.core.Tracer):
        return None
    arr = concrete_value(value)
    if arr is not None and arr.dtype.kind in "biuf":
        return arr
    if isinstance(value, jax.Array | np.ndarray):
        what = f"an array of dtype {arr.dtype}"
    else:
        what = f"{type(value).__name__} {value!r}"
    if isinstance(value, str):
        try:
            number = float(value)
            example = repr(int(number) if example.isdigit() else number)
        except ValueError:
            pass
    raise TypeError(
        f"`{name}` must be a real number (a Python number or a scalar array), got {what}; "
        f"pass e.g. `{name}={example}`."
    )


def check_hyperparameter(
    name: str, value: Any, *, below: float | None = None, why: str = "", allow_inf: bool = False
) -> None:
    """A concrete hyperparameter must be finite and >= 0 (and < ``below`` if given).

    ``allow_inf`` also admits ``+inf``, for thresholds where it means "never clip" (the
    large-batch sweep switches AGC off that way under ``optax.inject_hyperparams``).

    Python numbers, NumPy values and concrete ``jax.Array`` values are all checked alike.
    Traced values (a ``jax.core.Tracer``: ``optax.inject_hyperparams`` or a schedule under
    ``jit``) cannot be checked at trace time and pass unchecked. ``None`` passes (the caller
    decides what it means). ``why`` ends the error for ``below`` (e.g. "; the paper uses 0.98").
    """
    arr = _real_value(name, value)
    if arr is None:
        return
    allowed = np.isfinite(arr) | (allow_inf & np.isposinf(arr))
    if not np.all(allowed) or np.any(arr < 0):
        what = "a number >= 0 (inf: never clip)" if allow_inf else "a finite number >= 0"
        raise ValueError(f"`{name}` must be {what}, got {_show(value)}.")
    if below is not None and not np.all(arr < below):
        raise ValueError(f"`{name}` must be in [0, {below:g}), got {_show(value)}{why}.")


def check_count(name: str, value: Any, minimum: int, why: str = "") -> None:
    """A concrete step count (``warmup_steps``) must be an integer >= ``minimum``.

    Checked like :func:`check_hyperparameter`: concrete numbers and arrays alike, tracers pass.
    """
    arr = _real_value(name, value, example="100")
    if arr is None:
        return
    if (
        isinstance(value, bool)
        or arr.dtype == np.bool_
        or arr.ndim != 0
        or not np.isfinite(arr)
        or int(arr) != arr
        or arr < minimum
    ):
        raise ValueError(f"`{name}` must be an integer >= {minimum}{why}, got {_show(value)}.")


def _show(value: Any) -> str:
    """A short repr of a hyperparameter for errors: arrays show their values."""
    if isinstance(value, jax.Array | np.ndarray | np.generic) and not isinstance(value, bool):
        arr = np.asarray(value)
        return f"an array holding {arr.item()!r}" if arr.ndim == 0 else f"an array {arr!r}"
    return repr(value)


def check_static_flag(name: str, value: Any) -> None:
    """A flag that shapes the computation (``stats``, ``nesterov``) must be a Python bool.

    Truthy stand-ins (``"yes"``, 1, None) are a ``TypeError``, not silently taken as flags.

    ``optax.inject_hyperparams`` turns bools into arrays unless they are listed in its
    ``static_args``; say so instead of failing later with a tracer-conversion error.
    """
    if isinstance(value, jax.Array | np.ndarray):
        raise TypeError(
            f"`{name}` must be a Python bool, got an array. With `optax.inject_hyperparams`, "
            f"list it in `static_args`, e.g. `static_args=({name!r},)`."
        )
    if not isinstance(value, bool | np.bool_):
        raise TypeError(
            f"`{name}` must be a bool (True or False), got {type(value).__name__} {value!r}; "
            f"pass e.g. `{name}=True`."
        )


def is_static_zero(value: Any) -> bool:
    """True for ``None`` or a concrete Python/NumPy number equal to 0.

    Decides at trace time whether an optional term (momentum buffers, weight decay) exists. An
    array value counts as non-zero even when it holds 0, so ``optax.inject_hyperparams``, which
    passes hyperparameters as arrays to both ``init`` and ``update``, always gets the term and a
    traced value never has to be converted to a Python bool.
    """
    if value is None:
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, jax.Array) and value == 0


def check_float_leaf(path: str, leaf: Any, what: str) -> None:
    """A leaf that is clipped must hold floating-point numbers; ``what`` names it in the error."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        kind = type(leaf)
        name = "Python " + kind.__name__ if kind.__module__ == "builtins" else kind.__qualname__
        raise TypeError(
            f"`{path}`: {what} is a {name} ({leaf!r}), not an array; gradient clipping needs "
            f"floating-point arrays. Pass `jnp.asarray(...)` leaves (e.g. "
            f"`jax.tree.map(jnp.asarray, params)`), or skip this leaf with "
            f'`exclude=r"{path}$"`.'
        )
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"`{path}`: {what} has dtype {dtype}; gradient clipping needs floating-point leaves. "
            f"Pass only trainable float parameters (e.g. `nnx.state(model, nnx.Param)`), or skip "
            f'this leaf with `exclude=r"{path}$"`.'
        )


def check_same_paths(who: str, got: list[str], want: list[str], got_name: str, want_name: str):
    """Raises a ``ValueError`` listing the leaf paths that differ between two trees."""
    if got == want:
        return
    missing = sorted(set(got) - set(want))
    extra = sorted(set(want) - set(got))
    parts = []
    if missing:
        parts.append(
            f"in {got_name} but not {want_name}: {', '.join(f'`{p}`' for p in missing[:5])}"
        )
    if extra:
        parts.append(f"in {want_name} but not {got_name}: {', '.join(f'`{p}`' for p in extra[:5])}")
    detail = "; ".join(parts) or "the same paths in a different order"
    raise ValueError(
        f"{who}: `{got_name}` and `{want_name}` must have the same tree structure ({detail}). "
        "Pass the params the gradients were taken with, filtered the same way."
    )

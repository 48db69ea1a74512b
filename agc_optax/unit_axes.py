"""Leaf paths and per-leaf unit-axis rules.

A *unit* is the slice of a parameter whose gradient norm AGC compares with its weight norm. For a
leaf of shape ``S`` and unit axes ``U``, there is one unit per index into the axes ``U``; the
norm of a unit reduces over every other axis. ``()`` makes the whole leaf one unit; ``None``
leaves the leaf unclipped.

Every rule in this module speaks in *paths*: the leaf's pytree keys joined by ``/``, with the
trailing ``value`` attribute of a Flax NNX ``Variable`` dropped, so that one rule matches the leaves
of an ``nnx.Optimizer`` update (``blocks/0/kernel``) and of an ``nnx.split`` state
(``blocks/0/kernel/value``) alike.

Writing rules for layouts the defaults cannot know:

* ``LinearGeneral`` with several output axes, kernel ``(in, H, D)``:
  ``(r"attn/qkv/kernel", (-2, -1))``.
* Scanned or stacked layers with a leading layer axis, kernel ``(L, in, out)``: the layer axis also
  indexes units, ``(r"layers/.*/kernel", (0, -1))``.
* PyTorch-style ``(out, in)`` weights: one unit per row, ``(r"weight$", (0,))``.
* Rules may also be callables ``(path, leaf) -> axes | None`` or a pytree of axes matching params.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

UnitAxes = tuple[int, ...] | None
"""Axes that index units (``()``: the whole leaf is one unit), or ``None``: leave the leaf alone."""

UnitAxesRule = (
    None
    | Callable[[str, Any], UnitAxes]
    | Sequence[tuple[str, UnitAxes]]
    | Any  # a pytree matching params whose leaves are tuples of ints or None
)
ExcludeRule = None | str | Sequence[str] | Callable[[str, Any], bool]
NormOrder = int | float
"""A unit norm: 2 (Euclidean), 1, or ``math.inf``."""

#: Last path names that hold per-channel vectors or scalars: one unit for the whole leaf.
VECTOR_NAMES = frozenset({"bias", "scale", "gain", "skip_gain", "offset", "b"})
_ATTENTION_IN_NAMES = frozenset({"query", "key", "value"})


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_from_keys(keys: Sequence[Any]) -> str:
    """The ``/``-joined path of a pytree key path, without an NNX Variable's ``value`` attribute."""
    keys = list(keys)
    # NNX Variables flatten through the attribute ``value`` (a GetAttrKey); a dict key named
    # "value" (an attention projection) is a real name and is kept.
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_name(k) for k in keys)


def leaf_paths(tree: Any) -> list[str]:
    """Paths of the leaves of ``tree``, in ``jax.tree.leaves`` order."""
    return [path_from_keys(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def infer_unit_axes(path: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The default unit axes for a leaf, from its path and shape.

    Rules, first match wins:

    * rank 0 or 1, or a last path name in ``bias``, ``scale``, ``gain``, ``skip_gain``, ``offset``,
      ``b``: ``()``, the whole leaf is one unit (as DeepMind's NFNet code treats vectors; this also
      covers the 2-D ``(H, D)`` biases of attention projections);
    * ``.../embedding`` (``nnx.Embed`` table ``(V, F)``): ``(0,)``, one unit per row (per token);
    * attention ``query``/``key``/``value`` kernels ``(in, H, D)``: ``(-2, -1)``, one unit per
      output feature of each head;
    * attention ``out`` kernel ``(H, D, F)``: ``(-1,)``;
    * any other leaf of rank >= 2 (``Linear`` ``(in, out)``, ``Conv`` 1D/2D/3D and
      ``ConvTranspose`` in Flax's ``(spatial..., in, out)`` layout): ``(-1,)``, one unit per
      output feature.

    Size-1 dimensions never change the units: a ``(1, N)`` kernel has ``N`` units.

    Args:
      path: the leaf's path, e.g. ``"blocks/0/conv1/kernel"``.
      shape: the leaf's shape.

    Returns:
      Unit axes, possibly negative.
    """
    names = path.split("/") if path else []
    last = names[-1] if names else ""
    parent = names[-2] if len(names) >= 2 else ""
    rank = len(shape)
    if rank <= 1 or last in VECTOR_NAMES:
        return ()
    if last == "embedding":
        return (0,)
    if last == "kernel" and rank == 3 and parent in _ATTENTION_IN_NAMES:
        return (-2, -1)
    return (-1,)


# --------------------------------------------------------------------------- rule resolution


def _is_axes(x: Any) -> bool:
    return x is None or (isinstance(x, tuple) and all(isinstance(a, int | np.integer) for a in x))


def _is_pattern_list(rule: Any) -> bool:
    return (
        isinstance(rule, list | tuple)
        and len(rule) > 0
        and all(
            isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)
            for item in rule
        )
    )


def _normalize_axes(path: str, axes: Any, shape: Sequence[int], source: str) -> UnitAxes:
    """Checks a rule's answer and makes its axes non-negative and sorted."""
    if axes is None:
        return None
    if isinstance(axes, int | np.integer):
        axes = (int(axes),)
    if not _is_axes(axes):
        raise TypeError(
            f"`{path}`: {source} gave unit axes {axes!r}; expected a tuple of ints "
            "(e.g. (-1,)), () for the whole leaf, or None to leave the leaf unclipped."
        )
    rank = len(shape)
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"`{path}`: unit axes {tuple(axes)} out of range for shape {tuple(shape)}; "
                f"give a rule with axes in [-{rank}, {rank - 1}], such as "
                f"{'(-1,)' if rank else '()'}."
            )
        out.append(int(a) % rank)
    if len(set(out)) != len(out):
        raise ValueError(f"`{path}`: unit axes {tuple(axes)} repeat an axis of shape {shape}.")
    return tuple(sorted(out))


def _compile_exclude(exclude: ExcludeRule) -> Callable[[str, Any], bool]:
    if exclude is None:
        return lambda path, leaf: False
    if callable(exclude):
        return exclude
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(
                f"`exclude` must be a regex, a sequence of regexes or a callable "
                f"(path, leaf) -> bool; got an item {p!r}."
            )
    compiled = [re.compile(p) for p in patterns]
    return lambda path, leaf: any(c.search(path) for c in compiled)


def _rule_for_each_leaf(params: Any, unit_axes: UnitAxesRule) -> list[tuple[Any, str]]:
    """For each leaf of params: (the rule's raw answer or a sentinel to infer, who answered)."""
    paths_leaves = [
        (path_from_keys(kp), leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    ]
    if unit_axes is None:
        return [(_INFER, "infer_unit_axes")] * len(paths_leaves)
    if _is_pattern_list(unit_axes):
        compiled = [(re.compile(p), axes) for p, axes in unit_axes]
        out = []
        for path, _ in paths_leaves:
            hit = next(((c.pattern, axes) for c, axes in compiled if c.search(path)), None)
            out.append((_INFER, "infer_unit_axes") if hit is None else (hit[1], f"rule {hit[0]!r}"))
        return out
    if callable(unit_axes):
        return [(unit_axes(path, leaf), "the unit_axes callable") for path, leaf in paths_leaves]
    # A pytree of axes: its structure must be a prefix of the params' structure.
    rule_leaves, rule_def = jax.tree_util.tree_flatten(unit_axes, is_leaf=_is_axes)
    try:
        subtrees = rule_def.flatten_up_to(params)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "`unit_axes` is a pytree whose structure does not match params; give one tuple of "
            f"axes (or None) per parameter leaf, or use a callable or (regex, axes) pairs. ({err})"
        ) from None
    out = []
    for axes, sub in zip(rule_leaves, subtrees, strict=True):
        if not _is_axes(axes):
            raise TypeError(
                f"`unit_axes` pytree holds {axes!r}; its leaves must be tuples of ints or None."
            )
        out.extend([(axes, "the unit_axes pytree")] * len(jax.tree.leaves(sub)))
    return out


_INFER = object()


def resolve_unit_axes(
    params: Any, unit_axes: UnitAxesRule = None, exclude: ExcludeRule = None
) -> list[tuple[str, UnitAxes]]:
    """The ``(path, unit_axes)`` of every leaf of ``params``, in ``jax.tree.leaves`` order.

    Axes come back non-negative and sorted; ``None`` marks a leaf that is excluded or whose rule
    returned ``None``. Raises ``ValueError``/``TypeError`` naming the leaf for bad rules.
    """
    is_excluded = _compile_exclude(exclude)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    rules = _rule_for_each_leaf(params, unit_axes)
    resolved = []
    for (kp, leaf), (axes, source) in zip(flat, rules, strict=True):
        path = path_from_keys(kp)
        shape = np.shape(leaf)
        if is_excluded(path, leaf):
            resolved.append((path, None))
            continue
        if axes is _INFER:
            axes = infer_unit_axes(path, shape)
        resolved.append((path, _normalize_axes(path, axes, shape, source)))
    return resolved


def reduction_axes(unit_axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The axes a unit's norm reduces over: every axis that does not index units."""
    return tuple(a for a in range(ndim) if a not in unit_axes)


def num_units(shape: Sequence[int], unit_axes: tuple[int, ...]) -> int:
    """How many units a leaf of ``shape`` has."""
    return math.prod(shape[a] for a in unit_axes)


def unitwise_norm(x: jax.Array, unit_axes: Sequence[int], norm: NormOrder = 2) -> jax.Array:
    """The norm of each unit of ``x``, accumulated in at least float32.

    Args:
      x: an array.
      unit_axes: the axes that index units (``()``: the whole array is one unit). Negative axes
        are allowed.
      norm: 2 (Euclidean, the default), 1, or ``float("inf")`` (largest magnitude).

    Returns:
      The norms, with the reduced axes kept as size 1 so they broadcast against ``x``: for a
      ``(3, 3, 64, 128)`` conv kernel and ``unit_axes=(-1,)`` the result has shape
      ``(1, 1, 1, 128)``.
    """
    x = jnp.asarray(x)
    axes = _normalize_axes("x", tuple(unit_axes), x.shape, "`unit_axes`")
    powered = powered_unit_norms(x, axes, check_norm(norm))
    return jnp.sqrt(powered) if norm == 2 else powered


def check_norm(norm: Any) -> NormOrder:
    """Validates a norm order: 1, 2 or inf; ``None`` means 2."""
    if norm is None:
        return 2
    if isinstance(norm, jax.core.Tracer):
        raise TypeError(
            "`norm` picks code, so it cannot be traced: with optax.inject_hyperparams, add "
            "'norm' to static_args."
        )
    if norm not in (1, 2, math.inf):
        raise ValueError(f"`norm` must be 1, 2 or float('inf'), got {norm!r}.")
    return norm


def norm_power(norm: NormOrder) -> int:
    """The power in which :func:`powered_unit_norms` returns a norm (2 for L2, else 1)."""
    return 2 if norm == 2 else 1


def powered_unit_norms(x: jax.Array, unit_axes: tuple[int, ...], norm: NormOrder = 2) -> jax.Array:
    """Each unit's norm raised to :func:`norm_power` (keepdims, at least float32).

    The squared L2 norm needs no square root, so comparisons against a squared bound stay cheap.
    """
    if norm == 2:
        return squared_unit_norms(x, unit_axes)
    magnitude = jnp.abs(x)
    magnitude = magnitude.astype(jnp.promote_types(magnitude.dtype, jnp.float32))
    reduce = jnp.sum if norm == 1 else jnp.max
    return reduce(magnitude, axis=reduction_axes(unit_axes, x.ndim), keepdims=True)


def squared_unit_norms(x: jax.Array, unit_axes: tuple[int, ...]) -> jax.Array:
    """Sum of squares over each unit (keepdims), in ``promote(x.dtype, float32)``."""
    acc = jnp.promote_types(jnp.real(x).dtype if jnp.iscomplexobj(x) else x.dtype, jnp.float32)
    if jnp.iscomplexobj(x):
        sq = jnp.square(x.real.astype(acc)) + jnp.square(x.imag.astype(acc))
    else:
        sq = jnp.square(x.astype(acc))
    return jnp.sum(sq, axis=reduction_axes(unit_axes, x.ndim), keepdims=True)


# --------------------------------------------------------------------------- describe()


@dataclasses.dataclass(frozen=True)
class UnitInfo:
    """How AGC sees one parameter leaf."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    unit_axes: UnitAxes
    num_units: int
    excluded: bool


@dataclasses.dataclass(frozen=True)
class UnitTable:
    """The rows of :func:`describe`; ``print()`` it for a table, index it by position or path."""

    rows: tuple[UnitInfo, ...]

    def __iter__(self) -> Iterator[UnitInfo]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | str) -> UnitInfo:
        if isinstance(key, str):
            for row in self.rows:
                if row.path == key:
                    return row
            raise KeyError(f"no leaf with path {key!r}; paths are e.g. {self.rows[0].path!r}")
        return self.rows[key]

    def __str__(self) -> str:
        header = ("path", "shape", "dtype", "unit axes", "units", "excluded")
        body = [
            (
                r.path,
                str(r.shape),
                r.dtype,
                "-" if r.unit_axes is None else str(r.unit_axes),
                str(r.num_units),
                "yes" if r.excluded else "",
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header]
        ]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
        clipped = sum(r.num_units for r in self.rows if r.unit_axes is not None)
        lines.append(f"{len(self.rows)} leaves, {clipped} clipped units")
        return "\n".join(line.rstrip() for line in lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


def describe(params: Any, unit_axes: UnitAxesRule = None, exclude: ExcludeRule = None) -> UnitTable:
    """Shows the units AGC will use for each leaf of ``params``, to check rules before training.

    Args:
      params: a pytree of arrays (or ``jax.ShapeDtypeStruct``), e.g.
        ``nnx.state(model, nnx.Param)``.
      unit_axes: the same rule ``adaptive_grad_clip`` takes.
      exclude: the same rule ``adaptive_grad_clip`` takes.

    Returns:
      A :class:`UnitTable`: ``print()`` it, or read ``table["head/kernel"].unit_axes``.

    Example:
      >>> import jax.numpy as jnp, agc_optax
      >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 8, 16))}, "head": {"bias": jnp.zeros(10)}}
      >>> agc_optax.describe(params)["conv/kernel"].num_units
      16
    """
    is_excluded = _compile_exclude(exclude)
    rows = []
    for leaf, (path, axes) in zip(
        jax.tree.leaves(params), resolve_unit_axes(params, unit_axes, exclude), strict=True
    ):
        shape = tuple(np.shape(leaf))
        rows.append(
            UnitInfo(
                path=path,
                shape=shape,
                dtype=str(jnp.dtype(leaf.dtype)) if hasattr(leaf, "dtype") else type(leaf).__name__,
                unit_axes=axes,
                num_units=0 if axes is None else num_units(shape, axes),
                excluded=bool(is_excluded(path, leaf)),
            )
        )
    return UnitTable(tuple(rows))

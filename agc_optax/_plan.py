"""The unit plan: how every transform sees each parameter leaf, built once per tree.

A plan (:class:`UnitTable`, what :func:`agc_optax.describe` returns) holds one row
(:class:`UnitInfo`) per leaf: its path, shape, dtype, unit axes (``None``: left alone), unit
count, whether an ``exclude`` rule removed it and whether the NFNet recipe decays it. It holds
shapes, never arrays, so it can be cached across traces. Every transform asks a
:class:`PlanCache` for the plan of its tree instead of resolving rules again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agc_optax._checks import check_float_leaf, check_same_paths
from agc_optax._norms import UnitAxes, num_units
from agc_optax.unit_axes import (
    ExcludeRule,
    UnitAxesRule,
    compile_exclude,
    gets_weight_decay,
    leaf_paths,
    resolve_leaves,
)


@dataclasses.dataclass(frozen=True)
class UnitInfo:
    """How AGC sees one parameter leaf (a row of the unit plan).

    Attributes:
      path: the leaf's path, e.g. ``"blocks/0/conv1/kernel"``.
      shape: the leaf's shape.
      dtype: the leaf's dtype, as a string.
      unit_axes: the axes that index units, non-negative and sorted; ``None``: left alone.
      num_units: how many units the leaf has (0 when left alone).
      excluded: whether an ``exclude`` rule removed the leaf.
      weight_decay: whether the NFNet recipe decays this leaf (not gains and biases, see
        :func:`agc_optax.weight_decay_mask`).
      note: in :func:`agc_optax.describe` only, why a leaf the rules would clip cannot be
        clipped (e.g. an integer leaf, which the transforms reject); empty otherwise.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    unit_axes: UnitAxes
    num_units: int
    excluded: bool
    weight_decay: bool = True
    note: str = ""

    @property
    def clipped(self) -> bool:
        """Whether the leaf's gradient is clipped at all."""
        return self.unit_axes is not None

    @property
    def units_last(self) -> bool:
        """Units are the last axis of a rank >= 2 leaf: the layout the fused kernels take."""
        rank = len(self.shape)
        return rank >= 2 and self.unit_axes == (rank - 1,)


@dataclasses.dataclass(frozen=True)
class UnitTable:
    """The unit plan of a parameter tree; ``print()`` it for a table, index it by position or path.

    Attributes:
      rows: one :class:`UnitInfo` per leaf, in ``jax.tree.leaves`` order.
      treedef: the tree's structure (``None`` for a table built by hand).
    """

    rows: tuple[UnitInfo, ...]
    treedef: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def num_units(self) -> int:
        """How many units are clipped, over all leaves."""
        return sum(r.num_units for r in self.rows)

    def __iter__(self) -> Iterator[UnitInfo]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | str) -> UnitInfo:
        if isinstance(key, str):
            for row in self.rows:
                if row.path == key:
                    return row
            if not self.rows:
                raise KeyError(
                    f"no leaf with path {key!r}: the table is empty (a tree with no leaves)"
                )
            raise KeyError(f"no leaf with path {key!r}; paths are e.g. {self.rows[0].path!r}")
        return self.rows[key]

    def check_matches(self, tree: Any, name: str, who: str) -> list[Any]:
        """The leaves of ``tree``, after checking it has this plan's structure and shapes.

        ``name`` names the tree in the error (``"updates"``), ``who`` the transform.
        """
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self.treedef:
            check_same_paths(who, leaf_paths(tree), [r.path for r in self.rows], name, "params")
        for row, x in zip(self.rows, leaves, strict=True):
            if np.shape(x) != row.shape:
                raise ValueError(
                    f"`{row.path}`: gradient shape {np.shape(x)} differs from parameter shape "
                    f"{row.shape}; pass the params the gradients were taken with."
                )
        return leaves

    def unflatten(self, leaves: list[Any]) -> Any:
        """A tree of this plan's structure holding ``leaves``."""
        return jax.tree.unflatten(self.treedef, leaves)

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
        if any(r.note for r in self.rows):
            header += ("note",)
            body = [(*row, r.note) for row, r in zip(body, self.rows, strict=True)]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header]
        ]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
        lines.append(f"{len(self.rows)} leaves, {self.num_units} clipped units")
        return "\n".join(line.rstrip() for line in lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


def _dtype_name(leaf: Any) -> str:
    return str(jnp.dtype(leaf.dtype)) if hasattr(leaf, "dtype") else type(leaf).__name__


def build_plan(
    tree: Any, unit_axes: UnitAxesRule, is_excluded: Any, what: str | None = "the parameter"
) -> UnitTable:
    """Resolves the rules for every leaf of ``tree`` (trace-time Python only).

    ``what`` names the tree in dtype errors; ``None`` skips the check that clipped leaves are
    floating point (``describe`` shows any tree).
    """
    rows = []
    for path, leaf, axes, excluded in resolve_leaves(tree, unit_axes, is_excluded):
        note = ""
        if axes is not None:
            try:
                check_float_leaf(path, leaf, what or "the leaf")
            except TypeError:
                if what is not None:
                    raise
                # describe(): show what the transforms would do, which is to refuse the leaf.
                axes, note = None, "not a float array: the transforms raise; exclude it"
        shape = tuple(np.shape(leaf))
        rows.append(
            UnitInfo(
                path=path,
                shape=shape,
                dtype=_dtype_name(leaf),
                unit_axes=axes,
                num_units=0 if axes is None else num_units(shape, axes),
                excluded=excluded,
                weight_decay=gets_weight_decay(path),
                note=note,
            )
        )
    return UnitTable(tuple(rows), jax.tree.structure(tree))


class PlanCache:
    """The plans of one transform's rules, cached by tree structure, shapes and dtypes.

    Bad rules (an invalid regex, a non-callable ``exclude``) fail when the cache is made, i.e.
    when the transform is constructed. Rules are evaluated once per distinct tree: a callable
    rule should depend on the path and the leaf's shape and dtype only, not on its values.
    """

    _MAX_PLANS = 16

    def __init__(self, unit_axes: UnitAxesRule, exclude: ExcludeRule):
        self.unit_axes = unit_axes
        self.is_excluded = compile_exclude(exclude)
        self._plans: dict[Any, UnitTable] = {}

    def __call__(self, tree: Any, what: str = "the parameter") -> UnitTable:
        leaves, treedef = jax.tree.flatten(tree)
        key = (treedef, tuple((np.shape(x), _dtype_name(x)) for x in leaves))
        try:
            plan = self._plans.get(key)
        except TypeError:  # a pytree node with unhashable metadata: no caching
            return build_plan(tree, self.unit_axes, self.is_excluded, what)
        if plan is None:
            plan = build_plan(tree, self.unit_axes, self.is_excluded, what)
            if len(self._plans) >= self._MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return plan


def describe(params: Any, unit_axes: UnitAxesRule = None, exclude: ExcludeRule = None) -> UnitTable:
    """Shows the units AGC will use for each leaf of ``params``, to check rules before training.

    This is the unit plan the transforms themselves use.

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
    return build_plan(params, unit_axes, compile_exclude(exclude), what=None)

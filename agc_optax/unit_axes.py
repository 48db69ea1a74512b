"""Leaf paths and per-leaf unit-axis rules (resolved into a unit plan by ``agc_optax._plan``).

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
* PyTorch-style ``(out, in, ...)`` weights (timm, torchvision layouts): ``unit_axes=TORCH_LAYOUT``,
  one unit per output row for rank >= 2 and the whole leaf for 1-D and scalar leaves. Not
  ``[(r"weight$", (0,))]``: that also matches 1-D norm-layer weights (``bn1/weight``) and makes
  every element its own unit.
* Rules may also be callables ``(path, leaf) -> axes | None`` or a pytree of axes matching params.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from agc_optax._norms import UnitAxes, is_axes, normalize_axes

UnitAxesRule = (
    None
    | Callable[[str, Any], UnitAxes]
    | Sequence[tuple[str, UnitAxes]]
    | Any  # a pytree matching params whose leaves are tuples of ints or None
)
ExcludeRule = None | str | Sequence[str] | Callable[[str, Any], bool]

#: Last path names that hold per-channel vectors or scalars: one unit for the whole leaf.
VECTOR_NAMES = frozenset({"bias", "scale", "gain", "skip_gain", "offset", "b"})
_ATTENTION_IN_NAMES = frozenset({"query", "key", "value"})


def _torch_layout(path: str, leaf: Any) -> tuple[int, ...]:
    """Unit axes for PyTorch-style parameters, where the output axis comes first.

    A rank >= 2 leaf (``Linear`` ``(out, in)``, ``Conv2d`` ``(out, in, kh, kw)``) gets one unit
    per output row, ``(0,)``; a 1-D or scalar leaf (biases, norm-layer weights such as
    ``bn1/weight``) is one unit, ``()``. This is timm's and Composer's ``unitwise_norm``. Pass it
    as ``unit_axes=agc_optax.TORCH_LAYOUT`` to any AGC transform or to
    :func:`agc_optax.describe`.
    """
    del path
    return (0,) if len(np.shape(leaf)) >= 2 else ()


_torch_layout.__name__ = _torch_layout.__qualname__ = "TORCH_LAYOUT"

#: A ``unit_axes`` rule for PyTorch-style ``(out, in, ...)`` weights: ``(0,)`` for rank >= 2,
#: the whole leaf for rank <= 1 (biases, norm-layer weights).
TORCH_LAYOUT: Callable[[str, Any], UnitAxes] = _torch_layout


def gets_weight_decay(path: str) -> bool:
    """Whether the NFNet recipe decays a leaf: all but gains and biases (last name in
    :data:`VECTOR_NAMES`), as in DeepMind's NFNet training code."""
    return path.rsplit("/", 1)[-1] not in VECTOR_NAMES


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


def _is_pattern_list(rule: Any) -> bool:
    return (
        isinstance(rule, list | tuple)
        and len(rule) > 0
        and all(
            isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)
            for item in rule
        )
    )


def _compile_regex(pattern: str, argument: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(
            f"`{argument}`: {pattern!r} is not a valid regular expression ({err}); escape "
            "special characters such as ( [ . with a backslash."
        ) from None


def compile_exclude(exclude: ExcludeRule) -> Callable[[str, Any], bool]:
    """The ``exclude`` rule as a predicate ``(path, leaf) -> bool``; bad rules fail here."""
    if exclude is None:
        return lambda path, leaf: False
    if callable(exclude):
        return exclude
    if not isinstance(exclude, str | list | tuple):
        raise TypeError(
            "`exclude` must be a regex, a sequence of regexes or a callable "
            f"(path, leaf) -> bool; got {exclude!r}."
        )
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(
                f"`exclude` must be a regex, a sequence of regexes or a callable "
                f"(path, leaf) -> bool; got an item {p!r}."
            )
    compiled = [_compile_regex(p, "exclude") for p in patterns]
    return lambda path, leaf: any(c.search(path) for c in compiled)


_INFER = object()


def _raw_rules(
    paths_leaves: list[tuple[str, Any]], params: Any, unit_axes: UnitAxesRule
) -> list[tuple[Any, str]]:
    """For each leaf: (the rule's raw answer or a sentinel to infer, who answered)."""
    if unit_axes is None:
        return [(_INFER, "infer_unit_axes")] * len(paths_leaves)
    if _is_pattern_list(unit_axes):
        compiled = [(_compile_regex(p, "unit_axes"), axes) for p, axes in unit_axes]
        out = []
        for path, _ in paths_leaves:
            hit = next(((c.pattern, axes) for c, axes in compiled if c.search(path)), None)
            out.append((_INFER, "infer_unit_axes") if hit is None else (hit[1], f"rule {hit[0]!r}"))
        return out
    if callable(unit_axes):
        return [(unit_axes(path, leaf), "the unit_axes callable") for path, leaf in paths_leaves]
    # A pytree of axes: its structure must be a prefix of the params' structure.
    rule_leaves, rule_def = jax.tree_util.tree_flatten(unit_axes, is_leaf=is_axes)
    try:
        subtrees = rule_def.flatten_up_to(params)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "`unit_axes` is a pytree whose structure does not match params; give one tuple of "
            f"axes (or None) per parameter leaf, or use a callable or (regex, axes) pairs. ({err})"
        ) from None
    out = []
    for axes, sub in zip(rule_leaves, subtrees, strict=True):
        if not is_axes(axes):
            raise TypeError(
                f"`unit_axes` pytree holds {axes!r}; its leaves must be tuples of ints or None."
            )
        out.extend([(axes, "the unit_axes pytree")] * len(jax.tree.leaves(sub)))
    return out


def resolve_leaves(
    params: Any, unit_axes: UnitAxesRule, is_excluded: Callable[[str, Any], bool]
) -> list[tuple[str, Any, UnitAxes, bool]]:
    """``(path, leaf, unit_axes, excluded)`` of every leaf, in ``jax.tree.leaves`` order.

    Axes come back non-negative and sorted; ``None`` marks a leaf that is excluded or whose rule
    returned ``None``. Raises ``ValueError``/``TypeError`` naming the leaf for bad rules.
    """
    paths_leaves = [
        (path_from_keys(kp), leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    ]
    resolved = []
    for (path, leaf), (axes, source) in zip(
        paths_leaves, _raw_rules(paths_leaves, params, unit_axes), strict=True
    ):
        if is_excluded(path, leaf):
            resolved.append((path, leaf, None, True))
            continue
        shape = np.shape(leaf)
        if axes is _INFER:
            axes = infer_unit_axes(path, shape)
        resolved.append((path, leaf, normalize_axes(path, axes, shape, source), False))
    return resolved

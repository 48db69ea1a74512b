"""Independent float64 NumPy reference of AGC (Brock et al. 2021, eq. 3), and test tree helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def reduce_axes(ndim: int, unit_axes: tuple[int, ...]) -> tuple[int, ...]:
    units = {a % ndim for a in unit_axes} if ndim else set()
    return tuple(a for a in range(ndim) if a not in units)


def unit_norms(x: np.ndarray, unit_axes: tuple[int, ...]) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.sqrt(np.sum(x * x, axis=reduce_axes(x.ndim, unit_axes), keepdims=True))


def agc(g, w, unit_axes, clipping, eps):
    """Returns (clipped gradient in float64, clipped mask, ratio ||G||/max(||W||, eps))."""
    g64 = np.asarray(g, np.float64)
    g_norm = unit_norms(g64, unit_axes)
    w_floor = np.maximum(unit_norms(w, unit_axes), eps)
    bound = clipping * w_floor
    clip = g_norm > bound
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(clip, g64 * (bound / g_norm), g64)
        ratio = g_norm / w_floor
    return out, clip, ratio


def random_tree(shapes, seed, scale=1.0, dtype=jnp.float32):
    """A tree of normal random arrays shaped like ``shapes`` (a tree of shape tuples)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s) * scale, dtype),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def max_rel_diff(a, b):
    """Largest normwise relative difference over leaves, ``|a - b|_inf / |b|_inf``.

    Leaves must agree in dtype and shape.
    """
    out = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        denom = max(np.max(np.abs(y)), 1e-30)
        out = max(out, float(np.max(np.abs(x - y)) / denom))
    return out


def run_steps(tx, params, grads_seq):
    """Runs ``tx`` (jitted update, then ``optax.apply_updates``) over a gradient sequence.

    Returns ``(updates of every step, final params, final optimizer state)``.
    """
    state = tx.init(params)
    step = jax.jit(tx.update)
    outs = []
    for grads in grads_seq:
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        outs.append(updates)
    return outs, params, state


def with_entry(tree, path, entry, value):
    """``tree`` with one entry of the leaf at ``path`` (keys) set to ``value``."""
    tree = jax.tree.map(jnp.asarray, tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = node[path[-1]].at[entry].set(value)
    return tree

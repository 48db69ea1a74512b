"""Shared benchmark machinery: interleaved timing, XLA byte counts, model-shaped trees."""

from __future__ import annotations

import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int = 15, warmup: int = 2, seed: int = 0
) -> dict[str, float]:
    """Median seconds per call of each thunk, measured round-robin so that drift hits all alike.

    Each round runs the contenders in a fresh random order: with a fixed order, whichever thunk
    runs first after another (allocator and cache state left behind by its predecessor) was
    measured 2-10% differently from the same program in another slot.
    """
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    rng = random.Random(seed)
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            start = time.perf_counter()
            jax.block_until_ready(fns[name]())
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples[name]) for name in fns}


def feedback_thunk(fn: Callable[..., Any], carry: Any, *args: Any) -> Callable[[], Any]:
    """A thunk running ``carry = fn(carry, *args)``: with ``carry`` donated, each call updates
    its buffers in place, as a training loop does."""
    box = [carry]

    def go() -> Any:
        box[0] = fn(box[0], *args)
        return box[0]

    return go


def donated_steps(
    steps: dict[str, Callable[..., Any]],
    make_params: Callable[[], Any],
    inits: dict[str, Any],
    grads: Any,
) -> tuple[dict[str, Callable[[], Any]], dict[str, float]]:
    """Thunks that run each jitted ``step(params, state, grads) -> (params, state)``, feeding the
    donated outputs back in, and each step's XLA bytes accessed.

    ``inits[name]`` is the optimizer's ``init``; every contender gets fresh params.
    """
    thunks, nbytes = {}, {}
    for name, step in steps.items():
        params = make_params()
        state = inits[name](params)
        nbytes[name] = bytes_accessed(step, params, state, grads)
        thunks[name] = feedback_thunk(
            lambda carry, g, step=step: step(*carry, g), (params, state), grads
        )
    return thunks, nbytes


def bytes_accessed(jitted: Any, *args: Any) -> float:
    """XLA's estimate of bytes read and written by one call of a jitted function."""
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, Sequence):  # older jax returned one dict per computation
        cost = cost[0]
    return float(cost.get("bytes accessed", float("nan")))


def max_relative_difference(a: Any, b: Any) -> float:
    """Largest ``max|a - b| / max|b|`` over the leaves of two trees (0 for equal trees)."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(float(np.max(np.abs(y), initial=0.0)), np.finfo(np.float32).tiny)
        worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)) / scale)
    return worst


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def machine() -> str:
    dev = jax.devices()[0]
    return (
        f"{platform.processor() or platform.machine()}, {jax.device_count()} x {dev.device_kind} "
        f"({dev.platform}), jax {jax.__version__}"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(x: Any) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ parameter shapes


def resnet50_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """torchvision ResNet-50 parameter shapes in Flax HWIO layout (25,557,032 parameters)."""
    shapes: dict[str, tuple[int, ...]] = {"stem/conv/kernel": (7, 7, 3, 64)}
    shapes |= {"stem/bn/scale": (64,), "stem/bn/bias": (64,)}
    in_ch = 64
    for stage, (depth, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for block in range(depth):
            p = f"stage{stage}/block{block}"
            for i, (k, cin, cout) in enumerate(
                ((1, in_ch, width), (3, width, width), (1, width, 4 * width))
            ):
                shapes[f"{p}/conv{i}/kernel"] = (k, k, cin, cout)
                shapes[f"{p}/bn{i}/scale"] = shapes[f"{p}/bn{i}/bias"] = (cout,)
            if block == 0:
                shapes[f"{p}/proj/kernel"] = (1, 1, in_ch, 4 * width)
                shapes[f"{p}/proj_bn/scale"] = shapes[f"{p}/proj_bn/bias"] = (4 * width,)
            in_ch = 4 * width
    shapes |= {"head/kernel": (2048, num_classes), "head/bias": (num_classes,)}
    return shapes


def vit_b16_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """ViT-B/16 at 224px parameter shapes in Flax layout (86.6M parameters)."""
    d, heads, mlp, layers = 768, 12, 3072, 12
    shapes: dict[str, tuple[int, ...]] = {
        "patch/kernel": (16, 16, 3, d),
        "patch/bias": (d,),
        "cls": (1, 1, d),
        "pos_embedding": (1, 197, d),
    }
    for i in range(layers):
        p = f"layers/{i}"
        shapes |= {f"{p}/ln1/scale": (d,), f"{p}/ln1/bias": (d,)}
        for name in ("query", "key", "value"):
            shapes[f"{p}/attn/{name}/kernel"] = (d, heads, d // heads)
            shapes[f"{p}/attn/{name}/bias"] = (heads, d // heads)
        shapes |= {f"{p}/attn/out/kernel": (heads, d // heads, d), f"{p}/attn/out/bias": (d,)}
        shapes |= {f"{p}/ln2/scale": (d,), f"{p}/ln2/bias": (d,)}
        shapes |= {f"{p}/mlp/fc1/kernel": (d, mlp), f"{p}/mlp/fc1/bias": (mlp,)}
        shapes |= {f"{p}/mlp/fc2/kernel": (mlp, d), f"{p}/mlp/fc2/bias": (d,)}
    shapes |= {"ln/scale": (d,), "ln/bias": (d,), "head/kernel": (d, num_classes)}
    shapes["head/bias"] = (num_classes,)
    return shapes


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a/b": x} -> {"a": {"b": x}}, so paths in the tree read as in a Flax model."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def random_tree(
    shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 1.0, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """A nested tree of normal random arrays with the given shapes."""
    rng = np.random.default_rng(seed)
    return nest(
        {
            path: jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale, dtype)
            for path, shape in shapes.items()
        }
    )

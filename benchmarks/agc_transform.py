"""Benchmark 1: the AGC transform vs optax.adaptive_grad_clip vs a read-2-write-1 stream.

AGC is memory bound. The floor for any implementation that reads gradient and weight and writes
the clipped gradient is a fused stream over the same bytes, ``out = g + w``. A second floor is
AGC's own norm computation without the scaling pass (the per-unit reductions of gradient and
weight, as XLA compiles them): no implementation built from XLA reductions can beat it.

Each tree is timed twice: with a fresh output buffer per call (``tx.update`` called on its own)
and with the gradients donated and updated in place (as inside a jitted training step).
"""

from __future__ import annotations

import functools

import jax
import optax

import agc_optax
from benchmarks import common

TREES = {"ResNet-50 (HWIO)": common.resnet50_shapes, "ViT-B/16": common.vit_b16_shapes}
CLIPPING, EPS = 0.01, 1e-3


def _contenders(params) -> dict[str, object]:
    ours_tx = agc_optax.adaptive_grad_clip(CLIPPING, EPS)
    optax_tx = optax.adaptive_grad_clip(CLIPPING, EPS)
    unit_axes = [row.unit_axes for row in agc_optax.describe(params)]

    def norms_alone(g, p):
        return [
            (agc_optax.unitwise_norm(a, axes), agc_optax.unitwise_norm(b, axes))
            for a, b, axes in zip(jax.tree.leaves(g), jax.tree.leaves(p), unit_axes, strict=True)
            if axes is not None
        ]

    return {
        "agc_optax": lambda g, p: ours_tx.update(g, ours_tx.init(p), p)[0],
        "optax": lambda g, p: optax_tx.update(g, optax_tx.init(p), p)[0],
        "stream": lambda g, p: jax.tree.map(lambda a, b: a + b, g, p),
        # AGC's per-unit norms: both reductions, no scaling pass.
        "norms": norms_alone,
    }


def run(repeats: int = 15, small: bool = False) -> str:
    rows = []
    for name, shapes_fn in TREES.items():
        shapes = shapes_fn()
        if small:  # smoke-test size: the first few leaves only
            shapes = dict(list(shapes.items())[:6])
        params = common.random_tree(shapes, seed=0)
        grads = common.random_tree(shapes, seed=1, scale=0.01)
        fns = _contenders(params)
        thunks, nbytes = {}, {}
        for key, fn in fns.items():
            fresh = jax.jit(fn)
            nbytes[key] = common.bytes_accessed(fresh, grads, params)
            thunks[key] = functools.partial(fresh, grads, params)
            if key != "norms":  # its outputs are per-unit vectors: nothing to donate
                donated = jax.jit(fn, donate_argnums=0)
                own_grads = common.random_tree(shapes, seed=1, scale=0.01)
                thunks[f"{key} donated"] = common.feedback_thunk(donated, own_grads, params)
        times = common.time_interleaved(thunks, repeats=repeats)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        for buffers, suffix in (("fresh", ""), ("donated", " donated")):
            ours, theirs = times["agc_optax" + suffix], times["optax" + suffix]
            stream = times["stream" + suffix]
            rows.append(
                (
                    name,
                    f"{n_params / 1e6:.1f}M",
                    buffers,
                    f"{ours * 1e3:.2f}",
                    f"{theirs * 1e3:.2f}",
                    f"{stream * 1e3:.2f}",
                    f"{times['norms'] * 1e3:.2f}",
                    f"{ours / theirs:.3f}",
                    f"{ours / stream:.2f}",
                    f"{theirs / stream:.2f}",
                    f"{times['norms'] / theirs:.2f}",
                    f"{nbytes['agc_optax'] / 2**20:.0f}",
                    f"{nbytes['optax'] / 2**20:.0f}",
                    f"{nbytes['stream'] / 2**20:.0f}",
                    f"{nbytes['norms'] / 2**20:.0f}",
                )
            )
    header = (
        "tree",
        "params",
        "gradient buffer",
        "agc_optax ms",
        "optax ms",
        "stream ms",
        "norms alone ms",
        "ours/optax",
        "ours/stream",
        "optax/stream",
        "norms alone/optax",
        "ours MiB",
        "optax MiB",
        "stream MiB",
        "norms MiB",
    )
    return (
        "### AGC transform (median of interleaved runs; MiB = XLA bytes accessed of the fresh-"
        "buffer call)\n\n" + common.markdown_table(header, rows)
    )


if __name__ == "__main__":
    print(run())

"""Benchmark 1: the AGC transform vs optax.adaptive_grad_clip vs a read-2-write-1 stream.

AGC is memory bound. The floor for any implementation that reads gradient and weight and writes
the clipped gradient is a fused stream over the same bytes, ``out = g + w``.
"""

from __future__ import annotations

import jax
import optax

import agc_optax
from benchmarks import common

TREES = {"ResNet-50 (HWIO)": common.resnet50_shapes, "ViT-B/16": common.vit_b16_shapes}


def run(repeats: int = 15, small: bool = False) -> str:
    rows = []
    for name, shapes_fn in TREES.items():
        shapes = shapes_fn()
        if small:  # smoke-test size: the first few leaves only
            shapes = dict(list(shapes.items())[:6])
        params = common.random_tree(shapes, seed=0)
        grads = common.random_tree(shapes, seed=1, scale=0.01)
        ours_tx = agc_optax.adaptive_grad_clip(0.01)
        optax_tx = optax.adaptive_grad_clip(0.01)
        ours = jax.jit(lambda g, p, tx=ours_tx: tx.update(g, tx.init(p), p)[0])
        theirs = jax.jit(lambda g, p, tx=optax_tx: tx.update(g, tx.init(p), p)[0])
        stream = jax.jit(lambda g, p: jax.tree.map(lambda a, b: a + b, g, p))
        fns = {"agc_optax": ours, "optax": theirs, "stream": stream}
        times = common.time_interleaved(
            {k: (lambda f=f, g=grads, p=params: f(g, p)) for k, f in fns.items()}, repeats=repeats
        )
        nbytes = {k: common.bytes_accessed(f, grads, params) for k, f in fns.items()}
        n_params = sum(x.size for x in jax.tree.leaves(params))
        rows.append(
            (
                name,
                f"{n_params / 1e6:.1f}M",
                f"{times['agc_optax'] * 1e3:.2f}",
                f"{times['optax'] * 1e3:.2f}",
                f"{times['stream'] * 1e3:.2f}",
                f"{times['agc_optax'] / times['optax']:.3f}",
                f"{times['optax'] / times['stream']:.2f}",
                f"{times['agc_optax'] / times['stream']:.2f}",
                f"{nbytes['agc_optax'] / 2**20:.0f}",
                f"{nbytes['optax'] / 2**20:.0f}",
                f"{nbytes['stream'] / 2**20:.0f}",
            )
        )
    header = (
        "tree",
        "params",
        "agc_optax ms",
        "optax ms",
        "stream ms",
        "ours/optax",
        "optax/stream",
        "ours/stream",
        "ours MiB",
        "optax MiB",
        "stream MiB",
    )
    return "### AGC transform (median of interleaved runs; MiB = XLA bytes accessed)\n\n" + (
        common.markdown_table(header, rows)
    )


if __name__ == "__main__":
    print(run())

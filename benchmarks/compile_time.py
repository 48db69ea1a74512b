"""Benchmark 5: compile time of an NFNet train step, with and without scan over blocks."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

import agc_optax
from agc_optax.models import create_model
from agc_optax.training import init_state, make_train_step, split_model
from benchmarks import common


def _compile_seconds(name: str, scan: bool, small: bool) -> tuple[float, int]:
    overrides = {"scan_blocks": scan}
    if small:
        overrides |= {"widths": (256, 256, 256, 256), "depths": (1, 2, 1, 1)}
    model = create_model(name, 1000, rngs=nnx.Rngs(0), **overrides)
    tx = agc_optax.sgd_agc(0.1, unit_axes=model.agc_unit_axes)
    split, params, stats = split_model(model)
    state = init_state(params, stats, tx)
    res = 16 if small else 64
    batch = (jnp.zeros((2, res, res, 3), jnp.float32), jnp.zeros((2,), jnp.int32))
    step = jax.jit(make_train_step(split, tx, seed=0))
    start = time.perf_counter()
    step.lower(state, batch).compile()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return time.perf_counter() - start, n_params


def run(repeats: int = 1, small: bool = False) -> str:
    del repeats  # one compile each: the number is seconds, not milliseconds
    names = ["nfnet_f0"] if small else ["nfnet_f0", "nfnet_f6"]
    rows = []
    for name in names:
        unrolled, n = _compile_seconds(name, False, small)
        scanned, _ = _compile_seconds(name, True, small)
        rows.append(
            (
                name,
                f"{n / 1e6:.1f}M",
                f"{unrolled:.1f}",
                f"{scanned:.1f}",
                f"{scanned / unrolled:.2f}",
            )
        )
    return "### Train-step compile time (lower + compile, seconds)\n\n" + common.markdown_table(
        ("model", "params", "unrolled s", "scan_blocks s", "scan / unrolled"), rows
    )


if __name__ == "__main__":
    print(run())

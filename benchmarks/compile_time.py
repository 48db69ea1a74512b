"""Benchmark 5: compile time of an NFNet train step, with and without scan over blocks; and
what XLA:CPU's compile time is made of (kernels shared between leaves of one shape)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import agc_optax
from agc_optax.models import create_model
from agc_optax.training import init_state, make_train_step, split_model
from benchmarks import common
from benchmarks.train_step import _compiled_two, _library_step, _optax_chain, _trainers_optimizer


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


def _seconds_to_compile(fn: Callable[..., Any], *args: Any, **jit_options: Any) -> float:
    lowered = jax.jit(fn, **jit_options).lower(*args)
    start = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - start


def _sharing_programs(num_leaves: int, units: int) -> dict[str, tuple[Callable, tuple]]:
    """Four programs that scale ``num_leaves`` same-shaped leaves by a per-unit factor, and
    differ only in where each leaf's factors come from."""
    leaves = [jnp.ones((3, 3, 16, units)) for _ in range(num_leaves)]
    factors = [jnp.ones((units,)) for _ in range(num_leaves)]
    joined = jnp.ones((num_leaves * units,))
    offsets = jnp.arange(num_leaves, dtype=jnp.int32) * units
    own_offsets = [jnp.asarray(i * units, jnp.int32) for i in range(num_leaves)]

    def own_arrays(leaves, factors):
        return [x - 0.1 * x * f for x, f in zip(leaves, factors, strict=True)]

    def static_slices(leaves, joined):
        return [x - 0.1 * x * joined[i * units : (i + 1) * units] for i, x in enumerate(leaves)]

    def runtime_offsets(leaves, joined, offsets):
        return [
            x - 0.1 * x * jax.lax.dynamic_slice(joined, (offsets[i],), (units,))
            for i, x in enumerate(leaves)
        ]

    return {
        "each leaf's factors its own array": (own_arrays, (leaves, factors)),
        "static slices of one joined vector": (static_slices, (leaves, joined)),
        "dynamic slices at offsets[i] of it": (runtime_offsets, (leaves, joined, offsets)),
        # What sgd_agc does: each offset a scalar argument of its own (the optimizer's state).
        "dynamic slices, each offset its own argument": (
            runtime_offsets,
            (leaves, joined, own_offsets),
        ),
    }


def _optimizer_programs(small: bool) -> dict[str, tuple[Callable, tuple]]:
    """NFNet-F0's optimizer alone (jit of ``tx.update``, then ``optax.apply_updates``)."""
    overrides = {"widths": (256, 256, 256, 256), "depths": (1, 1, 1, 1)} if small else {}
    model = create_model("nfnet_f0", 1000, rngs=nnx.Rngs(0), **overrides)
    _, params, _ = split_model(model)
    grads = jax.tree.map(lambda p: 0.01 * p, params)
    chain = _optax_chain(params)
    programs = {}
    for label, tx in (
        ("optax chain (AGC, weight decay, Nesterov SGD)", chain),
        ("sgd_agc", agc_optax.sgd_agc(0.1, unit_axes=model.agc_unit_axes)),
        (
            "sgd_agc(stats=True, skip_nonfinite=True)",
            agc_optax.sgd_agc(0.1, unit_axes=model.agc_unit_axes, stats=True, skip_nonfinite=True),
        ),
    ):

        def step(params, state, grads, tx=tx):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        programs[label] = (step, (params, tx.init(params), grads))
        if label.startswith("sgd_agc("):  # the same, each leaf slicing at a constant offset
            state = tx.init(params)._replace(unit_offsets=())
            programs[label + ", constant offsets"] = (step, (params, state, grads))
    return programs


def run_kernel_sharing(repeats: int = 2, small: bool = False) -> str:
    """Compile seconds (interleaved rounds, best of ``repeats``) of programs that differ only
    in how many distinct kernels XLA must generate.

    XLA:CPU compiles a fused kernel once per distinct fused computation: leaves of one shape
    that run the same elementwise code share it. A slice at a constant offset is part of the
    kernel that reads it, so each leaf that cuts its values out of a joined vector gets a kernel
    of its own, unless the offset is a runtime value: a scalar argument per leaf. ``sgd_agc``
    computes its per-unit scales on one vector of all units (one copy of the scale arithmetic)
    and each leaf's update slices its own at an offset held in the optimizer's state; the
    second table shows what that saves against constant offsets.
    """
    num_leaves, units = (16, 32) if small else (200, 256)
    sections = []
    for title, programs in (
        (f"{num_leaves} leaves of shape (3, 3, 16, {units})", _sharing_programs(num_leaves, units)),
        ("NFNet-F0's optimizer alone" + (" (narrow)" if small else ""), _optimizer_programs(small)),
    ):
        best = dict.fromkeys(programs, float("inf"))
        for _ in range(max(repeats, 1)):
            for label, (fn, args) in programs.items():
                jax.clear_caches()
                best[label] = min(best[label], _seconds_to_compile(fn, *args))
        base = next(iter(best.values()))
        rows = [(label, f"{v:.2f}", f"{v / base:.2f}") for label, v in best.items()]
        sections.append(
            f"#### {title}\n\n"
            + common.markdown_table(("program", "compile s", "vs first row"), rows)
        )
    return "### Kernel sharing and XLA:CPU compile time\n\n" + "\n\n".join(sections)


def _trainer_step_compile_seconds(name: str, small: bool) -> float:
    """Seconds to trace, lower and compile the step ``agc-train`` runs for model ``name`` (its
    model, optimizer, guard and EMA, as two programs compiled side by side; batch 16 at 128 px,
    or 2 at 16 px with ``small``), in this process."""
    overrides = {"widths": (16, 32, 48, 64), "depths": (1, 1, 1, 1)} if small else {}
    model = create_model(name, 1000, rngs=nnx.Rngs(0), canonical_conv_grads=True, **overrides)
    tx = _trainers_optimizer(model.agc_unit_axes)
    split, params, stats = split_model(model)
    state = init_state(params, stats, tx, ema=True)
    batch_size, res = (2, 16) if small else (16, 128)
    batch = (jnp.zeros((batch_size, res, res, 3), jnp.float32), jnp.zeros((batch_size,), jnp.int32))
    _, seconds, *_ = _compiled_two(_library_step(split, tx, ema=0.9999), state, batch)
    return seconds


def _compile_in_new_process(name: str, small: bool, cache_dir: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    if cache_dir is not None:
        env |= {
            "JAX_COMPILATION_CACHE_DIR": cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        }
    code = (
        "from benchmarks.compile_time import _trainer_step_compile_seconds as f; "
        f"print(f({name!r}, {small!r}))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def run_persistent_cache(repeats: int = 1, small: bool = False) -> str:
    """The trainer's step compiled in a fresh process: without JAX's persistent compilation
    cache, with an empty cache (compile and write), and again with the cache filled (a rerun or
    ``--resume`` of the same configuration)."""
    names = ["nf_resnet26"] if small else ["nf_resnet50", "nfnet_f0"]
    rows = []
    for name in names:
        for _ in range(repeats):
            without = _compile_in_new_process(name, small, None)
            with tempfile.TemporaryDirectory() as cache_dir:
                cold = _compile_in_new_process(name, small, cache_dir)
                warm = _compile_in_new_process(name, small, cache_dir)
            rows.append(
                (name, f"{without:.1f}", f"{cold:.1f}", f"{warm:.1f}", f"{warm / without:.2f}")
            )
    header = ("model", "no cache s", "empty cache s", "filled cache s", "filled / no cache")
    title = "### The trainer's step from JAX's persistent compilation cache (fresh processes)\n\n"
    return title + common.markdown_table(header, rows)


if __name__ == "__main__":
    print(run())
    print()
    print(run_kernel_sharing())
    print()
    print(run_persistent_cache())

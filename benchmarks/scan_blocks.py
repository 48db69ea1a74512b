"""Benchmark 7: NFNet train step with ``scan_blocks`` against unrolled: step time, compile time,
XLA bytes and copies, F0 / F3 / F6.

Contenders, each the library's train step (``make_train_step`` with ``sgd_agc``, the model's own
AGC unit rules, state donated):

* ``unrolled``: ``scan_blocks=False``.
* ``scanned, JAX grads``: ``scan_blocks=True`` as it was before the fix: the scanned convs take
  JAX's own gradient rule (reproduced by tracing the step with `CanonicalGradWSConv` behaving as
  a plain `WSConv`), whose gradient convolutions XLA:CPU leaves off its fast path in a loop.
* ``scanned``: ``scan_blocks=True`` as shipped (canonical gradient convolutions on CPU).

Compile seconds are one ``lower + compile`` each (not repeated); step times are medians,
interleaved for F0 and one contender after another for F3 and F6 (`SEQUENTIAL`: their states do
not fit in memory three at a time). ``copies`` counts the ``copy`` ops of the optimized HLO and the
MiB they write once (a copy inside the scanned loop runs once per layer).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import agc_optax
from agc_optax.models import CanonicalGradWSConv, WSConv, create_model
from agc_optax.training import init_state, make_train_step, split_model
from benchmarks import common

_ITEM_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "pred": 1}
SMALL = {"widths": (256, 256, 256, 256), "depths": (1, 3, 1, 1)}


@contextlib.contextmanager
def jax_gradients() -> Iterator[None]:
    """While active, `CanonicalGradWSConv` is a plain `WSConv`: the scanned convs trace with JAX's
    own gradient rule, as ``scan_blocks=True`` did before the fix."""
    with mock.patch.object(CanonicalGradWSConv, "__call__", WSConv.__call__):
        yield


def _copies(hlo_text: str) -> tuple[int, float]:
    count, nbytes = 0, 0
    for match in re.finditer(r"= (\w+)\[([\d,]*)\]\S* copy\(", hlo_text):
        dims = [int(d) for d in match.group(2).split(",") if d]
        count += 1
        nbytes += int(np.prod(dims, dtype=np.int64)) * _ITEM_BYTES.get(match.group(1), 4)
    return count, nbytes / 2**20


def _contender(
    name: str, scan: bool, jax_grads: bool, small: bool, batch_size: int, res: int, **model_kwargs
):
    overrides = (SMALL if small else {}) | model_kwargs
    model = create_model(name, 1000, rngs=nnx.Rngs(0), scan_blocks=scan, **overrides)
    tx = agc_optax.sgd_agc(0.1, unit_axes=model.agc_unit_axes)
    split, params, stats = split_model(model)
    state = init_state(params, stats, tx, ema=False)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch_size, res, res, 3)), jnp.float32)
    batch = (images, jnp.asarray(rng.integers(0, 1000, batch_size), jnp.int32))
    step = jax.jit(make_train_step(split, tx, seed=0), donate_argnums=(0,))
    with jax_gradients() if jax_grads else contextlib.nullcontext():
        start = time.perf_counter()
        executable = step.lower(state, batch).compile()
        seconds = time.perf_counter() - start
    cost = executable.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    nbytes = float(cost.get("bytes accessed", float("nan")))
    facts = (seconds, nbytes, _copies(executable.as_text()))
    live = [state]

    def go():
        live[0], metrics = executable(live[0], batch)
        return metrics["loss"]

    return go, facts


VARIANTS = {  # label -> (scan_blocks, JAX's own conv gradients)
    "unrolled": (False, False),
    "scanned, JAX grads": (True, True),
    "scanned": (True, False),
}


# Models whose contenders are timed one after another (each freed before the next is built)
# rather than interleaved: three F3 / F6 train states with their steps' temporaries took 20 GB.
SEQUENTIAL = ("nfnet_f3", "nfnet_f6")


def run(
    repeats: int = 5,
    small: bool = False,
    models: tuple[str, ...] = ("nfnet_f0", "nfnet_f3", "nfnet_f6"),
    batch_size: int = 2,
    resolution: int = 64,
) -> str:
    """One table row per (model, variant); ratios are against the model's unrolled step."""
    if small:
        models, batch_size, resolution = ("nfnet_f0",), 2, 32
    rows = []
    for name in models:
        thunks, facts, times = {}, {}, {}
        for label, (scan, jax_grads) in VARIANTS.items():
            thunks[label], facts[label] = _contender(
                name, scan, jax_grads, small, batch_size, resolution
            )
            if name in SEQUENTIAL:  # time it now and free its state before the next one
                times |= common.time_interleaved(thunks, repeats=repeats, warmup=1)
                thunks = {}
        times |= common.time_interleaved(thunks, repeats=repeats, warmup=1) if thunks else {}
        base_time, base_compile = times["unrolled"], facts["unrolled"][0]
        for label in VARIANTS:
            seconds, nbytes, (n_copies, copied) = facts[label]
            rows.append(
                (
                    name,
                    label,
                    f"{times[label] * 1e3:.0f}",
                    f"{times[label] / base_time:.2f}",
                    f"{seconds:.1f}",
                    f"{seconds / base_compile:.2f}",
                    f"{nbytes / 2**20:.0f}",
                    f"{n_copies} / {copied:.0f}",
                )
            )
    title = (
        f"### NFNet train step, scan_blocks vs unrolled (batch {batch_size}, {resolution} px, "
        f"float32, sgd_agc, {jax.default_backend()})\n\n"
    )
    header = (
        "model",
        "variant",
        "step ms",
        "step / unrolled",
        "compile s",
        "compile / unrolled",
        "XLA MiB",
        "copies / MiB",
    )
    return title + common.markdown_table(header, rows)


# Unrolled models, each at the batch and resolution of issue #16's comparison with DeepMind's step.
CANONICAL_GRADS_MODELS = {"nfnet_f0": (8, 128), "nf_resnet50": (16, 128)}


def run_canonical_grads(repeats: int = 7, small: bool = False) -> str:
    """Unrolled train steps with ``canonical_conv_grads=True`` against the default (JAX's conv
    gradients, canonicalized by XLA:CPU in the entry computation), interleaved per model."""
    rows = []
    models = {"nfnet_f0": (2, 32)} if small else CANONICAL_GRADS_MODELS
    for name, (batch_size, resolution) in models.items():
        thunks, facts = {}, {}
        for label, canonical in (("default", False), ("canonical_conv_grads", True)):
            thunks[label], facts[label] = _contender(
                name, False, False, small, batch_size, resolution, canonical_conv_grads=canonical
            )
        times = common.time_interleaved(thunks, repeats=repeats, warmup=1)
        for label in thunks:
            seconds, nbytes, (n_copies, copied) = facts[label]
            rows.append(
                (
                    f"{name} (batch {batch_size}, {resolution} px)",
                    label,
                    f"{times[label] * 1e3:.0f}",
                    f"{times[label] / times['default']:.2f}",
                    f"{seconds:.1f}",
                    f"{seconds / facts['default'][0]:.2f}",
                    f"{nbytes / 2**20:.0f}",
                    f"{n_copies} / {copied:.0f}",
                )
            )
    title = (
        f"### Unrolled train step, canonical_conv_grads vs default (float32, sgd_agc, "
        f"{jax.default_backend()})\n\n"
    )
    header = (
        "model",
        "variant",
        "step ms",
        "step / default",
        "compile s",
        "compile / default",
        "XLA MiB",
        "copies / MiB",
    )
    return title + common.markdown_table(header, rows)


if __name__ == "__main__":
    print(run())

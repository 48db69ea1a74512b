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
import functools
import re
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import agc_optax
from agc_optax.models import CanonicalGradWSConv, WSConv, conv_canonical_grads, create_model
from agc_optax.training import init_state, make_train_step, split_model
from benchmarks import common

_ITEM_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "pred": 1}
SMALL = {"widths": (256, 256, 256, 256), "depths": (1, 3, 1, 1)}


_CANONICAL_CALL = CanonicalGradWSConv.__call__


def _strided_as_wsconv(self, x):
    if any(s != 1 for s in self.strides):
        return WSConv.__call__(self, x)
    return _CANONICAL_CALL(self, x)


@contextlib.contextmanager
def strided_jax_gradients() -> Iterator[None]:
    """While active, strided `CanonicalGradWSConv` layers take JAX's own gradient rule, as before
    `conv_canonical_grads` took strides."""
    with mock.patch.object(CanonicalGradWSConv, "__call__", _strided_as_wsconv):
        yield


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
    name: str,
    scan: bool,
    jax_grads: bool | str,
    small: bool,
    batch_size: int,
    res: int,
    **model_kwargs,
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
    patch = {True: jax_gradients, "strided": strided_jax_gradients}.get(jax_grads)
    with patch() if patch else contextlib.nullcontext():
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


VARIANTS = {  # label -> (scan_blocks, JAX's own conv gradients, canonical_conv_grads)
    "unrolled": (False, False, False),
    "unrolled, canonical_conv_grads": (False, False, True),  # as agc-train builds it on CPU
    "scanned, JAX grads": (True, True, False),
    "scanned": (True, False, False),
    "scanned, canonical_conv_grads": (True, False, True),  # the flag: convs outside the stacks
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
        for label, (scan, jax_grads, canonical) in VARIANTS.items():
            thunks[label], facts[label] = _contender(
                name,
                scan,
                jax_grads,
                small,
                batch_size,
                resolution,
                canonical_conv_grads=canonical,
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
CANONICAL_GRADS_VARIANTS = {  # label -> (canonical_conv_grads, JAX's gradients for which convs)
    "default": (False, False),
    "canonical, strided with JAX grads": (True, "strided"),
    "canonical_conv_grads": (True, False),
}


def run_canonical_grads(repeats: int = 7, small: bool = False) -> str:
    """Unrolled train steps with ``canonical_conv_grads=True`` against the default (JAX's conv
    gradients, canonicalized by XLA:CPU in the entry computation), interleaved per model."""
    rows = []
    models = {"nfnet_f0": (2, 32)} if small else CANONICAL_GRADS_MODELS
    for name, (batch_size, resolution) in models.items():
        thunks, facts = {}, {}
        for label, (on, jax_grads) in CANONICAL_GRADS_VARIANTS.items():
            thunks[label], facts[label] = _contender(
                name, False, jax_grads, small, batch_size, resolution, canonical_conv_grads=on
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


# Strided convs of the two models (input shape, kernel shape, groups), at their train step's
# batch and resolution: NFNet-F0's first stem conv and its stage-1 and stage-2 transition convs
# (grouped, 128 channels per group), NF-ResNet-50's stem, stage-1 conv1 and projection.
STRIDED_CONVS = {
    "F0 stem conv0": ((8, 128, 128, 3), (3, 3, 3, 16), 1),
    "F0 stage-1 conv1": ((8, 32, 32, 256), (3, 3, 128, 256), 2),
    "F0 stage-2 conv1": ((8, 16, 16, 768), (3, 3, 128, 768), 6),
    "NF-ResNet-50 stem": ((16, 128, 128, 3), (7, 7, 3, 64), 1),
    "NF-ResNet-50 stage-1 conv1": ((16, 32, 32, 128), (3, 3, 128, 128), 1),
    "NF-ResNet-50 stage-1 projection": ((16, 32, 32, 256), (1, 1, 256, 512), 1),
}

# NF-ResNet-50's ungrouped 1x1 convs at batch 16, 128 px: (input, kernel, stride).
POINTWISE_CONVS = {
    "stage-0 conv0": ((16, 32, 32, 256), (1, 1, 256, 64), 1),
    "stage-0 conv2": ((16, 32, 32, 64), (1, 1, 64, 256), 1),
    "stage-1 projection": ((16, 32, 32, 256), (1, 1, 256, 512), 2),
    "stage-2 conv0": ((16, 8, 8, 1024), (1, 1, 1024, 256), 1),
    "stage-3 conv2": ((16, 4, 4, 512), (1, 1, 512, 2048), 1),
}


def _conv_grad_rows(cases: dict[str, tuple[Any, ...]], repeats: int) -> list[tuple[str, ...]]:
    """One row per ``label: (x_shape, w_shape, groups, stride)``: the gradient of one SAME conv,
    ``conv_canonical_grads`` against JAX's rule (both jitted alone, in the entry computation),
    interleaved; also their largest difference."""
    rows = []
    rng = np.random.default_rng(0)
    dn = ("NHWC", "HWIO", "NHWC")
    for label, (x_shape, w_shape, groups, stride) in cases.items():
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        w = jnp.asarray(0.1 * rng.standard_normal(w_shape), jnp.float32)

        def plain(x, w, groups=groups, stride=stride):
            return jax.lax.conv_general_dilated(
                x, w, (stride, stride), "SAME", dimension_numbers=dn, feature_group_count=groups
            )

        def ours(x, w, groups=groups, stride=stride):
            return conv_canonical_grads(x, w, strides=stride, feature_group_count=groups)

        grads = {
            name: jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w))), (0, 1)))
            for name, f in (("jax", plain), ("canonical", ours))
        }
        difference = common.max_relative_difference(grads["canonical"](x, w), grads["jax"](x, w))
        times = common.time_interleaved(
            {name: functools.partial(g, x, w) for name, g in grads.items()}, repeats=repeats
        )
        rows.append(
            (
                label,
                f"{x_shape}, {w_shape[:2]} kernel, {groups} group(s), stride {stride}",
                f"{times['jax'] * 1e3:.1f}",
                f"{times['canonical'] * 1e3:.1f}",
                f"{times['canonical'] / times['jax']:.2f}",
                f"{difference:.1e}",
            )
        )
    return rows


_CONV_GRAD_HEADER = ("conv", "input, kernel", "JAX ms", "canonical ms", "ratio", "max rel. diff")


def run_strided_conv_grads(repeats: int = 20) -> str:
    """Gradient of one stride-2 SAME conv, ``conv_canonical_grads`` against JAX's rule."""
    cases = {label: (*case, 2) for label, case in STRIDED_CONVS.items()}
    title = f"### Gradient of one stride-2 conv ({jax.default_backend()}, float32)\n\n"
    return title + common.markdown_table(_CONV_GRAD_HEADER, _conv_grad_rows(cases, repeats))


def run_pointwise_conv_grads(repeats: int = 20, small: bool = False) -> str:
    """Gradient of NF-ResNet-50's 1x1 convs: ``conv_canonical_grads`` (matrix products) against
    JAX's rule (convolutions)."""
    cases = {f"NF-ResNet-50 {label}": (x, w, 1, s) for label, (x, w, s) in POINTWISE_CONVS.items()}
    if small:  # a smoke test: one tiny strided case
        cases = {"tiny strided 1x1": ((2, 6, 6, 8), (1, 1, 8, 16), 1, 2)}
    title = f"### Gradient of one 1x1 conv ({jax.default_backend()}, float32)\n\n"
    return title + common.markdown_table(_CONV_GRAD_HEADER, _conv_grad_rows(cases, repeats))


if __name__ == "__main__":
    print(run())

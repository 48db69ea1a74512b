"""Benchmark: the Pallas sgd_agc step vs the XLA step, the optax chain and the memory bandwidth.

GPU/TPU only: on CPU Pallas merely interprets, so timing it says nothing and the benchmark prints
``skipped: no GPU`` (``force=True`` runs it anyway on a tiny tree, as a smoke test).

Contenders, each a whole jitted step with donated params and optimizer state on a
ResNet-50-shaped float32 tree:

* ``sgd_agc_step, Pallas``: :func:`agc_optax.kernels.sgd_agc_step`; the kernel writes the new
  weights, 7 passes over the tree (read g, w for the norms; read g, w, m, write w, m);
* ``sgd_agc, Pallas + apply_updates``: the GradientTransformation with ``implementation="pallas"``,
  then ``optax.apply_updates`` (10 passes: the update is written out and read back);
* ``sgd_agc, XLA`` and the equivalent ``optax chain``;
* the Pallas step and the XLA one again with ``skip_nonfinite=True`` (the trainer's optimizer);
* ``copy``: a device-to-device copy of one tree (2 passes), which gives the attainable bandwidth;
  ``7-pass bound`` is 3.5 copies, the least any two-phase step can take.
"""

from __future__ import annotations

import math

import jax
import optax

import agc_optax
from agc_optax import kernels
from benchmarks import common

MIN_PASSES = 7  # norms: read g, w; update: read g, w, m; write w, m


def _chain(lr: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.adaptive_grad_clip(0.01),
        optax.add_decayed_weights(2e-5, mask=agc_optax.weight_decay_mask),
        optax.sgd(lr, momentum=0.9, nesterov=True),
    )


def _stepper(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def run(repeats: int = 15, small: bool = False, force: bool = False) -> str:
    """Times the contenders; a markdown table, or a one-line skip message without a GPU/TPU.

    Args:
      repeats: timed repetitions per contender (interleaved, after warm-up).
      small: a few small leaves instead of the whole ResNet-50 tree.
      force: run even on CPU (interpret mode: a smoke test, not data).
    """
    title = "### Pallas sgd_agc step vs XLA, optax and a device-to-device copy"
    if jax.default_backend() not in ("gpu", "tpu") and not force:
        return f"{title}\n\nskipped: no GPU (backend {jax.default_backend()!r})"
    shapes = common.resnet50_shapes()
    if small:
        shapes = {
            "stage/conv0/kernel": (3, 3, 64, 128),
            "stage/conv1/kernel": (1, 1, 128, 512),
            "stage/bn/scale": (128,),
            "stage/bn/bias": (128,),
            "head/kernel": (512, 10),
            "head/bias": (10,),
        }
    lr = 0.1
    grads = common.random_tree(shapes, seed=1, scale=0.01)
    n_bytes = common.tree_bytes(grads)
    # Float32 leaves with their units last and at least MIN_SIZE elements take the kernel.
    in_kernel = sum(
        math.prod(row.shape)
        for row in agc_optax.describe(grads, None, agc_optax.HEAD_PATTERN)
        if row.units_last and math.prod(row.shape) >= kernels.MIN_SIZE
    )

    fused_tx = agc_optax.sgd_agc(lr)
    contenders = {
        "sgd_agc_step, Pallas": (
            jax.jit(agc_optax.sgd_agc_step(lr, implementation="pallas"), donate_argnums=(0, 1)),
            fused_tx,
        ),
        "sgd_agc, Pallas + apply_updates": (
            _stepper(agc_optax.sgd_agc(lr, implementation="pallas")),
            fused_tx,
        ),
        "sgd_agc, XLA": (_stepper(fused_tx), fused_tx),
        "optax chain": (_stepper(_chain(lr)), _chain(lr)),
    }
    # The divergence guard (as agc-train runs the optimizer): one more scalar in each kernel.
    guarded_tx = agc_optax.sgd_agc(lr, skip_nonfinite=True)
    contenders |= {
        "sgd_agc_step, Pallas, skip_nonfinite": (
            jax.jit(
                agc_optax.sgd_agc_step(lr, implementation="pallas", skip_nonfinite=True),
                donate_argnums=(0, 1),
            ),
            guarded_tx,
        ),
        "sgd_agc, XLA, skip_nonfinite": (_stepper(guarded_tx), guarded_tx),
    }
    thunks, nbytes = common.donated_steps(
        {name: step for name, (step, _) in contenders.items()},
        lambda: common.random_tree(shapes, seed=0),
        {name: tx.init for name, (_, tx) in contenders.items()},
        grads,
    )

    # Correctness on this device before any timing: one step from the same params and state.
    def first_step(name: str):
        step, tx = contenders[name]
        params = common.random_tree(shapes, seed=0)
        return step(params, tx.init(params), grads)[0]

    reference = first_step("sgd_agc, XLA")  # finite gradients: the guarded steps agree too
    differences = {
        name: common.max_relative_difference(first_step(name), reference)
        for name in contenders
        if "Pallas" in name
    }
    copy = jax.jit(lambda tree: jax.tree.map(lambda x: x.copy(), tree))
    fns = thunks | {"copy": lambda: copy(grads)}
    nbytes["copy"] = common.bytes_accessed(copy, grads)
    times = common.time_interleaved(fns, repeats=repeats)
    bound = times["copy"] * MIN_PASSES / 2
    rows = []
    for name, seconds in times.items():
        passes = 2 if name == "copy" else MIN_PASSES
        rows.append(
            (
                name,
                f"{seconds * 1e3:.3f}",
                f"{seconds / times['optax chain']:.3f}",
                f"{seconds / bound:.2f}",
                f"{passes * n_bytes / seconds / 2**30:.0f}",
                f"{nbytes[name] / n_bytes:.1f}",
                f"{differences[name]:.1e}" if name in differences else "-",
            )
        )
    header = (
        "contender",
        "ms",
        "vs optax chain",
        "vs 7-pass bound",
        f"GiB/s at {MIN_PASSES} passes (copy: 2)",
        "XLA passes",
        "new params vs XLA (max rel diff)",
    )
    note = (
        f"{len(jax.tree.leaves(grads))} leaves, {n_bytes / 2**20:.1f} MiB per tree, "
        f"{in_kernel / sum(x.size for x in jax.tree.leaves(grads)):.1%} of it in leaves the "
        f"kernel takes; {common.machine()}"
    )
    return f"{title}\n\n{note}\n\n" + common.markdown_table(header, rows)


if __name__ == "__main__":
    print(run())

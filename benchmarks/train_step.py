"""Benchmarks 3 and 4: AGC's share of a whole training step, and NF-ResNet-50 vs BN ResNet-50.

Both use the library's own train step (``agc_optax.training.make_train_step``) at a small
resolution so that they run on a CPU; the ratios, not the absolute numbers, are the point.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import agc_optax
from agc_optax.models import create_model
from agc_optax.training import init_state, make_train_step, split_model
from benchmarks import common

TINY = {"widths": (16, 32, 48, 64), "depths": (1, 1, 1, 1)}


def _step_runner(model: nnx.Module, tx: optax.GradientTransformation, batch):
    split, params, stats = split_model(model)
    state = init_state(params, stats, tx)
    step = jax.jit(make_train_step(split, tx, seed=0), donate_argnums=(0,))
    live = [state]

    def go():
        live[0], metrics = step(live[0], batch)
        return metrics["loss"]

    return go, jax.tree.map(jnp.copy, params)  # the step donates the originals


def _batch(batch_size: int, resolution: int):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch_size, resolution, resolution, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
    return images, labels


def _model(name: str, small: bool) -> nnx.Module:
    overrides = TINY if small else {}
    if small and name == "resnet50":
        overrides = TINY | {"stem_width": 16}
    return create_model(name, 10 if small else 1000, rngs=nnx.Rngs(0), **overrides)


def run_agc_share(repeats: int = 5, small: bool = False) -> str:
    """Benchmark 3: step time with sgd_agc vs the same recipe without AGC.

    AGC's cost is fixed by the parameter count while the step grows with batch x pixels, so the
    share is measured at two input sizes. The step difference also contains what the fused
    update saves over the unfused chain; "AGC alone / step" is the transform timed on its own.
    """
    plain = optax.chain(
        optax.add_decayed_weights(2e-5, mask=agc_optax.weight_decay_mask),
        optax.sgd(0.1, momentum=0.9, nesterov=True),
    )
    tx = agc_optax.adaptive_grad_clip(0.01, exclude=agc_optax.HEAD_PATTERN)
    agc_alone = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])
    rows = []
    for batch_size, res in ((2, 32),) if small else ((16, 128), (16, 224)):
        batch = _batch(batch_size, res)
        with_agc, params = _step_runner(_model("nf_resnet50", small), agc_optax.sgd_agc(0.1), batch)
        without, _ = _step_runner(_model("nf_resnet50", small), plain, batch)
        grads = jax.tree.map(lambda p: p * 0.01, params)
        times = common.time_interleaved(
            {
                "with": with_agc,
                "without": without,
                "alone": functools.partial(agc_alone, grads, params),
            },
            repeats=repeats,
        )
        rows.append(
            (
                batch_size,
                f"{res}px",
                f"{times['with'] * 1e3:.1f}",
                f"{times['without'] * 1e3:.1f}",
                f"{times['alone'] * 1e3:.1f}",
                f"{(times['with'] - times['without']) / times['with']:.2%}",
                f"{times['alone'] / times['with']:.2%}",
            )
        )
    header = (
        "batch",
        "resolution",
        "sgd_agc step ms",
        "step without AGC ms",
        "AGC alone ms",
        "AGC share (step difference)",
        "AGC alone / step",
    )
    return "### AGC's share of an NF-ResNet-50 train step\n\n" + common.markdown_table(header, rows)


def run_nf_vs_bn(repeats: int = 5, small: bool = False) -> str:
    """Benchmark 4: train-step throughput of NF-ResNet-50 (sgd_agc) vs BN ResNet-50 (sgd)."""
    batch = _batch(2 if small else 16, 32 if small else 128)
    sgd = optax.chain(
        optax.add_decayed_weights(1e-4, mask=agc_optax.weight_decay_mask),
        optax.sgd(0.1, momentum=0.9, nesterov=True),
    )
    runners = {
        "NF-ResNet-50 + sgd_agc": _step_runner(
            _model("nf_resnet50", small), agc_optax.sgd_agc(0.1), batch
        )[0],
        "BN ResNet-50 + SGD": _step_runner(_model("resnet50", small), sgd, batch)[0],
    }
    times = common.time_interleaved(runners, repeats=repeats)
    n = batch[0].shape[0]
    base = times["BN ResNet-50 + SGD"]
    rows = [(k, f"{v * 1e3:.1f}", f"{n / v:.1f}", f"{base / v:.2f}") for k, v in times.items()]
    res = 32 if small else 128
    title = f"### NF-ResNet-50 vs BatchNorm ResNet-50 train step (batch {n}, {res}px)"
    return f"{title}\n\n" + common.markdown_table(
        ("model", "ms / step", "images / s", "throughput vs BN"), rows
    )


if __name__ == "__main__":
    print(run_agc_share())
    print()
    print(run_nf_vs_bn())

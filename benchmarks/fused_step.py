"""Benchmark 2: the fused optimizer steps vs the equivalent optax chains.

Each contender runs a whole jitted step with donated params and optimizer state:
``(params, state, grads) -> (params + updates, new state)``.
"""

from __future__ import annotations

import jax
import optax

import agc_optax
from benchmarks import common


def _contenders(lr: float = 0.1) -> dict[str, optax.GradientTransformation]:
    mask = agc_optax.weight_decay_mask
    head = agc_optax.HEAD_PATTERN
    return {
        "sgd_agc (fused)": agc_optax.sgd_agc(lr),
        "optax chain (SGD)": optax.chain(
            optax.adaptive_grad_clip(0.01),
            optax.add_decayed_weights(2e-5, mask=mask),
            optax.sgd(lr, momentum=0.9, nesterov=True),
        ),
        "adamw_agc (fused)": agc_optax.adamw_agc(1e-3),
        "optax chain (AdamW)": optax.chain(
            agc_optax.adaptive_grad_clip(0.01, exclude=head),
            optax.adamw(1e-3, weight_decay=1e-4, mask=mask),
        ),
    }


def _stepper(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def run(repeats: int = 15, small: bool = False) -> str:
    shapes = common.resnet50_shapes()
    if small:
        shapes = dict(list(shapes.items())[:6])
    grads = common.random_tree(shapes, seed=1, scale=0.01)
    n_bytes = common.tree_bytes(grads)
    contenders = _contenders()
    thunks, nbytes = common.donated_steps(
        {name: _stepper(tx) for name, tx in contenders.items()},
        lambda: common.random_tree(shapes, seed=0),
        {name: tx.init for name, tx in contenders.items()},
        grads,
    )
    times = common.time_interleaved(thunks, repeats=repeats)
    rows = []
    for fused, chain in (
        ("sgd_agc (fused)", "optax chain (SGD)"),
        ("adamw_agc (fused)", "optax chain (AdamW)"),
    ):
        for name in (fused, chain):
            rows.append(
                (
                    name,
                    f"{times[name] * 1e3:.2f}",
                    f"{times[name] / times[chain]:.3f}",
                    f"{nbytes[name] / 2**30:.3f}",
                    f"{nbytes[name] / n_bytes:.1f}",
                )
            )
    header = ("step (ResNet-50 tree)", "ms", "vs optax chain", "GiB accessed", "passes over a tree")
    return (
        "### Fused optimizer step (median of interleaved runs, donated buffers)\n\n"
        + common.markdown_table(header, rows)
    )


if __name__ == "__main__":
    print(run())

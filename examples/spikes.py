"""Gradient spikes on a small classifier: no clipping vs global-norm clipping, AGC, AdaGC and ZClip.

A tiny NNX MLP learns scikit-learn's offline ``load_digits`` with Adam. At a few updates the
gradient is multiplied by 100 before the clipping transform sees it (an isolated spike, a burst of
three, and a late spike), the way a bad batch or a numerical fault would. Each method also runs
once without spikes, on the same batches, to show what its clipping costs in clean training.

Recovery, precisely: with :math:`L_t` the full training-set loss after :math:`t` updates and a
spike covering updates :math:`s..e`, the recovery time is the smallest :math:`k \\ge 0` such that
:math:`L_{e+k} \\le 1.02\\, L_{s-1}`: how many updates after the last spiked one until the loss
is back within 2% of its value just before the spike. ``>n`` means it did not get back before
the next spike (or the end of the run), ``n`` updates later.

    python examples/spikes.py                 # figure in runs/spikes/ (30-40 s, idle 2-core VM)
    python examples/spikes.py --steps 120 --out /tmp/spikes   # the smoke test's size
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import agc_optax


class MLP(nnx.Module):
    """64 -> 128 -> 128 -> 10, ReLU; the classifier is ``head``."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden1 = nnx.Linear(64, 128, rngs=rngs)
        self.hidden2 = nnx.Linear(128, 128, rngs=rngs)
        self.head = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(jax.nn.relu(self.hidden2(jax.nn.relu(self.hidden1(x)))))


@dataclass(frozen=True)
class Setup:
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 3e-3
    spike_factor: float = 100.0
    seeds: tuple[int, ...] = (0, 1, 2)

    @property
    def spikes(self) -> list[tuple[int, int]]:
        """(first, last) spiked update, 1-based, as fractions of the run so any --steps works."""
        n = self.steps
        single, burst, late = round(n / 3), round(n * 0.55), round(n * 0.8)
        return [(single, single), (burst, burst + 2), (late, late)]


METHODS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "none": optax.identity,
    # The usual LLM default threshold.
    "global norm 1.0": lambda: optax.clip_by_global_norm(1.0),
    # AGC with the classifier excluded, as the NFNet recipe does; 0.05 suits this small batch.
    "AGC 0.05": lambda: agc_optax.adaptive_grad_clip(0.05, exclude=r"head/kernel"),
    # The papers' defaults.
    "AdaGC": agc_optax.adagc,
    "ZClip": agc_optax.zclip,
}


def load_data() -> tuple[np.ndarray, ...]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def run(setup: Setup, clip: optax.GradientTransformation, data) -> dict[str, np.ndarray]:
    """Every seed, with and without spikes, as one jitted, vmapped scan over the updates.

    Returns arrays indexed ``[spiked (0: clean, 1: spiked), seed, ...]``: ``loss`` (full
    training-set loss after each update, index 0 before training), ``clipped`` (whether the
    clipping transform changed the gradient at each update) and ``accuracy`` (test set).
    """
    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in data)
    tx = optax.chain(clip, optax.adam(setup.learning_rate))
    models = [nnx.split(MLP(nnx.Rngs(seed))) for seed in setup.seeds]
    graphdef = models[0][0]
    params = jax.tree.map(lambda *p: jnp.stack(p), *[p for _, p in models])
    batches = jnp.stack(
        [
            np.random.default_rng(seed + 1000).integers(
                0, len(x_train), (setup.steps, setup.batch_size)
            )
            for seed in setup.seeds
        ]
    )
    factors = np.ones((2, setup.steps), np.float32)
    for first, last in setup.spikes:
        factors[1, first - 1 : last] = setup.spike_factor

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, inputs):
        params, opt_state = carry
        idx, factor = inputs
        grads = jax.grad(loss_fn)(params, x_train[idx], y_train[idx])
        grads = jax.tree.map(lambda g: g * factor, grads)  # the injected spike
        clipped, _ = clip.update(grads, opt_state[0], params)
        changed = jnp.any(
            jnp.stack(
                [
                    jnp.any(a != b)
                    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(grads), strict=True)
                ]
            )
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), (loss_fn(params, x_train, y_train), changed)

    def train(params, batches, factors):
        initial = loss_fn(params, x_train, y_train)
        carry = (params, tx.init(params))
        (params, _), (losses, changed) = jax.lax.scan(step, carry, (batches, factors))
        logits = nnx.merge(graphdef, params)(x_test)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y_test)
        return jnp.concatenate([initial[None], losses]), changed, accuracy

    over_seeds = jax.vmap(train, in_axes=(0, 0, None))
    both = jax.jit(jax.vmap(over_seeds, in_axes=(None, None, 0)))
    loss, clipped, accuracy = both(params, batches, jnp.asarray(factors))
    return {
        "loss": np.asarray(loss, np.float64),
        "clipped": np.asarray(clipped),
        "accuracy": np.asarray(accuracy),
    }


def recovery(loss: np.ndarray, spikes: list[tuple[int, int]], tol: float = 0.02) -> list[int]:
    """Updates after each spike until the loss is within ``tol`` of its pre-spike value.

    ``-1`` marks a spike the loss did not recover from before the next spike (or the end).
    """
    out = []
    for i, (first, last) in enumerate(spikes):
        end = spikes[i + 1][0] - 1 if i + 1 < len(spikes) else len(loss) - 1
        target = loss[first - 1] * (1 + tol)
        hits = [k for k in range(0, end - last + 1) if loss[last + k] <= target]
        out.append(hits[0] if hits else -1)
    return out


def _peak(loss: np.ndarray, spikes: list[tuple[int, int]], window: int = 20) -> float:
    """The largest loss within ``window`` updates of a spike, over the loss just before it."""
    return max(loss[a : b + window + 1].max() / loss[a - 1] for a, b in spikes)


def table(setup: Setup, results: dict[str, dict]) -> str:
    """A markdown table: medians over seeds, with the worst seed in brackets."""
    spikes = setup.spikes
    labels = [f"@{a}" if a == b else f"@{a}-{b}" for a, b in spikes]
    header = [
        "method",
        *[f"recovery {lab}" for lab in labels],
        "peak loss (spikes)",
        "peak loss (clean)",
        "clipped updates (clean)",
        "final loss (spikes)",
        "final loss (clean)",
        "test acc (spikes)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(values: list[int]) -> str:
        worst = "never" if min(values) < 0 else str(max(values))
        fine = sorted(v if v >= 0 else 10**9 for v in values)
        med = fine[len(fine) // 2]
        return ("never" if med == 10**9 else str(med)) + f" [{worst}]"

    for name, res in results.items():
        loss, clipped, acc = res["loss"], res["clipped"], res["accuracy"]
        per_seed = [recovery(loss[1, s], spikes) for s in range(len(setup.seeds))]
        row = [
            name,
            *[cell([r[i] for r in per_seed]) for i in range(len(spikes))],
            f"{np.median([_peak(run_loss, spikes) for run_loss in loss[1]]):.2f}x",
            f"{np.median([_peak(run_loss, spikes) for run_loss in loss[0]]):.2f}x",
            f"{100 * clipped[0].mean():.0f}%",
            f"{np.median(loss[1, :, -1]):.4f}",
            f"{np.median(loss[0, :, -1]):.4f}",
            f"{np.median(acc[1]):.3f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(setup: Setup, results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (name, res) in enumerate(results.items()):
        color = f"C{i}"
        ax.plot(res["loss"][1, 0], color=color, lw=1.2, label=name)
        ax.plot(res["loss"][0, 0], color=color, lw=0.8, ls=":", alpha=0.8)
    for first, last in setup.spikes:
        ax.axvspan(first - 0.5, last + 0.5, color="red", alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("update")
    ax.set_ylabel("full training-set loss")
    ax.set_title(
        f"x{setup.spike_factor:g} gradient spikes (red), Adam, seed {setup.seeds[0]}; "
        "dotted: the same run unspiked"
    )
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/spikes/", help="output directory for the figure")
    parser.add_argument("--steps", type=int, default=Setup.steps)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(Setup.seeds))
    args = parser.parse_args(argv)
    if args.steps < 30:
        parser.error("--steps must be at least 30 so the spikes are apart")
    setup = Setup(steps=args.steps, seeds=tuple(args.seeds))

    start = time.perf_counter()
    data = load_data()
    results = {name: run(setup, make(), data) for name, make in METHODS.items()}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "spikes.png")
    plot(setup, results, path)
    print(table(setup, results))
    print(f"\nfigure: {path} ({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()

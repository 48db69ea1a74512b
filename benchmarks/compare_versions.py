"""This tree's optimizer steps against another revision's, side by side in one process.

``python -m benchmarks.compare_versions --baseline REV`` exports ``agc_optax/`` at the git
revision ``REV`` into a temporary folder as a package named ``agc_optax_baseline`` (every
``agc_optax`` import inside it renamed), then times each step of this tree and of the baseline in
the same interleaved rounds (donated buffers, as :mod:`benchmarks.fused_step`), then the library
train step of NF-ResNet-50 and NFNet-F0 (as :mod:`benchmarks.train_step`), with XLA's bytes
accessed and the largest difference between the two versions' new parameters after one step. A
refactor that should not change the compiled program shows ratios near 1.0, equal bytes and a
difference of 0.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import agc_optax
from benchmarks import common

ROOT = pathlib.Path(__file__).resolve().parents[1]


def import_baseline(revision: str, folder: pathlib.Path):
    """``agc_optax`` at ``revision``, imported as the package ``agc_optax_baseline``."""
    archive = folder / "baseline.tar"
    subprocess.run(
        ["git", "archive", "--format=tar", "-o", str(archive), revision, "agc_optax"],
        cwd=ROOT,
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "src", filter="data")
    package = folder / "src" / "agc_optax_baseline"
    (folder / "src" / "agc_optax").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bagc_optax\b", "agc_optax_baseline", path.read_text()))
    sys.path.insert(0, str(folder / "src"))
    return importlib.import_module("agc_optax_baseline")


def _stepper(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def _transforms(package) -> dict[str, optax.GradientTransformation]:
    return {
        "adaptive_grad_clip": package.adaptive_grad_clip(0.01, stats=True),
        "sgd_agc": package.sgd_agc(0.1),
        "adamw_agc": package.adamw_agc(1e-3),
        "adagc": package.adagc(),
        "zclip": package.zclip(),
    }


TRAIN_STEPS = {  # model name -> (batch size, resolution), as in benchmarks.train_step
    "nf_resnet50": (16, 128),
    "nfnet_f0": (8, 128),
}


def _train_step(package, name: str, batch, small: bool):
    """The library train step (sgd_agc, state donated) of ``package`` for model ``name``."""
    # Smoke-test sizes: NFNet's grouped convs need bottlenecks of at least one 128-wide group.
    width = 256 if name.startswith("nfnet") else 32
    overrides = {"widths": (width,) * 4, "depths": (1, 1, 1, 1)} if small else {}
    models = importlib.import_module(f"{package.__name__}.models")
    training = importlib.import_module(f"{package.__name__}.training")
    model = models.create_model(name, 1000, rngs=nnx.Rngs(0), **overrides)
    split, params, stats = training.split_model(model)
    tx = package.sgd_agc(0.1)
    step = jax.jit(training.make_train_step(split, tx, seed=0), donate_argnums=(0,))

    def make_state():
        return training.init_state(jax.tree.map(jnp.copy, params), stats, tx)

    return step, make_state


def train_step_rows(old, baseline: str, repeats: int, small: bool) -> list[tuple[str, ...]]:
    """One row per model: the whole library train step, this tree against the baseline."""
    rows = []
    rng = np.random.default_rng(0)
    for name, (batch_size, resolution) in TRAIN_STEPS.items():
        if small:
            batch_size, resolution = 2, 32
        images = rng.standard_normal((batch_size, resolution, resolution, 3)).astype(np.float32)
        batch = (jnp.asarray(images), jnp.asarray(rng.integers(0, 1000, batch_size), jnp.int32))
        steps = {
            "this tree": _train_step(agc_optax, name, batch, small),
            baseline: _train_step(old, name, batch, small),
        }
        thunks, nbytes, first = {}, {}, {}
        for version, (step, make_state) in steps.items():
            state = make_state()
            nbytes[version] = common.bytes_accessed(step, state, batch)
            first[version] = step(make_state(), batch)[0].params
            thunks[version] = common.feedback_thunk(lambda s, b, f=step: f(s, b)[0], state, batch)
        times = common.time_interleaved(thunks, repeats=repeats)
        new, ref = "this tree", baseline
        rows.append(
            (
                f"train step, {name} (batch {batch_size}, {resolution} px)",
                f"{times[new] * 1e3:.2f}",
                f"{times[ref] * 1e3:.2f}",
                f"{times[new] / times[ref]:.3f}",
                f"{nbytes[new] / 2**20:.1f} / {nbytes[ref] / 2**20:.1f}",
                f"{common.max_relative_difference(first[new], first[ref]):.1e}",
            )
        )
    return rows


def run(baseline: str, repeats: int = 15, small: bool = False, train_steps: bool = True) -> str:
    with tempfile.TemporaryDirectory() as folder:
        old = import_baseline(baseline, pathlib.Path(folder))
        shapes = common.resnet50_shapes()
        if small:
            shapes = dict(list(shapes.items())[:6])
        grads = common.random_tree(shapes, seed=1, scale=0.01)
        steps, inits = {}, {}
        for version, package in (("this tree", agc_optax), (baseline, old)):
            for name, tx in _transforms(package).items():
                steps[(name, version)] = _stepper(tx)
                # Copies: a state may hold one buffer twice (ZClip's zeros), which donation refuses.
                inits[(name, version)] = lambda p, init=tx.init: jax.tree.map(jnp.copy, init(p))
        thunks, nbytes = common.donated_steps(
            steps, lambda: common.random_tree(shapes, seed=0), inits, grads
        )
        times = common.time_interleaved(thunks, repeats=repeats)

        def new_params(key):
            params = common.random_tree(shapes, seed=0)
            return steps[key](params, inits[key](params), grads)[0]

        rows = []
        for name in _transforms(agc_optax):
            new, ref = (name, "this tree"), (name, baseline)
            rows.append(
                (
                    name,
                    f"{times[new] * 1e3:.2f}",
                    f"{times[ref] * 1e3:.2f}",
                    f"{times[new] / times[ref]:.3f}",
                    f"{nbytes[new] / 2**20:.1f} / {nbytes[ref] / 2**20:.1f}",
                    f"{common.max_relative_difference(new_params(new), new_params(ref)):.1e}",
                )
            )
        if train_steps:
            rows += train_step_rows(old, baseline, max(3, repeats // 3), small)
    header = (
        "step (optimizers: ResNet-50 tree, donated)",
        "ms, this tree",
        f"ms, {baseline}",
        "ratio",
        "MiB accessed (this / baseline)",
        "new params, max rel diff",
    )
    return (
        f"### This tree vs {baseline} (median of interleaved runs); {common.machine()}\n\n"
        + common.markdown_table(header, rows)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per contender")
    parser.add_argument("--small", action="store_true", help="tiny sizes: a smoke test, not data")
    parser.add_argument(
        "--no-train-steps", action="store_true", help="optimizer steps only (minutes faster)"
    )
    args = parser.parse_args(argv)
    print(run(args.baseline, args.repeats, args.small, train_steps=not args.no_train_steps))


if __name__ == "__main__":
    main()

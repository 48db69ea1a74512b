"""Benchmarks 3, 4 and 6: AGC's share of a whole training step, NF-ResNet-50 vs BN ResNet-50, and
the library's train step against a bare jitted step.

All use the library's own train step (``agc_optax.training.make_train_step``) at a small
resolution so that they run on a CPU; the ratios, not the absolute numbers, are the point.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import agc_optax
from agc_optax.models import create_model
from agc_optax.training import (
    TrainStep,
    TwoProgramStep,
    init_state,
    make_train_step,
    split_model,
)
from benchmarks import common

_ITEM_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "pred": 1}

TINY = {"widths": (16, 32, 48, 64), "depths": (1, 1, 1, 1)}

#: ``run_vs_bare``'s row for the step exactly as ``agc-train`` runs it by default.
TWO_PROGRAMS = "trainer's step: two programs"


def _step_runner(model: nnx.Module, tx: optax.GradientTransformation, batch):
    split, params, stats = split_model(model)
    state = init_state(params, stats, tx, ema=False)
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


def _bare_step(split: Any, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """The minimal step (DeepMind's program): loss and gradients, the optimizer, new weights.

    ``(params, batch_stats, opt_state, step, batch) -> (params, batch_stats, opt_state, step,
    loss)``; the model runs exactly as in the library step (same dropout keys).
    """

    def step_fn(params, batch_stats, opt_state, step, batch):
        images, labels = batch
        key = jax.random.fold_in(jax.random.key(0), step)

        def loss_fn(p):
            module = split.merge(True, p, batch_stats)
            nnx.reseed(module, dropout=key, policy="match_shape")
            logits = module(images)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, step + 1, loss

    return step_fn


def _trainers_optimizer(unit_axes: Any) -> optax.GradientTransformation:
    """The optimizer ``agc-train`` builds: ``sgd_agc`` with AGC statistics and the guard."""
    return agc_optax.sgd_agc(0.1, unit_axes=unit_axes, stats=True, skip_nonfinite=True)


def _library_step(
    split: Any, tx: optax.GradientTransformation, ema: float | None, update_norm: bool = False
) -> Callable[..., Any]:
    """``make_train_step`` as ``agc-train`` builds it: the guard, and the norms only on logging
    steps (every 100), without ``update_norm`` unless asked."""
    return make_train_step(
        split, tx, seed=0, ema=ema, skip_nonfinite=True, log_every=100, update_norm=update_norm
    )


def _optax_chain(params: Any) -> optax.GradientTransformation:
    """sgd_agc's recipe from optax's own transforms: AGC (not on the classifier kernel), coupled
    weight decay (not on gains and biases), SGD with Nesterov momentum."""
    not_head = jax.tree_util.tree_map_with_path(
        lambda path, _: not re.search(agc_optax.HEAD_PATTERN, jax.tree_util.keystr(path)), params
    )
    return optax.chain(
        optax.masked(optax.adaptive_grad_clip(0.01, eps=1e-3), not_head),
        optax.add_decayed_weights(2e-5, mask=agc_optax.weight_decay_mask),
        optax.sgd(0.1, momentum=0.9, nesterov=True),
    )


def _copies(hlo_text: str) -> tuple[int, int]:
    """Number of ``copy`` ops in optimized HLO text, and the bytes they write."""
    count = nbytes = 0
    for match in re.finditer(r"= (\w+)\[([\d,]*)\]\S* copy\(", hlo_text):
        dims = [int(d) for d in match.group(2).split(",") if d]
        count += 1
        nbytes += int(np.prod(dims, dtype=np.int64)) * _ITEM_BYTES.get(match.group(1), 4)
    return count, nbytes


def _facts(executables: tuple[Any, ...]) -> tuple[float, tuple[int, int]]:
    """XLA bytes accessed and (copies, copied bytes) of compiled programs, summed."""
    nbytes, copies, copied = 0.0, 0, 0
    for executable in executables:
        cost = executable.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        nbytes += float(cost["bytes accessed"])
        n, b = _copies(executable.as_text())
        copies, copied = copies + n, copied + b
    return nbytes, (copies, copied)


def _compiled(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float, tuple[int, int]]:
    """``fn`` jitted as the trainer jits its step (first argument donated, unused inputs kept),
    compiled for ``args``: (executable, compile seconds, XLA bytes accessed, (copies, copied
    bytes))."""
    start = time.perf_counter()
    executable = jax.jit(fn, donate_argnums=0, keep_unused=True).lower(*args).compile()
    seconds = time.perf_counter() - start
    return executable, seconds, *_facts((executable,))


def _compiled_two(step: TrainStep, state: Any, batch: Any) -> tuple[Any, float, float, Any]:
    """``step`` as ``agc-train`` compiles it by default: its gradients and update halves as two
    programs (the state donated to the update), compiled side by side. Returns (a function
    ``(state, batch) -> (state, metrics)`` running both executables, seconds from tracing to
    both compiled, summed XLA bytes, summed (copies, copied bytes))."""
    start = time.perf_counter()
    two = TwoProgramStep(
        jax.jit(step.gradients, keep_unused=True),
        jax.jit(step.update, donate_argnums=0, keep_unused=True),
    )
    gradients, update = two.compile(state, batch)
    seconds = time.perf_counter() - start
    return (lambda s, b: update(s, gradients(s, b))), seconds, *_facts((gradients, update))


def run_vs_bare(
    repeats: int = 5, small: bool = False, models: tuple[str, ...] = ("nf_resnet50", "nfnet_f0")
) -> str:
    """Benchmark 6: the library train step (as the trainer runs it: divergence guard, metrics
    on logging steps, with and without EMA) against the bare step with the optax chain, and the
    bare step with ``sgd_agc`` in place of the chain (what the fused optimizer alone saves).

    The library steps use the trainer's optimizer (``sgd_agc`` with AGC statistics and
    ``skip_nonfinite=True``) and its metrics (no ``update_norm`` unless the label says so);
    "library + EMA, trainer's model" also builds the model as the trainer
    does (``canonical_conv_grads=True``), while every other row runs the plain model, the one
    DeepMind's program equals. The last row is that step as ``agc-train`` compiles it by
    default: two programs, gradients and update, compiled side by side (its compile seconds
    run from tracing to both executables, its bytes and copies are both programs' sums).
    All are jitted with the state donated; step times come from interleaved rounds, so the
    ratio stays comparable on a loaded machine even where the absolute times are not.
    """
    sizes = {"nf_resnet50": (16, 128), "nfnet_f0": (8, 128)}  # (batch, pixels) of issue 16
    cases = tuple((m, *sizes[m]) for m in models) if not small else (("nf_resnet50", 2, 32),)
    rows = []
    for name, batch_size, res in cases:
        overrides = ({"widths": (16, 32, 48, 64), "depths": (1, 1, 1, 1)}) if small else {}
        model = create_model(name, 10 if small else 1000, rngs=nnx.Rngs(0), **overrides)
        split, params, stats = split_model(model)
        unit_axes = getattr(model, "agc_unit_axes", None)
        tx = _trainers_optimizer(unit_axes)
        chain = _optax_chain(params)
        batch = _batch(batch_size, res)
        programs = {}
        bare_args = (jax.tree.map(jnp.copy, params), stats, chain.init(params), jnp.int32(0))
        programs["bare"] = (_bare_step(split, chain), bare_args)
        fused = agc_optax.sgd_agc(0.1, unit_axes=unit_axes)
        fused_args = (jax.tree.map(jnp.copy, params), stats, fused.init(params), jnp.int32(0))
        programs["bare, sgd_agc"] = (_bare_step(split, fused), fused_args)
        trainers_model = create_model(
            name, 10 if small else 1000, rngs=nnx.Rngs(0), canonical_conv_grads=True, **overrides
        )
        trainers_split = split_model(trainers_model)[0]
        steps = (  # (label, model, EMA decay, update_norm)
            ("library", split, None, False),
            ("library + update_norm", split, None, True),
            ("library + EMA", split, 0.9999, False),
            ("library + EMA, trainer's model", trainers_split, 0.9999, False),
            (TWO_PROGRAMS, trainers_split, 0.9999, False),
        )
        for label, model_split, ema, update_norm in steps[3:] if small else steps:
            state = init_state(jax.tree.map(jnp.copy, params), stats, tx, ema=ema is not None)
            programs[label] = (_library_step(model_split, tx, ema, update_norm), (state,))
        thunks, facts = {}, {}
        for label, (fn, args) in programs.items():
            if label == TWO_PROGRAMS:
                executable, seconds, nbytes, copies = _compiled_two(fn, *args, batch)
            else:
                executable, seconds, nbytes, copies = _compiled(fn, *args, batch)
            facts[label] = (seconds, nbytes, copies)
            if label.startswith("bare"):
                thunks[label] = common.feedback_thunk(
                    lambda carry, b, exe=executable: exe(*carry, b)[:4], args, batch
                )
            else:
                thunks[label] = common.feedback_thunk(
                    lambda carry, b, exe=executable: exe(carry, b)[0], args[0], batch
                )
        times = common.time_interleaved(thunks, repeats=repeats, warmup=1)
        for label in programs:
            seconds, nbytes, (n_copies, copied) = facts[label]
            rows.append(
                (
                    f"{name}, batch {batch_size}, {res}px",
                    label,
                    f"{times[label] * 1e3:.0f}",
                    f"{times[label] / times['bare']:.2f}",
                    f"{seconds:.1f}",
                    f"{seconds / facts['bare'][0]:.2f}",
                    f"{nbytes / 2**20:.0f}",
                    f"{n_copies} / {copied / 2**20:.1f}",
                )
            )
    header = (
        "model",
        "step",
        "ms / step",
        "step / bare",
        "compile s",
        "compile / bare",
        "XLA MiB accessed",
        "copies / MiB",
    )
    return "### Library train step vs the bare step (optax chain)\n\n" + common.markdown_table(
        header, rows
    )


if __name__ == "__main__":
    print(run_agc_share())
    print()
    print(run_nf_vs_bn())
    print()
    print(run_vs_bare())

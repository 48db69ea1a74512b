"""The train step: metrics, EMA warm-up, AGC statistics, one optimizer step per call."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh
from tiny_model import TinyNet

import agc_optax
from agc_optax.training import (
    PRESETS,
    ConfigError,
    build_optimizer,
    ema_decay,
    init_state,
    make_eval_step,
    make_train_step,
    split_model,
    validate,
)
from agc_optax.training.parallel import DATA_AXIS, Placement
from agc_optax.training.step import compile_train_step


def test_ema_decay_follows_deepmind_warmup():
    for t in (0, 1, 10, 1000, 10**6):
        expected = min(0.9999, (1 + t) / (10 + t))
        assert float(ema_decay(jnp.asarray(t), 0.9999)) == pytest.approx(expected, rel=1e-6)


def _setup(config):
    model = TinyNet(10, dropout=0.5, rngs=nnx.Rngs(0, dropout=1))
    split, params, stats = split_model(model)
    tx = build_optimizer(config, optax.constant_schedule(0.1))
    return split, tx, init_state(params, stats, tx)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32), jnp.arange(8) % 10


def test_train_step_metrics_ema_and_agc_statistics():
    config = PRESETS["smoke"].replace(ema=0.9)
    split, tx, state = _setup(config)
    step = jax.jit(make_train_step(split, tx, seed=0, label_smoothing=0.1, ema=0.9))
    new, metrics = step(state, _batch())
    assert set(metrics) == {
        "loss",
        "accuracy",
        "grad_norm",
        "param_norm",
        "update_norm",
        "clip_fraction",
        "skipped",  # the recipe's sgd_agc skips non-finite steps itself; the step reports it
    }
    assert float(metrics["skipped"]) == 0.0
    assert int(new.step) == 1 and 0.0 <= float(metrics["clip_fraction"]) <= 1.0
    # EMA at t=0 uses decay min(0.9, 1/10) = 0.1.
    want = jax.tree.map(lambda e, p: 0.1 * e + 0.9 * p, state.ema_params, new.params)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(new.ema_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The update is what the optimizer alone produces from the same gradient.
    assert float(metrics["update_norm"]) > 0
    # Dropout keys depend on the step: two steps from the same state agree exactly.
    again, _ = step(state, _batch())
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_without_ema_the_state_holds_no_second_tree_and_norms_come_only_on_logging_steps():
    split, tx, _ = _setup(PRESETS["smoke"])
    _, params, stats = split_model(TinyNet(10, dropout=0.5, rngs=nnx.Rngs(0, dropout=1)))
    state = init_state(params, stats, tx, ema=False)
    assert state.ema_params is None
    # update_norm=False (the trainer's default) drops the one norm that costs a copy.
    every = jax.jit(make_train_step(split, tx, seed=0, skip_nonfinite=True, update_norm=False))
    sparse = jax.jit(
        make_train_step(split, tx, seed=0, skip_nonfinite=True, log_every=3, total_steps=4)
    )
    for step in range(4):  # steps 3 (a multiple of 3) and 4 (the last) are logged
        want, want_metrics = every(state, _batch(step))
        new, metrics = sparse(state, _batch(step))
        assert new.ema_params is None and float(metrics["skipped"]) == 0.0
        assert "update_norm" not in want_metrics and not np.isnan(want_metrics["param_norm"])
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want.params), strict=True):
            np.testing.assert_array_equal(a, b)
        flat = np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(new.params)])
        logged = step + 1 in (3, 4)
        for name in ("grad_norm", "param_norm", "update_norm"):
            assert np.isnan(float(metrics[name])) != logged, (step, name)
        if logged:
            old = np.concatenate(
                [np.ravel(x).astype(np.float64) for x in jax.tree.leaves(state.params)]
            )
            assert float(metrics["param_norm"]) == pytest.approx(np.linalg.norm(flat), rel=1e-5)
            delta = np.linalg.norm(flat - old)
            assert float(metrics["update_norm"]) == pytest.approx(delta, rel=1e-3)
            np.testing.assert_allclose(metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-6)
        state = new
    with pytest.raises(ValueError, match="needs a state with `ema_params`"):
        jax.jit(make_train_step(split, tx, seed=0, ema=0.9))(state, _batch())
    with pytest.raises(ValueError, match="`log_every` must be a positive integer, got 0"):
        make_train_step(split, tx, seed=0, log_every=0)


def test_no_agc_has_no_clip_fraction_and_global_clip_bounds_gradients():
    split, tx, state = _setup(PRESETS["smoke"].replace(agc=False))
    _, metrics = jax.jit(make_train_step(split, tx, seed=0))(state, _batch())
    assert "clip_fraction" not in metrics
    config = PRESETS["smoke"].replace(agc=False, global_clip=1e-3)
    split, tx, state = _setup(config)
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, _ = tx.update(grads, state.opt_state, state.params)
    assert float(optax.tree.norm(updates)) < 1e-2  # clipped to 1e-3, then lr 0.1 (+ tiny wd)


def test_sgd_agc_is_the_default_recipe():
    config = PRESETS["digits"]
    tx = build_optimizer(config, optax.constant_schedule(0.1))
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
    grads = jax.tree.map(lambda p: 100 * p, params)
    ours, _ = tx.update(grads, tx.init(params), params)
    ref_tx = agc_optax.sgd_agc(0.1, clipping=config.clipping, weight_decay=config.weight_decay)
    ref, _ = ref_tx.update(grads, ref_tx.init(params), params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_step_counts_only_unmasked_rows():
    split, _, state = _setup(PRESETS["smoke"])
    images, labels = _batch()
    mask = jnp.array([1, 1, 1, 0, 0, 0, 0, 0], jnp.float32)
    sums = jax.jit(make_eval_step(split))(state.params, state.batch_stats, images, labels, mask)
    assert float(sums["count"]) == 3 and 0 <= float(sums["correct"]) <= 3


class _ScalarGains(TinyNet):
    """TinyNet with two scalar parameters, shaped like the unused AGC statistics (float32 ())."""

    def __init__(self, num_classes, *, rngs):
        super().__init__(num_classes, rngs=rngs)
        self.gain_a = nnx.Param(jnp.ones(()))
        self.gain_b = nnx.Param(jnp.ones(()))

    def __call__(self, x):
        return super().__call__(x * self.gain_a[...] * self.gain_b[...])


def _votes():
    return jnp.zeros(1, jnp.int32)


def _placement():
    return Placement(Mesh(np.array(jax.devices()[:1]), (DATA_AXIS,)))


@pytest.mark.parametrize("programs", [1, 2])
def test_the_trainers_compiled_step_does_not_copy_the_ema(programs):
    # The step reads nothing of the last AGC statistics. Had jit dropped those inputs, the
    # donated state's later float32 scalars (the EMA's gains) would pair with their
    # neighbours' buffers, and XLA would copy each of them every step.
    split, params, stats = split_model(_ScalarGains(10, rngs=nnx.Rngs(0)))
    tx = build_optimizer(PRESETS["smoke"], optax.constant_schedule(0.1))
    state = init_state(params, stats, tx, ema=True)
    assert optax.tree.get(state.opt_state, "max_ratio").shape == ()
    step = compile_train_step(
        _placement(),
        make_train_step(split, tx, seed=0, ema=0.9, skip_nonfinite=True),
        programs=programs,
    )
    if programs == 2:  # the EMA is the update program's
        hlo = step.compile(state, _batch(), _votes())[1].as_text()
    else:
        hlo = step.lower(state, _batch(), _votes()).compile().as_text()
    assert "copy(%state_ema_params" not in hlo
    new, _ = step(state, _batch(), _votes())
    assert float(new.ema_params["gain_a"]) == pytest.approx(1.0, abs=1e-2)


def _three_steps(step, state):
    """Three steps of ``step`` from ``state``; the second batch holds a NaN (a skipped step)."""
    metrics = []
    for i in range(3):
        images, labels = _batch(i)
        if i == 1:
            images = images.at[0, 0, 0, 0].set(jnp.nan)
        state, m = step(state, (images, labels), _votes())
        metrics.append(m)
    return state, metrics


def test_two_programs_train_as_one():
    config = PRESETS["smoke"].replace(ema=0.9)
    split, tx, _ = _setup(config)
    train_step = make_train_step(
        split, tx, seed=0, ema=0.9, skip_nonfinite=True, log_every=3, update_norm=True
    )
    results = []
    for programs in (1, 2):
        _, _, state = _setup(config)  # fresh buffers: the steps donate their state
        step = compile_train_step(_placement(), train_step, programs=programs)
        results.append(_three_steps(step, state))
    (one_state, one_metrics), (two_state, two_metrics) = results
    assert [float(m["skipped"]) for m in two_metrics] == [0.0, 1.0, 0.0]
    assert np.isnan(float(two_metrics[0]["grad_norm"])) and float(two_metrics[2]["grad_norm"]) > 0
    for a, b in zip(jax.tree.leaves(one_state), jax.tree.leaves(two_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    for a, b in zip(one_metrics, two_metrics, strict=True):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-6)


def test_two_programs_compile_once_each_side_by_side_on_the_first_call():
    split, tx, state = _setup(PRESETS["smoke"])
    placement = _placement()
    step = compile_train_step(placement, make_train_step(split, tx, seed=0), programs=2)
    # Placed as the trainer places it (a fresh, uncommitted state would compile anew at the
    # second call, in one program as in two), and made before listening.
    state = jax.device_put(state, placement.replicated)
    batches, votes = [_batch(0), _batch(1)], _votes()
    threads = []
    listener = lambda event, _seconds, **_: (  # noqa: E731
        threads.append(threading.get_ident())
        if event == "/jax/core/compile/backend_compile_duration"
        else None
    )
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        state, _ = step(state, batches[0], votes)
        first = list(threads)
        state, _ = step(state, batches[1], votes)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # One compile per program, on two threads; the later call reuses both executables.
    assert len(first) == 2 and len(set(first)) == 2, first
    assert threads == first
    assert int(state.step) == 2


def test_a_step_is_one_or_two_programs():
    split, tx, _ = _setup(PRESETS["smoke"])
    with pytest.raises(ValueError, match="`programs` must be 1 or 2, got 3"):
        compile_train_step(_placement(), make_train_step(split, tx, seed=0), programs=3)
    config = PRESETS["smoke"].replace(step_programs=0)
    with pytest.raises(ConfigError, match="`--step-programs` must be 1 or 2, got 0"):
        validate(config, [config.model])
    from agc_optax.train import _parser, config_from_args

    assert config_from_args(_parser().parse_args([])).step_programs == 2
    assert config_from_args(_parser().parse_args(["--step-programs", "1"])).step_programs == 1

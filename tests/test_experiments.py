"""The large-batch sweep runner: its optimizer is the trainer's, and a tiny sweep runs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import agc_optax
from agc_optax import experiments as ex
from agc_optax.training import PRESETS


def _params_and_grads():
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "conv": {"kernel": jax.random.normal(k[0], (3, 3, 4, 8)), "bias": jnp.zeros(8)},
        "head": {"kernel": jax.random.normal(k[1], (8, 10)) * 0.01, "bias": jnp.zeros(10)},
    }
    grads = {
        "conv": {"kernel": jax.random.normal(k[2], (3, 3, 4, 8)), "bias": jnp.ones(8)},
        "head": {"kernel": jax.random.normal(k[3], (8, 10)), "bias": jnp.ones(10)},
    }
    return params, grads


def _updates(tx, params, grads, state=None, steps=2):
    state = tx.init(params) if state is None else state
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
    return updates


def _with(tx, params, method):
    return ex._set_method(tx.init(params), method)


def test_agc_method_matches_sgd_agc():
    params, grads = _params_and_grads()
    tx = ex.sweep_optimizer(0.1, momentum=0.9, weight_decay=1e-4)
    got = _updates(tx, params, grads, _with(tx, params, ex.agc(0.02)))
    want = _updates(
        agc_optax.sgd_agc(0.1, momentum=0.9, weight_decay=1e-4, clipping=0.02), params, grads
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), got, want)


@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_other_methods_match_the_trainer_chain(max_norm):
    params, grads = _params_and_grads()
    tx = ex.sweep_optimizer(0.1, momentum=0.9, weight_decay=1e-4)
    method = ex.no_clipping() if max_norm is None else ex.global_norm(max_norm)
    got = _updates(tx, params, grads, _with(tx, params, method))
    parts = [] if max_norm is None else [optax.clip_by_global_norm(max_norm)]
    want_tx = optax.chain(
        *parts,
        optax.add_decayed_weights(1e-4, mask=agc_optax.weight_decay_mask),
        optax.sgd(0.1, momentum=0.9, nesterov=True),
    )
    want = _updates(want_tx, params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), got, want)


def test_clip_method_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="`agc` must be a finite number > 0"):
        ex.agc(0.0)
    with pytest.raises(ValueError, match="`global_norm` must be a finite number > 0"):
        ex.global_norm(math.inf)
    assert ex.agc(0.04).label == "AGC 0.04"


def test_tiny_sweep_runs_every_pair():
    config = PRESETS["smoke"].replace(steps=4, lr=0.1)
    methods = [ex.no_clipping(), ex.agc(0.01)]
    runs = ex.large_batch_sweep(config, [16, 32], methods, log=None)
    assert [(r.batch_size, r.method.label) for r in runs] == [
        (16, "no clipping"),
        (16, "AGC 0.01"),
        (32, "no clipping"),
        (32, "AGC 0.01"),
    ]
    for run in runs:
        assert run.steps == 4 and run.loss.shape == (4,) and not run.diverged
        assert 0.0 <= run.test_accuracy <= 1.0
        assert run.peak_lr == pytest.approx(0.1 * run.batch_size / 256)
    assert np.all(runs[0].clip_fraction == 0)
    assert np.all(runs[1].clip_fraction > 0)
    # Same initial weights and data for every method: the first losses agree.
    assert runs[0].loss[0] == pytest.approx(runs[1].loss[0], rel=1e-6)


def test_sweep_rejects_empty_methods():
    with pytest.raises(ValueError, match="`methods` is empty"):
        ex.large_batch_sweep(PRESETS["smoke"], [16], [], log=None)


def test_divergence_is_detected_and_the_run_stopped():
    # 5 steps per epoch at batch 256; a huge learning rate blows up inside the first epoch.
    config = PRESETS["smoke"].replace(steps=8, lr=1e4, warmup_epochs=0.0)
    (run,) = ex.large_batch_sweep(config, [256], [ex.no_clipping()], log=None)
    assert run.diverged
    assert len(run.loss) == 5 and run.fraction_run == pytest.approx(5 / 8)
    assert not np.all(np.isfinite(run.loss))
    assert 0.0 <= run.test_accuracy <= 1.0

"""zclip against a float64 NumPy re-implementation over step sequences, composition, bad input."""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agc_optax

from .multidevice import run_on_cpu_devices

# ----------------------------------------------------------------------------- float64 reference


class ZClipReference:
    """ZClip in float64, as the paper and the authors' code describe it: a buffer of warm-up norms,
    then EMA statistics of the clipped norm. ``cap_always`` also caps every later step at
    ``max_grad_norm``, as the authors' code does."""

    def __init__(
        self, alpha, z_thresh, warmup, mode, max_grad_norm=None, eps=1e-6, cap_always=False
    ):
        self.alpha, self.z, self.warmup, self.mode = alpha, z_thresh, warmup, mode
        self.max, self.eps, self.cap_always = max_grad_norm, eps, cap_always
        self.buffer, self.mean, self.var = [], None, None

    def step(self, grads):
        """Returns (clipped gradients in float64, whether the step was clipped)."""
        grads = [np.asarray(g, np.float64) for g in grads]
        norm = np.sqrt(sum(np.sum(g * g) for g in grads))
        if self.mean is None:
            self.buffer.append(norm)
            if len(self.buffer) == self.warmup:
                self.mean = np.mean(self.buffer)
                self.var = np.mean((np.asarray(self.buffer) - self.mean) ** 2)
            if self.max is not None and norm > self.max:
                return [g * (self.max / norm) for g in grads], True
            return grads, False
        std = np.sqrt(self.var)
        z = (norm - self.mean) / (std + self.eps)
        target = None
        if self.mode == "percentile":
            if norm > self.mean + self.z * std:
                target = self.mean + self.z * std
        elif z > self.z:
            target = self.mean + self.z**2 * std / z if self.mode == "reciprocal" else self.mean
        ema_in = norm if target is None else target
        self.mean = self.alpha * self.mean + (1 - self.alpha) * ema_in
        self.var = self.alpha * self.var + (1 - self.alpha) * (ema_in - self.mean) ** 2
        limit = ema_in
        if self.cap_always and self.max is not None:
            limit = min(limit, self.max)
        if norm > limit:
            return [g * (limit / norm) for g in grads], True
        return grads, False


def _sequence(rng, shapes, steps, spikes=(), scale=1.0, decay=0.98):
    seq = []
    for t in range(steps):
        s = scale * decay**t * (100.0 if t in spikes else 1.0)
        seq.append(
            [
                (rng.standard_normal(sh) * s * rng.uniform(0.7, 1.4)).astype(np.float32)
                for sh in shapes
            ]
        )
    return seq


def _run(tx, seq, shapes):
    params = {f"l{i}": jnp.zeros(sh, jnp.float32) for i, sh in enumerate(shapes)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    outs, clipped = [], []
    for grads in seq:
        out, state = step({f"l{i}": jnp.asarray(g) for i, g in enumerate(grads)}, state)
        outs.append([np.asarray(out[f"l{i}"]) for i in range(len(shapes))])
        clipped.append(float(optax.tree.get(state, "clip_fraction")))
    return outs, state, clipped


def _check(tx, reference, seq, shapes, rtol=2e-5):
    got, state, clipped = _run(tx, seq, shapes)
    for t, grads in enumerate(seq):
        want, was_clipped = reference.step(grads)
        for g, w in zip(got[t], want, strict=True):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-30, err_msg=f"step {t + 1}")
        assert clipped[t] == float(was_clipped), f"step {t + 1}"
    return state, clipped


SHAPES = [(6, 4), (4,), ()]


@pytest.mark.parametrize("mode", ["reciprocal", "mean", "percentile"])
@pytest.mark.parametrize("warmup", [1, 5])
def test_sequence_matches_reference_across_warmup_boundary(mode, warmup):
    rng = np.random.default_rng(warmup)
    seq = _sequence(rng, SHAPES, 40, spikes={2, warmup, warmup + 4, 30, 31})
    state, clipped = _check(
        agc_optax.zclip(0.97, 2.5, warmup, mode=mode),
        ZClipReference(0.97, 2.5, warmup, mode),
        seq,
        SHAPES,
    )
    reference = ZClipReference(0.97, 2.5, warmup, mode)
    for grads in seq:
        reference.step(grads)
    assert float(state.mean) == pytest.approx(reference.mean, rel=2e-5)
    assert float(state.var) == pytest.approx(reference.var, rel=1e-4)
    assert int(state.count) == 40
    assert sum(clipped) >= 2  # the spikes after warm-up were caught


def test_warmup_statistics_are_the_buffer_mean_and_population_variance():
    norms = [3.0, 1.0, 4.0, 1.0, 5.0]
    tx = agc_optax.zclip(warmup_steps=5)
    state = tx.init({"w": jnp.zeros(1)})
    for n in norms:
        out, state = tx.update({"w": jnp.array([n])}, state)
        assert float(out["w"][0]) == n  # no adaptive clipping in warm-up
    assert float(state.mean) == pytest.approx(np.mean(norms), rel=1e-6)
    assert float(state.var) == pytest.approx(np.var(norms), rel=1e-6)


@settings(deadline=None, max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    alpha=st.sampled_from([0.0, 0.5, 0.97]),
    z_thresh=st.sampled_from([0.5, 2.5, 10.0]),
    warmup=st.integers(1, 6),
    mode=st.sampled_from(["reciprocal", "mean", "percentile"]),
    max_grad_norm=st.sampled_from([None, 0.5, 5.0]),
    spikes=st.sets(st.integers(0, 11), max_size=4),
)
def test_random_sequences_match_reference(
    seed, alpha, z_thresh, warmup, mode, max_grad_norm, spikes
):
    rng = np.random.default_rng(seed)
    shapes = [(3, 2), (2,)]
    seq = _sequence(rng, shapes, 12, spikes=spikes)
    tx = agc_optax.zclip(alpha, z_thresh, warmup, mode=mode, max_grad_norm=max_grad_norm)
    ref = ZClipReference(alpha, z_thresh, warmup, mode, max_grad_norm)
    _check(tx, ref, seq, shapes, rtol=5e-5)


def test_chaining_clip_by_global_norm_gives_the_authors_always_on_cap():
    seq = _sequence(np.random.default_rng(7), SHAPES, 20, spikes={3, 12})
    tx = optax.chain(
        agc_optax.zclip(warmup_steps=4, max_grad_norm=2.0), optax.clip_by_global_norm(2.0)
    )
    params = {f"l{i}": jnp.zeros(sh) for i, sh in enumerate(SHAPES)}
    state = tx.init(params)
    ref = ZClipReference(0.97, 2.5, 4, "reciprocal", max_grad_norm=2.0, cap_always=True)
    for grads in seq:
        out, state = tx.update({f"l{i}": jnp.asarray(g) for i, g in enumerate(grads)}, state)
        want, _ = ref.step(grads)
        for i, w in enumerate(want):
            np.testing.assert_allclose(out[f"l{i}"], w, rtol=2e-5)


# ----------------------------------------------------------------------------- documented choices


def test_unclipped_updates_come_back_bit_for_bit_in_their_dtype():
    params = {"a": jnp.zeros(5, jnp.bfloat16), "b": jnp.zeros(3)}
    tx = agc_optax.zclip(warmup_steps=2)
    state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(4):
        g = {
            "a": jnp.asarray(rng.standard_normal(5), jnp.bfloat16),
            "b": jnp.asarray(rng.standard_normal(3), jnp.float32),
        }
        out, state = tx.update(g, state)
        if float(state.clip_fraction) == 0:
            np.testing.assert_array_equal(np.asarray(out["a"]), np.asarray(g["a"]))
            np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(g["b"]))
        assert out["a"].dtype == jnp.bfloat16


def test_exclude_leaves_are_untouched_and_not_in_the_norm():
    tx = agc_optax.zclip(warmup_steps=1, exclude="head")
    params = {"body": jnp.zeros(2), "head": jnp.zeros(2)}
    state = tx.init(params)
    _, state = tx.update({"body": jnp.array([1.0, 0.0]), "head": jnp.array([1e6, 0.0])}, state)
    assert float(state.mean) == 1.0 and float(state.grad_norm) == 1.0
    out, state = tx.update({"body": jnp.array([50.0, 0.0]), "head": jnp.array([7.0, 0.0])}, state)
    assert float(state.clip_fraction) == 1.0
    np.testing.assert_array_equal(out["head"], [7.0, 0.0])


def test_non_finite_norms_leave_the_statistics_alone():
    tx = agc_optax.zclip(warmup_steps=2)
    state = tx.init({"w": jnp.zeros(2)})
    for n in (1.0, 2.0):
        _, state = tx.update({"w": jnp.array([n, 0.0])}, state)
    frozen = state
    nan = {"w": jnp.array([jnp.nan, 1.0])}
    out, state = tx.update(nan, state)
    np.testing.assert_array_equal(out["w"], nan["w"])  # NaN passes through
    inf = {"w": jnp.array([jnp.inf, 1.0])}
    out, state = tx.update(inf, state)
    np.testing.assert_array_equal(out["w"], [np.nan, 0.0])  # an Inf spike is clipped to 0/NaN
    for name in ("count", "mean", "var"):
        assert float(getattr(state, name)) == float(getattr(frozen, name))
    # The same during warm-up: a non-finite norm is not a warm-up sample.
    state = tx.init({"w": jnp.zeros(2)})
    _, state = tx.update(nan, state)
    assert int(state.count) == 0 and float(state.mean) == 0.0


# ----------------------------------------------------------------------------- composition


def test_inject_hyperparams_with_schedule_under_jit():
    shapes = [(3, 2), (2,)]
    seq = _sequence(np.random.default_rng(1), shapes, 12, spikes={6, 9})
    tx = optax.inject_hyperparams(agc_optax.zclip, static_args=("mode", "exclude"))(
        alpha=0.9, z_thresh=optax.constant_schedule(2.0), warmup_steps=3, max_grad_norm=None
    )
    got, state, _ = _run(tx, seq, shapes)
    ref = ZClipReference(0.9, 2.0, 3, "reciprocal")
    for t, grads in enumerate(seq):
        want, _ = ref.step(grads)
        for g, w in zip(got[t], want, strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-5)
    assert float(state.hyperparams["z_thresh"]) == 2.0
    assert int(state.inner_state.count) == 12


def test_chain_with_adamw_and_nnx_style_tree_get():
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    tx = optax.chain(agc_optax.zclip(warmup_steps=2), optax.adamw(1e-3))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(4):
        scale = 100.0 if t == 3 else 1.0 + 0.1 * t
        g = jax.tree.map(lambda p, s=scale: jnp.ones_like(p) * s, params)
        _, state = step(g, state, params)
    assert float(optax.tree.get(state, "clip_fraction")) == 1.0
    assert float(optax.tree.get(state, "grad_norm")) == pytest.approx(100 * np.sqrt(15), rel=1e-6)


def test_multisteps_advances_statistics_once_per_optimizer_step():
    shapes = [(3, 2), (2,)]
    micro = _sequence(np.random.default_rng(2), shapes, 16, spikes={11})
    k = 2
    tx = optax.MultiSteps(agc_optax.zclip(warmup_steps=3), every_k_schedule=k)
    params = {"l0": jnp.zeros((3, 2)), "l1": jnp.zeros(2)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    ref = ZClipReference(0.97, 2.5, 3, "reciprocal")
    for t, grads in enumerate(micro):
        out, state = step({"l0": jnp.asarray(grads[0]), "l1": jnp.asarray(grads[1])}, state)
        assert int(state.inner_opt_state.count) == (t + 1) // k  # micro-steps don't count
        if (t + 1) % k:
            assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))
            continue
        averaged = [(a + b) / 2 for a, b in zip(micro[t - 1], grads, strict=True)]
        want, _ = ref.step(averaged)
        np.testing.assert_allclose(out["l0"], want[0], rtol=1e-5)
        np.testing.assert_allclose(out["l1"], want[1], rtol=1e-5)
    assert float(state.inner_opt_state.mean) == pytest.approx(ref.mean, rel=1e-5)


SHARDED_SCRIPT = """
state = compare_stateful_steps(agc_optax.zclip(warmup_steps=3), 8, 6, 1.0)
assert float(state.clip_fraction) == 0.0 and int(state.count) == 8
print("SHARDED_OK", len(jax.devices()))
"""


def test_sharded_over_8_cpu_devices():
    assert "SHARDED_OK 8" in run_on_cpu_devices(SHARDED_SCRIPT, sharded_tree=True)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "zscore"}, r"`mode` must be one of \('reciprocal', 'mean', 'percentile'\)"),
        ({"alpha": 1.0}, r"`alpha` must be in \[0, 1\)"),
        ({"alpha": -0.5}, r"`alpha` must be a finite number >= 0"),
        ({"z_thresh": 0.0}, r"`z_thresh` must be > 0"),
        ({"warmup_steps": 0}, r"`warmup_steps` must be an integer >= 1"),
        ({"warmup_steps": 2.5}, r"`warmup_steps` must be an integer >= 1"),
        ({"max_grad_norm": -1.0}, r"`max_grad_norm` must be a finite number >= 0"),
        ({"eps": float("inf")}, r"`eps` must be a finite number >= 0"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        agc_optax.zclip(**kwargs)


def test_integer_leaves_name_the_path():
    params = {"w": jnp.zeros(2), "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(TypeError, match=r"`step`: the parameter has dtype int32"):
        agc_optax.zclip().init(params)
    tx = agc_optax.zclip()
    state = tx.init({"w": jnp.zeros(2), "step": jnp.zeros(())})
    with pytest.raises(TypeError, match=r"`step`: the gradient has dtype int32"):
        tx.update(params, state)
    agc_optax.zclip(exclude="step").init(params)  # the fix the message suggests works


def test_docstring_example_runs():
    result = doctest.testmod(importlib.import_module("agc_optax.zclip"))
    assert result.attempted > 0 and result.failed == 0

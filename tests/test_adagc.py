"""adagc against a float64 NumPy re-implementation over step sequences, composition, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agc_optax

from . import agc_reference as ref
from .multidevice import run_on_cpu_devices

# ----------------------------------------------------------------------------- float64 reference


def adagc_reference(grad_seq, axes, lambda_rel, beta, lambda_abs, warmup_steps):
    """The paper's equations in float64 (Wang et al. 2025, Alg. 1), with the documented choices.

    grad_seq: list over steps of lists of leaves; axes: unit axes per leaf (None: excluded).
    Returns (clipped gradients per step, final reference norms per leaf, clip fraction per step).
    """
    gammas = [None if a is None else np.inf for a in axes]
    outs, fractions = [], []
    lambdas = np.broadcast_to(lambda_rel, len(grad_seq))  # a value per step, for schedules
    for t, grads in enumerate(grad_seq, start=1):
        norms = [
            None if a is None else ref.unit_norms(g, a) for g, a in zip(grads, axes, strict=True)
        ]
        step_out, clipped_units, total_units = [], 0, 0
        if t <= warmup_steps:
            gnorm = np.sqrt(sum(np.sum(n**2) for n in norms if n is not None))
            h = lambda_abs / gnorm if gnorm > lambda_abs else 1.0
        for k, (g, a) in enumerate(zip(grads, axes, strict=True)):
            if a is None:
                step_out.append(np.asarray(g, np.float64))
                continue
            n, gam = norms[k], gammas[k]
            if t <= warmup_steps:
                clip = np.broadcast_to(h < 1.0, n.shape)
                hat, hat_norm = np.asarray(g, np.float64) * h, n * h
                new = np.minimum(gam, hat_norm)
            else:
                r = np.where(np.isinf(gam), n, gam)
                bound = lambdas[t - 1] * r
                clip = n > bound
                with np.errstate(divide="ignore", invalid="ignore"):
                    hat = np.where(clip, np.asarray(g, np.float64) * bound / n, g)
                hat_norm = np.where(clip, bound, n)
                new = beta * r + (1 - beta) * hat_norm
            # Zero or non-finite norms carry no scale information: gamma stays.
            informative = np.isfinite(n) & np.isfinite(hat_norm) & (hat_norm > 0)
            gammas[k] = np.where(informative, new, gam)
            step_out.append(hat)
            clipped_units += int(np.sum(clip))
            total_units += n.size
        outs.append(step_out)
        fractions.append(clipped_units / total_units if total_units else 0.0)
    return outs, gammas, fractions


def _sequence(rng, shapes, steps, spikes=(), scale=0.3, decay=0.97):
    """Gradients whose scale decays (as in training), with x100 spikes at the given steps."""
    seq = []
    for t in range(steps):
        s = scale * decay**t * (100.0 if t in spikes else 1.0)
        seq.append(
            [
                (rng.standard_normal(sh) * s * rng.uniform(0.5, 2)).astype(np.float32)
                for sh in shapes
            ]
        )
    return seq


def _run(tx, grad_seq, shapes, jit=True):
    params = {f"l{i}": jnp.zeros(sh, jnp.float32) for i, sh in enumerate(shapes)}
    state = tx.init(params)
    step = jax.jit(tx.update) if jit else tx.update
    outs, fractions = [], []
    for grads in grad_seq:
        tree = {f"l{i}": jnp.asarray(g) for i, g in enumerate(grads)}
        out, state = step(tree, state)
        outs.append([np.asarray(out[f"l{i}"]) for i in range(len(shapes))])
        fractions.append(float(optax.tree.get(state, "clip_fraction")))
    return outs, state, fractions


def _check_against_reference(shapes, axes, seq, lambda_rel, beta, lambda_abs, warmup, rule):
    tx = agc_optax.adagc(lambda_rel, beta, lambda_abs, warmup, unit_axes=rule)
    got, state, got_fr = _run(tx, seq, shapes)
    want, gammas, want_fr = adagc_reference(seq, axes, lambda_rel, beta, lambda_abs, warmup)
    for t, (g_step, w_step) in enumerate(zip(got, want, strict=True)):
        for g, w in zip(g_step, w_step, strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-30, err_msg=f"step {t + 1}")
    for i, gam in enumerate(gammas):
        got_gam = np.asarray(state.gamma[f"l{i}"], np.float64)
        np.testing.assert_allclose(got_gam, np.reshape(gam, got_gam.shape), rtol=2e-5)
    np.testing.assert_allclose(got_fr, want_fr, rtol=1e-6)
    assert int(state.count) == len(seq)


SHAPES = [(3, 3, 4, 8), (8,), (8, 5), ()]


@pytest.mark.parametrize("per_unit", [False, True], ids=["per_tensor", "per_unit"])
@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_sequence_matches_reference_across_warmup_boundary(per_unit, warmup):
    rng = np.random.default_rng(warmup)
    # Spikes inside warm-up (global clip), at the boundary, and after it (per-unit clip).
    seq = _sequence(rng, SHAPES, 12, spikes={1, warmup, warmup + 3})
    seq[warmup + 5][0] *= 50  # a spike in one leaf only
    rule = {f"l{i}": (-1,) if per_unit and len(s) >= 2 else () for i, s in enumerate(SHAPES)}
    axes = [rule[f"l{i}"] for i in range(len(SHAPES))]
    _check_against_reference(SHAPES, axes, seq, 1.05, 0.98, 1.0, warmup, rule)


@settings(deadline=None, max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    lambda_rel=st.sampled_from([0.9, 1.0, 1.05, 2.0]),
    beta=st.sampled_from([0.0, 0.5, 0.98]),
    lambda_abs=st.sampled_from([0.01, 1.0, 100.0]),
    warmup=st.integers(0, 5),
    spikes=st.sets(st.integers(0, 7), max_size=3),
)
def test_random_sequences_match_reference(seed, lambda_rel, beta, lambda_abs, warmup, spikes):
    rng = np.random.default_rng(seed)
    shapes = [(4, 3), (3,)]
    seq = _sequence(rng, shapes, 8, spikes=spikes)
    rule = {"l0": (1,), "l1": ()}
    _check_against_reference(shapes, [(1,), ()], seq, lambda_rel, beta, lambda_abs, warmup, rule)


def test_inferred_unit_axes_with_none():
    params = {"conv": {"kernel": jnp.zeros((3, 3, 2, 6))}, "dense": {"bias": jnp.zeros(6)}}
    state = agc_optax.adagc(unit_axes=None).init(params)
    assert state.gamma["conv"]["kernel"].shape == (6,)  # one per output feature, as AGC
    assert state.gamma["dense"]["bias"].shape == ()
    assert int(state.num_units) == 7
    state = agc_optax.adagc().init(params)
    assert state.gamma["conv"]["kernel"].shape == () and int(state.num_units) == 2


# ----------------------------------------------------------------------------- documented choices


def test_unclipped_leaves_come_back_bit_for_bit_in_their_dtype():
    params = {"a": jnp.zeros(5, jnp.bfloat16), "b": jnp.zeros(3, jnp.float32)}
    tx = agc_optax.adagc(warmup_steps=1)
    state = tx.init(params)
    rng = np.random.default_rng(0)
    g1 = {
        "a": jnp.asarray(rng.standard_normal(5) * 0.1, jnp.bfloat16),
        "b": jnp.asarray(rng.standard_normal(3) * 0.1, jnp.float32),
    }
    out, state = tx.update(g1, state)
    g2 = {"a": g1["a"] * 0.5, "b": g1["b"] * 100}
    out, state = tx.update(g2, state)
    assert out["a"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out["a"]), np.asarray(g2["a"]))
    assert float(jnp.linalg.norm(out["b"])) == pytest.approx(
        1.05 * float(jnp.linalg.norm(g1["b"])), rel=1e-6
    )


def test_zero_gradient_in_warmup_does_not_freeze_the_leaf():
    # The paper's running minimum would become 0 and zero this leaf's gradient forever.
    params = {"used": jnp.zeros(3), "late": jnp.zeros(3)}
    tx = agc_optax.adagc(warmup_steps=2)
    state = tx.init(params)
    for _ in range(2):
        _, state = tx.update({"used": jnp.ones(3), "late": jnp.zeros(3)}, state)
    assert float(state.gamma["late"]) == np.inf
    g = {"used": jnp.ones(3) * 0.5, "late": jnp.full(3, 0.2)}
    out, state = tx.update(g, state)
    np.testing.assert_array_equal(out["late"], g["late"])  # its own norm is its reference
    assert float(state.gamma["late"]) == pytest.approx(float(jnp.linalg.norm(g["late"])))


def test_exclude_passes_through_and_is_not_in_the_global_norm():
    params = {"body": jnp.zeros(4), "head": jnp.zeros(4)}
    tx = agc_optax.adagc(lambda_abs=1.0, warmup_steps=5, exclude="head")
    state = tx.init(params)
    assert isinstance(state.gamma["head"], optax.MaskedNode)
    g = {"body": jnp.full(4, 0.4), "head": jnp.full(4, 100.0)}  # body norm 0.8 < 1
    out, state = tx.update(g, state)
    np.testing.assert_array_equal(out["body"], g["body"])
    np.testing.assert_array_equal(out["head"], g["head"])
    assert int(state.num_units) == 1


def test_non_finite_gradients():
    params = {"nan": jnp.zeros(3), "inf": jnp.zeros(3), "ok": jnp.zeros(3)}
    tx = agc_optax.adagc(warmup_steps=1)
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(lambda p: jnp.full(3, 0.1), params), state)
    before = state.gamma
    g = {
        "nan": jnp.array([1.0, jnp.nan, 0.0]),
        "inf": jnp.array([1.0, jnp.inf, 0.0]),
        "ok": jnp.full(3, 0.1),
    }
    out, state = tx.update(g, state)
    np.testing.assert_array_equal(out["nan"], g["nan"])  # NaN units pass through
    np.testing.assert_array_equal(out["inf"], [0.0, np.nan, 0.0])  # Inf units: clipped to 0/NaN
    np.testing.assert_array_equal(out["ok"], g["ok"])
    assert float(state.gamma["nan"]) == float(before["nan"])
    assert float(state.gamma["inf"]) == float(before["inf"])
    # In warm-up a NaN global norm clips nothing; apply_if_finite then skips the step.
    tx = optax.apply_if_finite(optax.chain(agc_optax.adagc(), optax.sgd(1.0)), 3)
    state = tx.init(params)
    out, state = tx.update(g, state, params)
    assert int(state.inner_state[0].count) == 0  # adagc's count was kept too
    assert int(state.notfinite_count) == 1


# ----------------------------------------------------------------------------- composition


def _tree(seed=0, scale=0.2):
    rng = np.random.default_rng(seed)
    shapes = {"conv": {"kernel": (3, 3, 4, 8), "bias": (8,)}, "head": {"kernel": (8, 5)}}
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def test_chain_with_adam_and_stats_via_tree_get():
    params = _tree(0)
    tx = optax.chain(agc_optax.adagc(warmup_steps=1), optax.adam(1e-3))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t, factor in enumerate([1.0, 1.0, 100.0]):
        g = jax.tree.map(lambda x, f=factor: x * f, _tree(t + 1))
        _, state = step(g, state, params)
    assert float(optax.tree.get(state, "clip_fraction")) == 1.0  # every leaf spiked at step 3
    assert int(optax.tree.get(state, "num_units")) == 3


def test_inject_hyperparams_with_schedule_under_jit():
    shapes = [(4, 3), (3,)]
    seq = _sequence(np.random.default_rng(3), shapes, 7, spikes={3, 5})
    tx = optax.inject_hyperparams(agc_optax.adagc, static_args=("unit_axes", "exclude"))(
        lambda_rel=optax.linear_schedule(1.0, 1.5, 5), beta=0.9, lambda_abs=0.5, warmup_steps=2
    )
    got, state, _ = _run(tx, seq, shapes)
    lambdas = [min(1.0 + 0.1 * t, 1.5) for t in range(len(seq))]  # schedule at counts 0..6
    want, gammas, _ = adagc_reference(seq, [(), ()], lambdas, 0.9, 0.5, 2)
    for g_step, w_step in zip(got, want, strict=True):
        for g, w in zip(g_step, w_step, strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-5)
    np.testing.assert_allclose(float(state.inner_state.gamma["l1"]), gammas[1], rtol=2e-5)
    assert float(state.hyperparams["lambda_rel"]) == pytest.approx(1.5)
    assert float(state.hyperparams["warmup_steps"]) == 2


def test_multisteps_advances_state_once_per_optimizer_step():
    shapes = [(4, 3), (3,)]
    micro = _sequence(np.random.default_rng(5), shapes, 8, spikes={5})
    k = 2
    tx = optax.MultiSteps(agc_optax.adagc(warmup_steps=1), every_k_schedule=k)
    params = {"l0": jnp.zeros((4, 3)), "l1": jnp.zeros(3)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    emitted = []
    for t, grads in enumerate(micro):
        out, state = step({"l0": jnp.asarray(grads[0]), "l1": jnp.asarray(grads[1])}, state)
        inner = state.inner_opt_state
        assert int(inner.count) == (t + 1) // k  # micro-steps do not advance the EMA
        if (t + 1) % k == 0:
            emitted.append([np.asarray(out["l0"]), np.asarray(out["l1"])])
        else:
            assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))
    averaged = [
        [(a + b) / 2 for a, b in zip(micro[i], micro[i + 1], strict=True)] for i in range(0, 8, k)
    ]
    want, gammas, _ = adagc_reference(averaged, [(), ()], 1.05, 0.98, 1.0, 1)
    for got_step, want_step in zip(emitted, want, strict=True):
        for g, w in zip(got_step, want_step, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5)
    np.testing.assert_allclose(float(state.inner_opt_state.gamma["l0"]), gammas[0], rtol=1e-5)


SHARDED_SCRIPT = """
for rule in [(), None]:  # per tensor, and per unit along the sharded axes
    compare_stateful_steps(agc_optax.adagc(warmup_steps=2, unit_axes=rule), 5, 3, 0.1)
print("SHARDED_OK", len(jax.devices()))
"""


def test_sharded_over_8_cpu_devices():
    assert "SHARDED_OK 8" in run_on_cpu_devices(SHARDED_SCRIPT, sharded_tree=True)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": 1.0}, r"`beta` must be in \[0, 1\)"),
        ({"beta": -0.1}, r"`beta` must be a finite number >= 0"),
        ({"lambda_rel": -1.0}, r"`lambda_rel` must be a finite number >= 0"),
        ({"lambda_abs": float("nan")}, r"`lambda_abs` must be a finite number >= 0"),
        ({"warmup_steps": 2.5}, r"`warmup_steps` must be an integer >= 0"),
        ({"warmup_steps": -1}, r"`warmup_steps` must be an integer >= 0"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        agc_optax.adagc(**kwargs)


def test_bad_rules_and_leaves_name_the_path():
    params = {"dense": {"kernel": jnp.zeros((4, 2))}, "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(ValueError, match=r"`dense/kernel`: unit axes \(5,\) out of range"):
        agc_optax.adagc(unit_axes=[("kernel", (5,))], exclude="step").init(params)
    with pytest.raises(TypeError, match=r"`step`: the parameter has dtype int32"):
        agc_optax.adagc().init(params)
    tx = agc_optax.adagc(exclude="step")
    state = tx.init(params)
    bad = state._replace(gamma={"dense": {"kernel": jnp.zeros(3)}, "step": optax.MaskedNode()})
    with pytest.raises(ValueError, match=r"`dense/kernel`: the state's reference norm has shape"):
        tx.update(params, bad)
    with pytest.raises(ValueError, match=r"adagc: the state holds 1 reference norms but"):
        tx.update({"a": jnp.zeros(2), "b": jnp.zeros(2)}, state)


def test_docstring_example_runs():
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("agc_optax.adagc"))
    assert result.attempted > 0 and result.failed == 0

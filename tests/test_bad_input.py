"""Bad input to the transforms and optimizers: each case names the culprit (issue 12)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import agc_optax


# 1. Concrete array hyperparameters are checked like Python numbers.
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: agc_optax.adaptive_grad_clip(jnp.array(-1.0)), r"`clipping` must be a number"),
        (lambda: agc_optax.adaptive_grad_clip(jnp.array(np.nan)), r"`clipping` must be a number"),
        (lambda: agc_optax.adaptive_grad_clip(0.1, np.float32(np.inf)), r"`eps` must be a finite"),
        (lambda: agc_optax.adamw_agc(1e-3, b1=jnp.array(1.0)), r"`b1` must be in \[0, 1\)"),
        (lambda: agc_optax.adamw_agc(1e-3, b2=jnp.array(-0.5)), r"`b2` must be a finite"),
        (lambda: agc_optax.sgd_agc(0.1, weight_decay=jnp.array(-1.0)), r"`weight_decay`"),
        (lambda: agc_optax.adagc(lambda_rel=jnp.array(-1.0)), r"`lambda_rel` must be a finite"),
        (lambda: agc_optax.adagc(warmup_steps=jnp.array(-1)), r"`warmup_steps` must be an int"),
        (lambda: agc_optax.zclip(alpha=jnp.array(1.0)), r"`alpha` must be in \[0, 1\)"),
        (lambda: agc_optax.zclip(z_thresh=jnp.array(0.0)), r"`z_thresh` must be > 0"),
        (lambda: agc_optax.zclip(warmup_steps=jnp.array(0)), r"`warmup_steps` must be an int"),
    ],
)
def test_concrete_array_hyperparameters_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_array_hyperparameter_error_shows_the_value():
    with pytest.raises(ValueError, match=r"got an array holding -1\.0"):
        agc_optax.adaptive_grad_clip(jnp.array(-1.0))


def test_traced_hyperparameters_pass_unchecked():
    params = {"w": jnp.ones((3, 2))}
    grads = {"w": jnp.full((3, 2), 5.0)}

    @jax.jit
    def run(clipping):
        tx = agc_optax.adaptive_grad_clip(clipping)  # a tracer: cannot be checked
        return tx.update(grads, tx.init(params), params)[0]

    out = run(jnp.array(0.1))
    assert np.isfinite(np.asarray(out["w"])).all()


# 2. Non-numeric hyperparameters and non-bool flags are TypeErrors naming the argument.
@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: agc_optax.sgd_agc(0.1, momentum="0.9"), "momentum"),
        (lambda: agc_optax.adaptive_grad_clip("0.1"), "clipping"),
        (lambda: agc_optax.adaptive_grad_clip(0.1, [1e-3]), "eps"),
        (lambda: agc_optax.adamw_agc(1e-3, b1="0.9"), "b1"),
        (lambda: agc_optax.adagc(lambda_rel="1.05"), "lambda_rel"),
        (lambda: agc_optax.zclip(alpha="0.97"), "alpha"),
        (lambda: agc_optax.zclip(warmup_steps="25"), "warmup_steps"),
        (lambda: agc_optax.adagc(warmup_steps="100"), "warmup_steps"),
        (lambda: agc_optax.adaptive_grad_clip(1 + 2j), "clipping"),
    ],
)
def test_non_numeric_hyperparameters_are_type_errors(make, name):
    with pytest.raises(TypeError, match=rf"`{name}` must be a real number.*got"):
        make()


def test_string_hyperparameter_error_says_what_to_pass():
    with pytest.raises(TypeError, match=r"got str '0\.9'; pass e\.g\. `momentum=0\.9`"):
        agc_optax.sgd_agc(0.1, momentum="0.9")
    with pytest.raises(TypeError, match=r"pass e\.g\. `warmup_steps=25`"):
        agc_optax.zclip(warmup_steps="25")


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: agc_optax.sgd_agc(0.1, nesterov="yes"), "nesterov"),
        (lambda: agc_optax.sgd_agc(0.1, stats="yes"), "stats"),
        (lambda: agc_optax.adaptive_grad_clip(stats="yes"), "stats"),
        (lambda: agc_optax.adamw_agc(1e-3, stats=1), "stats"),
    ],
)
def test_flags_must_be_bools(make, name):
    with pytest.raises(TypeError, match=rf"`{name}` must be a bool \(True or False\), got"):
        make()


def test_array_flag_keeps_the_static_args_advice():
    with pytest.raises(TypeError, match=r"`stats` must be a Python bool.*static_args"):
        agc_optax.adaptive_grad_clip(stats=jnp.array(True))


# 3. sgd_agc (and adamw_agc): learning rate and momentum ranges.
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: agc_optax.sgd_agc(-0.1), r"`learning_rate` must be a finite number >= 0"),
        (lambda: agc_optax.sgd_agc(float("inf")), r"`learning_rate` must be a finite number"),
        (lambda: agc_optax.sgd_agc(jnp.array(np.nan)), r"`learning_rate` must be a finite"),
        (lambda: agc_optax.sgd_agc(0.1, momentum=1.0), r"`momentum` must be in \[0, 1\)"),
        (lambda: agc_optax.sgd_agc(0.1, momentum=1.5), r"`momentum` must be in \[0, 1\)"),
        (lambda: agc_optax.sgd_agc_step(-0.1), r"`learning_rate` must be a finite"),
        (lambda: agc_optax.adamw_agc(-1e-3), r"`learning_rate` must be a finite"),
    ],
)
def test_sgd_agc_rejects_bad_learning_rate_and_momentum(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_schedules_and_plain_sgd_are_accepted():
    agc_optax.sgd_agc(optax.constant_schedule(-1.0))  # callables are not checked
    agc_optax.sgd_agc(lambda count: 0.1, momentum=None)
    agc_optax.sgd_agc(0.0, momentum=0.0)
    with pytest.raises(TypeError, match=r"`learning_rate` must be a real number"):
        agc_optax.sgd_agc("0.1")


# 4. A leaf that is not an array says what it is and what to pass.
def test_python_float_parameter_says_what_it_is():
    with pytest.raises(TypeError, match=r"`w`: the parameter is a Python float.*jnp\.asarray"):
        agc_optax.adaptive_grad_clip().init({"w": 1.0})


def test_python_float_gradient_says_what_it_is():
    params = {"w": jnp.ones(())}
    tx = agc_optax.sgd_agc(0.1)
    with pytest.raises(TypeError, match=r"`w`: the gradient is a Python float.*jnp\.asarray"):
        tx.update({"w": 1.0}, tx.init(params), params)
    with pytest.raises(TypeError, match=r"`w`: the gradient is a Python float"):
        agc_optax.zclip().update({"w": 1.0}, agc_optax.zclip().init(params))


# 5. Zero-size leaves and empty trees.
@pytest.mark.parametrize(
    "make",
    [
        lambda rule: agc_optax.adaptive_grad_clip(stats=True, unit_axes=rule),
        lambda rule: agc_optax.sgd_agc(0.1, stats=True, unit_axes=rule),
        lambda rule: agc_optax.adamw_agc(1e-3, stats=True, unit_axes=rule),
    ],
)
@pytest.mark.parametrize("rule, units", [(None, 0), ((), 1), ([("w", (0,))], 4)])
def test_zero_size_leaf_with_stats(make, rule, units):
    tx = make(rule)
    for params, total, fraction in [
        ({"w": jnp.ones((4, 0))}, units, 0.0),
        ({"w": jnp.ones((4, 0)), "v": jnp.full(3, 2.0)}, units + 1, 1 / (units + 1)),
    ]:
        grads = {k: 1e3 * v for k, v in params.items()}  # `v` is clipped
        out, state = jax.jit(tx.update)(grads, tx.init(params), params)
        assert out["w"].shape == (4, 0)
        assert int(optax.tree.get(state, "num_units")) == total
        clip_fraction = float(optax.tree.get(state, "clip_fraction"))
        assert np.isfinite(clip_fraction)
        assert clip_fraction == pytest.approx(fraction)
        assert np.isfinite(float(optax.tree.get(state, "max_ratio")))


def test_describe_empty_tree():
    table = agc_optax.describe({})
    assert len(table) == 0 and table.num_units == 0
    assert str(table).endswith("0 leaves, 0 clipped units")
    with pytest.raises(KeyError, match=r"no leaf with path 'x'.*empty"):
        table["x"]


# 6. Non-finite weights: the unit's output is NaN, every other unit is untouched.
def _nonfinite_case(bad):
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
    params["dense"]["kernel"] = params["dense"]["kernel"].at[2, 1].set(bad)  # unit 1 (a column)
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.5), params)
    return params, grads


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "make",
    [
        lambda: agc_optax.adaptive_grad_clip(0.01, stats=True),
        lambda: agc_optax.sgd_agc(0.1, exclude=None),
        lambda: agc_optax.adamw_agc(1e-3, exclude=None),
    ],
)
def test_nonfinite_weight_unit_gives_nan(make, bad):
    params, grads = _nonfinite_case(bad)
    tx = make()
    out, _ = tx.update(grads, tx.init(params), params)
    kernel = np.asarray(out["dense"]["kernel"])
    assert np.isnan(kernel[:, 1]).all()
    assert np.isfinite(kernel[:, [0, 2]]).all()
    assert np.isfinite(np.asarray(out["dense"]["bias"])).all()


def test_nonfinite_weight_stats_and_apply_if_finite_skip():
    params, grads = _nonfinite_case(np.nan)
    tx = agc_optax.adaptive_grad_clip(0.01, stats=True)
    _, state = tx.update(grads, tx.init(params), params)
    assert np.isnan(float(state.max_ratio))
    # apply_if_finite tests the updates it receives: placed after AGC, it skips the step.
    safe = optax.chain(agc_optax.adaptive_grad_clip(0.01), optax.apply_if_finite(optax.sgd(0.1), 3))
    updates, safe_state = safe.update(grads, safe.init(params), params)
    assert int(safe_state[1].notfinite_count) == 1
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))


def test_nonfinite_weight_pallas_path_gives_nan(monkeypatch):
    from agc_optax import kernels

    monkeypatch.setattr(kernels, "MIN_SIZE", 1)
    params = {"kernel": jnp.ones((16, 128)).at[3, 5].set(np.inf)}
    grads = {"kernel": jnp.full((16, 128), 0.5)}
    for implementation in ("xla", "pallas"):
        tx = agc_optax.sgd_agc(0.1, exclude=None, implementation=implementation)
        out = np.asarray(tx.update(grads, tx.init(params), params)[0]["kernel"])
        assert np.isnan(out[:, 5]).all(), implementation
        assert np.isfinite(np.delete(out, 5, axis=1)).all(), implementation


def test_finite_weights_unchanged_by_the_nonfinite_rule():
    from agc_optax._norms import clip_scale

    g_pow = jnp.array([0.0, 1.0, 4.0, 100.0, 1e-30])
    w_pow = jnp.array([0.0, 1.0, 1e-8, 2.0, 3.0])
    scale, clip, ratio = clip_scale(g_pow, w_pow, 0.5, 1e-3)
    np.testing.assert_array_equal(np.asarray(clip), [False, True, True, True, False])
    assert np.isfinite(np.asarray(scale)).all() and np.isfinite(np.asarray(ratio)).all()
    assert float(scale[0]) == 1.0 and float(scale[4]) == 1.0


def test_describe_marks_integer_leaves_the_transforms_reject():
    params = {"kernel": jnp.ones((3, 4)), "step": jnp.zeros((2, 2), jnp.int32)}
    table = agc_optax.describe(params)
    assert table["step"].unit_axes is None and table["step"].num_units == 0
    assert "exclude it" in table["step"].note and "step" in str(table)
    assert table.num_units == 4  # only the float kernel's units
    with pytest.raises(TypeError, match="`step`.*int32"):
        tx = agc_optax.adaptive_grad_clip(0.1)
        tx.update(params, tx.init(params), params)
    excluded = agc_optax.describe(params, exclude=r"step$")
    assert excluded["step"].excluded and excluded["step"].note == ""

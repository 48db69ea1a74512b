"""adaptive_grad_clip against the float64 NumPy reference, invariants, numerics and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agc_optax

from . import agc_reference as ref


def _apply(grads, params, clipping=0.01, eps=1e-3, **kw):
    tx = agc_optax.adaptive_grad_clip(clipping, eps, **kw)
    return tx.update(grads, tx.init(params), params)


# ----------------------------------------------------------------------------- hypothesis trees


@st.composite
def leaf_cases(draw):
    """A (grad, param, unit_axes) triple with varied rank, units and magnitudes."""
    rank = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    axes = tuple(a for a in range(rank) if draw(st.booleans()))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    g_scale = 10.0 ** draw(st.integers(-6, 4))
    w_scale = 10.0 ** draw(st.integers(-5, 2))
    g = (rng.standard_normal(shape) * g_scale).astype(np.float32)
    w = (rng.standard_normal(shape) * w_scale).astype(np.float32)
    if draw(st.booleans()) and rank:
        w[(0,) * rank] = 0.0  # some zero weights, so eps matters
    if draw(st.booleans()):
        g = np.zeros_like(g)
    return g, w, axes


trees = st.lists(leaf_cases(), min_size=1, max_size=4)
clippings = st.sampled_from([0.0, 0.01, 0.1, 1.0, 100.0])
epss = st.sampled_from([0.0, 1e-3, 1.0])


def _as_tree(cases):
    grads = {f"l{i}": jnp.asarray(g) for i, (g, _, _) in enumerate(cases)}
    params = {f"l{i}": jnp.asarray(w) for i, (_, w, _) in enumerate(cases)}
    rule = {f"l{i}": axes for i, (_, _, axes) in enumerate(cases)}
    return grads, params, rule


@settings(deadline=None, max_examples=30)
@given(trees, clippings, epss)
def test_matches_float64_reference(cases, clipping, eps):
    grads, params, rule = _as_tree(cases)
    out, _ = _apply(grads, params, clipping, eps, unit_axes=rule)
    for i, (g, w, axes) in enumerate(cases):
        want, _, _ = ref.agc(g, w, axes, clipping, eps)
        got = np.asarray(out[f"l{i}"], np.float64)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-30)


@settings(deadline=None, max_examples=30)
@given(trees, clippings, epss)
def test_invariants(cases, clipping, eps):
    grads, params, rule = _as_tree(cases)
    out, _ = _apply(grads, params, clipping, eps, unit_axes=rule)
    again, _ = _apply(out, params, clipping, eps, unit_axes=rule)
    for i, (g, w, axes) in enumerate(cases):
        got = np.asarray(out[f"l{i}"])
        bound = clipping * np.maximum(ref.unit_norms(w, axes), eps)
        g_norm = ref.unit_norms(g, axes)
        # Every unit ends at or under its bound.
        assert np.all(ref.unit_norms(got, axes) <= bound * (1 + 1e-5) + 1e-35)
        # Units clearly under the bound come back bit for bit.
        under = np.broadcast_to(g_norm < bound * (1 - 1e-5), g.shape)
        np.testing.assert_array_equal(got[under], g[under])
        # Direction kept: out = c * g with 0 <= c <= 1 per unit.
        dot = np.sum(got.astype(np.float64) * g, axis=ref.reduce_axes(g.ndim, axes), keepdims=True)
        assert np.all(dot >= -1e-30)
        # Idempotent (up to float32 rounding of units sitting at the bound).
        np.testing.assert_allclose(np.asarray(again[f"l{i}"]), got, rtol=2e-6, atol=1e-35)


def test_formula_by_hand():
    w = jnp.array([[3.0, 0.0], [4.0, 0.0]])  # column norms 5 and 0
    g = jnp.array([[30.0, 1.0], [40.0, 0.0]])  # column norms 50 and 1
    out, _ = _apply({"k": g}, {"k": w}, clipping=0.1, eps=0.5)
    # Column 0: bound 0.1 * 5 = 0.5 -> scaled by 0.5/50. Column 1: bound 0.1 * max(0, 0.5) = 0.05.
    np.testing.assert_allclose(out["k"], [[0.3, 0.05], [0.4, 0.0]], rtol=1e-6)


# ----------------------------------------------------------------------------- vs optax


def _rand(shape, seed, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


@pytest.mark.parametrize(
    "path, shape",
    [
        ("dense/kernel", (16, 8)),
        ("conv/kernel", (3, 3, 4, 8)),
        ("conv3d/kernel", (2, 3, 3, 4, 8)),
        ("norm/scale", (8,)),
        ("dense/bias", (8,)),
    ],
)
def test_equals_optax_where_its_rule_is_right(path, shape):
    module, name = path.split("/")
    params = {module: {name: _rand(shape, 0)}}
    grads = {module: {name: _rand(shape, 1, scale=0.05)}}
    ours, _ = _apply(grads, params, 0.02)
    tx = optax.adaptive_grad_clip(0.02)
    theirs, _ = tx.update(grads, tx.init(params), params)
    assert int(np.sum(np.asarray(ours[module][name]) != np.asarray(grads[module][name]))) > 0
    np.testing.assert_allclose(ours[module][name], theirs[module][name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "path, shape, our_units, optax_units",
    [
        ("conv1d/kernel", (3, 4, 8), (2,), (1, 2)),  # optax: rank 3 is "multi-head", per (in, out)
        ("attn/out/kernel", (2, 4, 8), (2,), (1, 2)),  # optax: per (D, F), summing heads only
        ("embed/embedding", (10, 8), (0,), (1,)),  # optax: per feature column, not per token
        ("head/kernel", (1, 8), (1,), ()),  # optax squeezes (1, N) into one vector unit
    ],
)
def test_differs_from_optax_as_documented(path, shape, our_units, optax_units):
    module, name = path.split("/", 1)
    w, g = np.asarray(_rand(shape, 0)), np.asarray(_rand(shape, 1, scale=0.05))
    params, grads = {module: {name: jnp.asarray(w)}}, {module: {name: jnp.asarray(g)}}
    ours, _ = _apply(grads, params, 0.02)
    tx = optax.adaptive_grad_clip(0.02)
    theirs, _ = tx.update(grads, tx.init(params), params)
    leaf = lambda t: np.asarray(t[module][name] if "/" not in name else t[module][name])
    np.testing.assert_allclose(leaf(ours), ref.agc(g, w, our_units, 0.02, 1e-3)[0], rtol=1e-5)
    np.testing.assert_allclose(leaf(theirs), ref.agc(g, w, optax_units, 0.02, 1e-3)[0], rtol=1e-5)
    assert not np.allclose(leaf(ours), leaf(theirs), rtol=1e-3)


def test_bf16_in_bf16_out_and_more_accurate_than_optax():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 4)).astype(np.float32)
    g = (rng.standard_normal((512, 4)) * 0.5).astype(np.float32) + 0.3
    w16, g16 = jnp.asarray(w, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16)
    ours, _ = _apply({"k": g16}, {"k": w16}, 0.05)
    assert ours["k"].dtype == jnp.bfloat16
    want = ref.agc(np.asarray(g16, np.float64), np.asarray(w16, np.float64), (1,), 0.05, 1e-3)[0]
    ours_err = np.max(np.abs(np.asarray(ours["k"], np.float64) - want) / np.abs(want).max())
    assert ours_err <= 2**-8  # within one bf16 rounding of the exact answer
    tx = optax.adaptive_grad_clip(0.05)
    theirs, _ = tx.update({"k": g16}, tx.init({"k": w16}), {"k": w16})
    theirs_err = np.max(np.abs(np.asarray(theirs["k"], np.float64) - want) / np.abs(want).max())
    assert ours_err <= theirs_err


# ----------------------------------------------------------------------------- numerics


def test_zero_gradients_and_zero_weights_give_no_nan_also_under_grad():
    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    grads = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    for eps in (1e-3, 0.0):
        out, _ = _apply(grads, params, 0.01, eps)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))

        def loss(g, w, eps=eps):
            tx = agc_optax.adaptive_grad_clip(0.01, eps)
            u, _ = tx.update(g, tx.init(w), w)
            return sum(jnp.sum(x**2) for x in jax.tree.leaves(u))

        for arg in (0, 1):
            d = jax.grad(loss, argnums=arg)(grads, params)
            assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(d)), (eps, arg)
        # And at a point where units are clipped, also with zero weights and eps=0.
        d = jax.grad(loss, argnums=(0, 1))(jax.tree.map(jnp.ones_like, grads), params)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(d)), eps


def test_gradient_through_transform_matches_finite_differences():
    w = _rand((3, 2), 0)
    g = _rand((3, 2), 1)

    def f(g):
        tx = agc_optax.adaptive_grad_clip(0.3)
        return jnp.sum(jnp.sin(tx.update({"k": g}, tx.init({"k": w}), {"k": w})[0]["k"]))

    jax.config.update("jax_enable_x64", False)
    analytic = jax.grad(f)(g)
    h = 1e-3
    numeric = np.zeros((3, 2))
    for idx in np.ndindex(3, 2):
        e = np.zeros((3, 2), np.float32)
        e[idx] = h
        numeric[idx] = (f(g + e) - f(g - e)) / (2 * h)
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=2e-3)


def test_huge_finite_gradients_stay_finite():
    params = {"k": jnp.ones((2, 3), jnp.float32)}
    grads = {"k": jnp.full((2, 3), 3e38, jnp.float32)}  # squared norm overflows float32
    out, _ = _apply(grads, params, 0.01)
    assert np.all(np.isfinite(out["k"]))
    assert np.all(ref.unit_norms(np.asarray(out["k"]), (1,)) <= 0.01 * np.sqrt(2) * 1.0001)


# Issue 12's cases: squared norms beyond float32's range (~3.4e38), i.e. norms above ~1.8e19.
_OVERFLOW_CASES = [(1e19, 1e20), (1e30, 1e30), (1e20, 1e19), (3e37, 3e37), (1e-3, 1e20)]


def _check_bound(out, g, w, axes, clipping, eps, dtype):
    """Finite, and ||out_i|| <= clipping * max(||W_i||, eps) in float64, to dtype's rounding.

    Units whose exact scale is below float32's smallest normal number may come out as zero
    (XLA:CPU flushes subnormal scales); elsewhere the output equals the float64 reference.
    """
    out64 = np.asarray(out, np.float64)
    assert np.isfinite(out64).all()
    g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
    expected, clip, _ = ref.agc(g64, w64, axes, clipping, eps)
    rtol = 1e-5 if dtype == jnp.float32 else 2e-2
    bound = clipping * np.maximum(ref.unit_norms(w64, axes), eps)
    assert (ref.unit_norms(out64, axes) <= bound * (1 + rtol)).all()
    with np.errstate(divide="ignore", invalid="ignore"):
        exact_scale = np.where(clip, bound / ref.unit_norms(g64, axes), 1.0)
    normal = np.broadcast_to(exact_scale >= np.finfo(np.float32).tiny, g64.shape)
    np.testing.assert_allclose(out64[normal], expected[normal], rtol=rtol)
    return clip


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("g_value, w_value", _OVERFLOW_CASES)
def test_overflowing_norms_still_obey_the_bound(dtype, g_value, w_value):
    rng = np.random.default_rng(0)
    shape = (6, 5)
    g = jnp.asarray(rng.uniform(0.5, 1.0, shape) * g_value, dtype)
    w = jnp.asarray(rng.uniform(0.5, 1.0, shape) * w_value, dtype)
    w = w.at[:, 0].set(1.0)  # one ordinary unit next to the overflowing ones
    tx = agc_optax.adaptive_grad_clip(0.01, stats=True)
    out, state = jax.jit(tx.update)({"k": g}, tx.init({"k": w}), {"k": w})
    clip = _check_bound(out["k"], g, w, (1,), 0.01, 1e-3, dtype)
    np.testing.assert_allclose(float(state.clip_fraction), clip.mean(), rtol=1e-6)
    assert np.isfinite(float(state.max_ratio))


@pytest.mark.parametrize("make", ["sgd_agc", "adamw_agc"])
def test_optimizers_clip_overflowing_units_too(make):
    g = jnp.full((4, 3), 1e19, jnp.float32)
    w = jnp.full((4, 3), 1e20, jnp.float32)
    tx = getattr(agc_optax, make)(1.0, clipping=0.01, weight_decay=0.0, exclude=None)
    if make == "sgd_agc":
        tx = agc_optax.sgd_agc(1.0, momentum=0.0, clipping=0.01, weight_decay=0.0, exclude=None)
    updates, _ = tx.update({"k": g}, tx.init({"k": w}), {"k": w})
    step = np.asarray(updates["k"], np.float64)
    assert np.isfinite(step).all()
    if make == "sgd_agc":  # the step is -lr * clipped gradient: its norm is the bound
        np.testing.assert_allclose(ref.unit_norms(step, (1,)), 0.01 * 2e20, rtol=1e-5)


@settings(deadline=None, max_examples=40)
@given(
    st.integers(-20, 37),
    st.integers(-20, 37),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0.001, 0.1, 10.0]),
)
def test_bound_holds_across_float32s_range(g_exp, w_exp, seed, clipping):
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal((5, 4)) * 10.0**g_exp).astype(np.float32)
    w = (rng.standard_normal((5, 4)) * 10.0**w_exp).astype(np.float32)
    out, _ = _apply({"k": jnp.asarray(g)}, {"k": jnp.asarray(w)}, clipping)
    _check_bound(out["k"], g, w, (1,), clipping, 1e-3, jnp.float32)


def test_overflowing_complex_units_keep_their_imaginary_part():
    # |1e20 (1 + i)|^2 overflows float32, so the rescaled branch computes these norms; it must
    # scale the complex values, not their real parts (which once made the bound 1.41x too loose).
    g = jnp.full((4, 3), 1e20 + 1e20j, jnp.complex64).at[:, 0].set(1e-3)
    w = jnp.full((4, 3), 1.0 + 1.0j, jnp.complex64)
    tx = agc_optax.adaptive_grad_clip(0.01, unit_axes=lambda path, leaf: (1,))
    out, _ = jax.jit(tx.update)({"k": g}, tx.init({"k": w}), {"k": w})
    norms = ref.unit_norms(np.abs(np.asarray(out["k"], np.complex128)), (1,))
    bound = 0.01 * ref.unit_norms(np.abs(np.asarray(w, np.complex128)), (1,))
    np.testing.assert_allclose(norms[..., 1:], bound[..., 1:], rtol=1e-6)  # clipped to the bound
    np.testing.assert_array_equal(np.asarray(out["k"])[:, 0], np.asarray(g)[:, 0])  # untouched


def test_overflow_fallback_runs_only_where_needed():
    """Ordinary leaves compile the cheap path only: the rescaled norms sit in a conditional."""
    params = {"k": jnp.ones((8, 4))}
    tx = agc_optax.adaptive_grad_clip(0.01)
    hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
    assert " conditional(" in hlo
    # ordinary values give the same bits as a direct float64-checked formula
    g = jnp.asarray(np.random.default_rng(1).standard_normal((8, 4)), jnp.float32)
    out, _ = jax.jit(tx.update)({"k": g}, tx.init(params), params)
    expected, _, _ = ref.agc(np.asarray(g), np.ones((8, 4)), (1,), 0.01, 1e-3)
    np.testing.assert_allclose(np.asarray(out["k"]), expected, rtol=1e-6)


def test_non_finite_units_stay_non_finite_and_others_are_untouched_by_them():
    w = np.ones((4, 3), np.float32)
    g = np.full((4, 3), 0.001, np.float32)
    g[0, 0] = np.nan
    g[1, 1] = np.inf
    out, _ = _apply({"k": jnp.asarray(g)}, {"k": jnp.asarray(w)}, 0.01)
    out = np.asarray(out["k"])
    assert not np.all(np.isfinite(out[:, 0])) and not np.all(np.isfinite(out[:, 1]))
    np.testing.assert_array_equal(out[:, 2], g[:, 2])


def test_apply_if_finite_downstream_skips_the_step_end_to_end():
    params = {"k": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    tx = optax.apply_if_finite(
        optax.chain(agc_optax.adaptive_grad_clip(0.01), optax.sgd(0.1)), max_consecutive_errors=5
    )
    state = tx.init(params)
    bad = {"k": jnp.ones((4, 3)).at[0, 0].set(jnp.inf), "b": jnp.ones(3)}
    updates, state = jax.jit(tx.update)(bad, state, params)
    assert int(state.notfinite_count) == 1
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    good = {"k": jnp.ones((4, 3)), "b": jnp.ones(3)}
    updates, state = jax.jit(tx.update)(good, state, params)
    assert int(state.notfinite_count) == 0
    assert np.any(np.asarray(updates["k"]) != 0)


# ----------------------------------------------------------------------------- stats


def test_stats_match_reference():
    rng = np.random.default_rng(3)
    w = {"x": rng.standard_normal((5, 6)), "y": rng.standard_normal((3, 3, 2, 4)), "h": np.ones(2)}
    g = {
        "x": rng.standard_normal((5, 6)) * 0.02,
        "y": rng.standard_normal((3, 3, 2, 4)) * 0.5,
        "h": np.ones(2) * 100,
    }
    w = {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}
    g = {k: jnp.asarray(v, jnp.float32) for k, v in g.items()}
    _, state = _apply(g, w, 0.05, exclude="^h$", stats=True)
    clipped, total, ratios = 0, 0, []
    for k, axes in (("x", (1,)), ("y", (3,))):
        _, clip, ratio = ref.agc(np.asarray(g[k]), np.asarray(w[k]), axes, 0.05, 1e-3)
        clipped += clip.sum()
        total += clip.size
        ratios.append(ratio.max())
    assert int(state.num_units) == total == 10
    np.testing.assert_allclose(state.clip_fraction, clipped / total, rtol=1e-6)
    np.testing.assert_allclose(state.max_ratio, max(ratios), rtol=1e-5)
    assert 0 < float(state.clip_fraction) < 1


def test_stats_readable_from_a_chain():
    params = {"k": jnp.ones((2, 2))}
    tx = optax.chain(agc_optax.adaptive_grad_clip(0.01, stats=True), optax.sgd(0.1))
    _, state = tx.update({"k": jnp.ones((2, 2))}, tx.init(params), params)
    assert float(optax.tree.get(state, "clip_fraction")) == 1.0
    assert int(optax.tree.get(state, "num_units")) == 2


# ----------------------------------------------------------------------------- bad input


def test_params_none_is_a_clear_error():
    tx = agc_optax.adaptive_grad_clip()
    params = {"k": jnp.ones((2, 2))}
    with pytest.raises(
        ValueError, match=r"needs the parameters: call `tx.update\(grads, state, params\)`"
    ):
        tx.update(params, tx.init(params), None)


def test_structure_mismatch_names_paths():
    tx = agc_optax.adaptive_grad_clip()
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"in params but not updates: `b`"):
        tx.update({"a": jnp.ones((2, 2))}, tx.init(params), params)
    with pytest.raises(ValueError, match=r"`a`: gradient shape \(2, 3\) differs"):
        tx.update({"a": jnp.ones((2, 3)), "b": jnp.ones(2)}, tx.init(params), params)


def test_non_float_leaf_is_a_clear_error_unless_excluded():
    params = {"w": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(TypeError, match=r"`step`: the parameter has dtype int32.*exclude="):
        agc_optax.adaptive_grad_clip().init(params)
    tx = agc_optax.adaptive_grad_clip(exclude="step")
    out, _ = tx.update(params, tx.init(params), params)
    assert out["step"] is params["step"]


def test_out_of_range_rule_is_a_clear_error_at_init():
    with pytest.raises(ValueError, match=r"`conv/kernel`: unit axes \(4,\) out of range"):
        agc_optax.adaptive_grad_clip(unit_axes=[("conv", (4,))]).init(
            {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}}
        )


@pytest.mark.parametrize("name, kw", [("clipping", {"clipping": -1.0}), ("eps", {"eps": np.nan})])
def test_bad_hyperparameters(name, kw):
    with pytest.raises(ValueError, match=f"`{name}` must be a (finite )?number >= 0"):
        agc_optax.adaptive_grad_clip(**kw)


@pytest.mark.parametrize("clipping", [float("inf"), jnp.array(jnp.inf)])
def test_infinite_clipping_never_clips(clipping):
    """+inf is the documented "off" threshold (the large-batch sweep injects it)."""
    params = {"k": jnp.ones((4, 3))}
    grads = {"k": jnp.full((4, 3), 1e6)}
    for tx in (
        agc_optax.adaptive_grad_clip(clipping, stats=True),
        optax.chain(agc_optax.sgd_agc(1.0, momentum=0, weight_decay=0, clipping=clipping)),
    ):
        out, state = tx.update(grads, tx.init(params), params)
        np.testing.assert_array_equal(np.abs(out["k"]), grads["k"])
        assert float(optax.tree.get(state, "clip_fraction", 0.0)) == 0.0


# ----------------------------------------------------------------------------- options


def _np_agc_pnorm(g, w, axes, clipping, eps, norm):
    red = ref.reduce_axes(g.ndim, axes)
    measure = (
        (lambda x: np.sum(np.abs(x), axis=red, keepdims=True))
        if norm == 1
        else (lambda x: np.max(np.abs(x), axis=red, keepdims=True))
    )
    g64, w64 = g.astype(np.float64), w.astype(np.float64)
    bound = clipping * np.maximum(measure(w64), eps)
    gn = measure(g64)
    return np.where(gn > bound, g64 * bound / np.where(gn > 0, gn, 1), g64)


@pytest.mark.parametrize("norm", [1, float("inf")])
def test_l1_and_linf_norms_match_reference(norm):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 3, 4, 6)).astype(np.float32)
    g = (rng.standard_normal((3, 3, 4, 6)) * 0.03).astype(np.float32)
    out, _ = _apply(
        {"conv": {"kernel": jnp.asarray(g)}}, {"conv": {"kernel": jnp.asarray(w)}}, 0.02, norm=norm
    )
    want = _np_agc_pnorm(g, w, (3,), 0.02, 1e-3, norm)
    assert not np.allclose(want, g)
    np.testing.assert_allclose(out["conv"]["kernel"], want, rtol=1e-5)
    np.testing.assert_allclose(
        agc_optax.unitwise_norm(jnp.asarray(g), (-1,), norm=norm).ravel(),
        np.linalg.norm(g.reshape(-1, 6).astype(np.float64), ord=norm, axis=0),
        rtol=1e-5,
    )


def test_layer_granularity_is_one_unit_per_leaf_and_keeps_exclusions():
    rng = np.random.default_rng(6)
    params = {"a": {"kernel": rng.standard_normal((5, 4))}, "head": {"kernel": np.ones((4, 2))}}
    grads = {
        "a": {"kernel": rng.standard_normal((5, 4)) * 0.05},
        "head": {"kernel": np.ones((4, 2))},
    }
    params, grads = (
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t) for t in (params, grads)
    )
    out, state = _apply(grads, params, 0.02, granularity="layer", exclude="head", stats=True)
    want = ref.agc(
        np.asarray(grads["a"]["kernel"]), np.asarray(params["a"]["kernel"]), (), 0.02, 1e-3
    )[0]
    np.testing.assert_allclose(out["a"]["kernel"], want, rtol=1e-6)
    np.testing.assert_array_equal(out["head"]["kernel"], grads["head"]["kernel"])
    assert int(state.num_units) == 1


def test_bad_options():
    with pytest.raises(ValueError, match="`norm` must be 1, 2 or float"):
        agc_optax.adaptive_grad_clip(norm=3)
    with pytest.raises(ValueError, match="`granularity` must be 'unit' or 'layer'"):
        agc_optax.adaptive_grad_clip(granularity="tensor")


@pytest.mark.parametrize(
    ("bad", "err", "words"),
    [
        ("(", ValueError, r"`exclude`: '\(' is not a valid regular expression"),
        (123, TypeError, r"`exclude` must be a regex.*got 123"),
    ],
)
def test_bad_exclude_fails_at_construction(bad, err, words):
    for make in (agc_optax.adaptive_grad_clip, agc_optax.adagc, agc_optax.zclip):
        with pytest.raises(err, match=words):
            make(exclude=bad)
    with pytest.raises(err, match=words):
        agc_optax.sgd_agc(0.1, exclude=bad)


def test_bad_unit_axes_regex_names_the_argument():
    tx = agc_optax.adaptive_grad_clip(unit_axes=[("[", (0,))])
    with pytest.raises(ValueError, match=r"`unit_axes`: '\[' is not a valid regular expression"):
        tx.init({"w": jnp.ones((2, 2))})


@pytest.mark.parametrize("make", ["adaptive_grad_clip", "sgd_agc", "adamw_agc"])
def test_unit_plan_is_built_once_per_tree(make):
    """Rules run once per leaf for a tree, not again at every update or trace."""
    calls = []

    def rule(path, leaf):
        calls.append(path)
        return (-1,) if np.ndim(leaf) >= 2 else ()

    kwargs = dict(unit_axes=rule, stats=True)
    tx = (
        agc_optax.adaptive_grad_clip(**kwargs)
        if make == "adaptive_grad_clip"
        else getattr(agc_optax, make)(0.1, **kwargs)
    )
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    grads = jax.tree.map(lambda x: x + 1.0, params)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    _, state = jax.jit(tx.update)(grads, state, params)
    assert sorted(calls) == ["dense/bias", "dense/kernel"]
    # The plan describe() shows is the one the transform used.
    plan = agc_optax.describe(params, rule)
    assert int(optax.tree.get(state, "num_units")) == plan.num_units == 5
    # A tree of another shape gets its own plan.
    bigger = {"dense": {"kernel": jnp.ones((3, 6)), "bias": jnp.zeros(6)}}
    tx.update(bigger, tx.init(bigger), bigger)
    assert len(calls) == 2 + 2 + 2


# optax's `axis=` keyword (the axes the norm reduces over), for code migrating from optax.
def _optax_axis_tree(shapes):
    keys = jax.random.split(jax.random.PRNGKey(3), 2 * len(shapes))
    params = {f"p{i}": jax.random.normal(keys[2 * i], s) for i, s in enumerate(shapes)}
    grads = {f"p{i}": 5 * jax.random.normal(keys[2 * i + 1], s) for i, s in enumerate(shapes)}
    return params, grads


@pytest.mark.parametrize(
    "axis, shapes",
    [
        (None, [(5,), (1, 7), (4, 6), (3, 4, 6), (3, 3, 4, 8), (2, 2, 2, 3, 4), ()]),
        (0, [(6, 4), (5,), (5, 3, 2)]),
        (-1, [(6, 4), (5,), (5, 3, 2)]),
        ((0, 1), [(6, 4, 3), (2, 3, 4, 5)]),
    ],
)
def test_axis_matches_optax(axis, shapes):
    params, grads = _optax_axis_tree(shapes)
    want, _ = optax.adaptive_grad_clip(0.05, 1e-3, axis).update(grads, None, params)
    tx = agc_optax.adaptive_grad_clip(0.05, 1e-3, axis)  # positional, as optax's
    got, _ = tx.update(grads, tx.init(params), params)
    got_kw, _ = agc_optax.adaptive_grad_clip(0.05, axis=axis).update(grads, None, params)
    leaves = (jax.tree.leaves(got), jax.tree.leaves(got_kw), jax.tree.leaves(want))
    for g, k, w in zip(*leaves, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(k))


def test_axis_under_inject_hyperparams():
    params, grads = _optax_axis_tree([(4, 6), (3, 3, 4, 8)])
    tx = optax.inject_hyperparams(agc_optax.adaptive_grad_clip, static_args=("axis",))(
        clipping=0.05, axis=(0,)
    )
    got, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    want, _ = optax.adaptive_grad_clip(0.05, 1e-3, (0,)).update(grads, None, params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)


def test_axis_errors():
    with pytest.raises(ValueError, match=r"Give `axis`.*or `unit_axes`.*not both"):
        agc_optax.adaptive_grad_clip(0.01, axis=0, unit_axes=[("w", (1,))])
    with pytest.raises(ValueError, match=r"`axis` and `granularity=\"layer\"`"):
        agc_optax.adaptive_grad_clip(0.01, axis=0, granularity="layer")
    with pytest.raises(TypeError, match=r"`axis` must be an int, a tuple of ints or None"):
        agc_optax.adaptive_grad_clip(0.01, axis="0")
    tx = agc_optax.adaptive_grad_clip(0.01, axis=2)
    with pytest.raises(ValueError, match=r"`w`: `axis=\(2,\)` is out of range for shape \(3, 4\)"):
        tx.init({"w": jnp.ones((3, 4))})
    with pytest.raises(ValueError, match=r"`w`: `axis=None` .* ranks 1 to 5"):
        agc_optax.adaptive_grad_clip(0.01, axis=None).init({"w": jnp.ones((2,) * 6)})

"""The fused recipes equal their optax chains; masks, schedules and state behave."""

import re

import chex
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

SHAPES = {
    "stem": {"conv": {"kernel": (3, 3, 3, 8), "bias": (8,), "gain": (8,)}},
    "blocks": {"0": {"conv0": {"kernel": (1, 1, 8, 16)}, "skip_gain": ()}},
    "embed": {"embedding": (10, 16)},
    "head": {"kernel": (16, 5), "bias": (5,)},
}


def _random_tree(seed, scale=1.0, dtype=jnp.float32):
    return ref.random_tree(SHAPES, seed, scale, dtype)


def _grads_seq(n, scale):
    return [_random_tree(10 + i, scale) for i in range(n)]


@settings(deadline=None, max_examples=8)
@given(
    momentum=st.sampled_from([0.0, 0.9]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 2e-5, 1e-2]),
    clipping=st.sampled_from([0.01, 0.1]),
    gscale=st.sampled_from([1e-3, 1.0]),
)
def test_sgd_agc_equals_optax_chain(momentum, nesterov, weight_decay, clipping, gscale):
    params = _random_tree(0)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10)
    ours = agc_optax.sgd_agc(
        schedule, momentum, nesterov, weight_decay, clipping, exclude=agc_optax.HEAD_PATTERN
    )
    chain = optax.chain(
        agc_optax.adaptive_grad_clip(clipping, exclude=agc_optax.HEAD_PATTERN),
        optax.add_decayed_weights(weight_decay, mask=agc_optax.weight_decay_mask),
        optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov),
    )
    grads = _grads_seq(4, gscale)
    a, pa, _ = ref.run_steps(ours, params, grads)
    b, pb, _ = ref.run_steps(chain, params, grads)
    for x, y in zip(a, b, strict=True):
        assert ref.max_rel_diff(x, y) <= 1e-6
    assert ref.max_rel_diff(pa, pb) <= 1e-6


@settings(deadline=None, max_examples=6)
@given(
    weight_decay=st.sampled_from([0.0, 1e-2]),
    clipping=st.sampled_from([0.01, 0.5]),
    eps_root=st.sampled_from([0.0, 1e-8]),
)
def test_adamw_agc_equals_optax_chain(weight_decay, clipping, eps_root):
    params = _random_tree(0)
    ours = agc_optax.adamw_agc(
        1e-3, weight_decay=weight_decay, clipping=clipping, eps_root=eps_root
    )
    chain = optax.chain(
        agc_optax.adaptive_grad_clip(clipping, 1e-3, exclude=agc_optax.HEAD_PATTERN),
        optax.adamw(
            1e-3, eps_root=eps_root, weight_decay=weight_decay, mask=agc_optax.weight_decay_mask
        ),
    )
    grads = _grads_seq(4, 0.1)
    a, pa, _ = ref.run_steps(ours, params, grads)
    b, pb, _ = ref.run_steps(chain, params, grads)
    for x, y in zip(a, b, strict=True):
        assert ref.max_rel_diff(x, y) <= 1e-6
    assert ref.max_rel_diff(pa, pb) <= 1e-6


def test_weight_decay_mask_spares_gains_and_biases():
    mask = agc_optax.weight_decay_mask(_random_tree(0))
    assert mask["stem"]["conv"] == {"kernel": True, "bias": False, "gain": False}
    assert mask["blocks"]["0"]["skip_gain"] is False
    assert mask["head"] == {"kernel": True, "bias": False}
    assert mask["embed"]["embedding"] is True


def test_sgd_agc_first_step_by_hand():
    params = {"w": {"kernel": jnp.array([[3.0], [4.0]])}, "w2": {"bias": jnp.array([1.0])}}
    grads = {"w": {"kernel": jnp.array([[30.0], [40.0]])}, "w2": {"bias": jnp.array([0.001])}}
    tx = agc_optax.sgd_agc(0.5, momentum=0.9, nesterov=True, weight_decay=0.1, clipping=0.01)
    updates, state = tx.update(grads, tx.init(params), params)
    # kernel: ||g|| = 50 > 0.01 * 5 -> g' = g * 0.05/50 = [0.03, 0.04]; + 0.1 w = [0.33, 0.44];
    # momentum buffer = g'; Nesterov step = (1 + 0.9) g'; update = -0.5 * 1.9 * g'.
    np.testing.assert_allclose(updates["w"]["kernel"][:, 0], [-0.3135, -0.418], rtol=1e-6)
    # bias: unclipped (0.001 < 0.01 * 1), no weight decay.
    np.testing.assert_allclose(updates["w2"]["bias"], [-0.5 * 1.9 * 0.001], rtol=1e-6)
    np.testing.assert_allclose(state.momentum["w"]["kernel"][:, 0], [0.33, 0.44], rtol=1e-6)
    assert int(state.count) == 1


def test_stats_and_bf16():
    params = _random_tree(0, dtype=jnp.bfloat16)
    grads = _random_tree(1, dtype=jnp.bfloat16)
    for tx in (agc_optax.sgd_agc(0.1, stats=True), agc_optax.adamw_agc(1e-3, stats=True)):
        updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
        # Optimizer states keep their dtype, so donated buffers and scan carries stay valid.
        init = tx.init(params)
        assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(lambda x: x.dtype, init)
        assert 0 < float(optax.tree.get(state, "clip_fraction")) <= 1
        assert int(optax.tree.get(state, "num_units")) > 0


def test_needs_params():
    tx = agc_optax.sgd_agc(0.1)
    params = _random_tree(0)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, tx.init(params), None)


FSDP_SCRIPT = """
from tests.multidevice import assert_no_leaf_gathered
import numpy as np, jax.numpy as jnp, optax, agc_optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

mesh = Mesh(np.array(jax.devices()), ("fsdp",))
rng = np.random.default_rng(0)
shapes = {"conv": {"kernel": (3, 3, 8, 64), "bias": (64,)}, "dense": {"kernel": (16, 64)},
          "head": {"kernel": (64, 8)}}
params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))
grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
# FSDP along each kernel's unit (output) axis; vectors replicated.
def spec(p):
    return P(*([None] * (p.ndim - 1) + ["fsdp"])) if p.ndim > 1 else P()
shard = lambda t: jax.tree.map(
    lambda x: jax.device_put(np.asarray(x), NamedSharding(mesh, spec(x))), t)
for tx in (agc_optax.sgd_agc(0.1, stats=True), agc_optax.adamw_agc(1e-3, clipping=0.05)):
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s
    plain_p, plain_s = jax.jit(step)(params, tx.init(params), grads)
    sp = shard(params)
    ss = shard(tx.init(params))
    jitted = jax.jit(step, donate_argnums=(0, 1))
    hlo = jitted.lower(sp, ss, shard(grads)).compile().as_text()
    new_p, new_s = jitted(sp, ss, shard(grads))
    for a, b in zip(jax.tree.leaves((plain_p, plain_s)), jax.tree.leaves((new_p, new_s))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    for leaf in jax.tree.leaves(new_p):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec(leaf)), leaf.ndim)
    assert_no_leaf_gathered(hlo)
print("FSDP_OK")
"""


def test_fused_step_with_fsdp_sharded_params_and_state():
    assert "FSDP_OK" in run_on_cpu_devices(FSDP_SCRIPT)


@pytest.mark.parametrize(
    "factory, hyper",
    [
        (
            agc_optax.sgd_agc,
            dict(learning_rate=0.1, momentum=0.9, weight_decay=1e-2, clipping=0.05),
        ),
        (agc_optax.sgd_agc, dict(learning_rate=0.1, momentum=0.0, weight_decay=0.0)),
        (agc_optax.adamw_agc, dict(learning_rate=1e-2, weight_decay=1e-2, clipping=0.05)),
        (agc_optax.adamw_agc, dict(learning_rate=1e-2, weight_decay=0.0, b1=0.8)),
    ],
)
def test_inject_hyperparams_traces_every_numeric_argument(factory, hyper):
    # inject_hyperparams hands every numeric argument (defaults included) to init and update as
    # arrays, traced under jit: zero momentum / weight decay must not be tested in Python.
    params = _random_tree(0)
    grads = _grads_seq(3, 1.0)
    injected = optax.inject_hyperparams(factory)(**hyper)
    a, pa, state = ref.run_steps(injected, params, grads)
    assert {"learning_rate", "clipping", "weight_decay"} <= set(state.hyperparams)
    b, pb, _ = ref.run_steps(factory(**hyper), params, grads)
    # float32 hyperparameter arrays round differently from Python floats: optax.adamw itself
    # differs by 7e-6 between its injected and plain forms on these trees.
    for x, y in zip(a, b, strict=True):
        assert ref.max_rel_diff(x, y) <= 2e-5
    assert ref.max_rel_diff(pa, pb) <= 1e-6
    # The injected learning rate is live: set to zero, the next update is zero.
    state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
    updates, _ = jax.jit(injected.update)(grads[0], state, pa)
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
    "make",
    [
        lambda: agc_optax.sgd_agc(0.1, nesterov=jnp.asarray(True)),
        lambda: agc_optax.sgd_agc(0.1, stats=jnp.asarray(True)),
        lambda: agc_optax.adamw_agc(0.1, stats=jnp.asarray(False)),
        lambda: agc_optax.adaptive_grad_clip(0.1, stats=jnp.asarray(True)),
    ],
)
def test_array_valued_flags_get_a_clear_error(make):
    with pytest.raises(TypeError, match=r"must be a Python bool.*static_args"):
        make()


def _with_non_finite(tree):
    tree = jax.tree.map(jnp.asarray, tree)
    tree["stem"]["conv"]["kernel"] = tree["stem"]["conv"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
    tree["embed"]["embedding"] = tree["embed"]["embedding"].at[3, 2].set(jnp.inf)
    return tree


NON_FINITE_CASES = [
    (
        lambda: agc_optax.sgd_agc(0.1, weight_decay=1e-2),
        lambda: optax.chain(
            agc_optax.adaptive_grad_clip(0.01, exclude=agc_optax.HEAD_PATTERN),
            optax.add_decayed_weights(1e-2, mask=agc_optax.weight_decay_mask),
            optax.sgd(0.1, momentum=0.9, nesterov=True),
        ),
    ),
    (
        lambda: agc_optax.adamw_agc(1e-2),
        lambda: optax.chain(
            agc_optax.adaptive_grad_clip(0.01, exclude=agc_optax.HEAD_PATTERN),
            optax.adamw(1e-2, weight_decay=1e-4, mask=agc_optax.weight_decay_mask),
        ),
    ),
]


@pytest.mark.parametrize("fused, chain", NON_FINITE_CASES)
def test_non_finite_gradients_behave_like_the_chain(fused, chain):
    # A NaN entry passes AGC unchanged; an Inf entry makes its unit's scale 0, so it turns into
    # NaN while the rest of its unit becomes 0. Either way only those entries of the update (and
    # of the momentum / moments) are non-finite, exactly as in the optax chain.
    params = _random_tree(0)
    grads = _with_non_finite(_random_tree(1))
    ours, state = jax.jit(fused().update)(grads, fused().init(params), params)
    theirs, _ = jax.jit(chain().update)(grads, chain().init(params), params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
    assert np.isnan(ours["stem"]["conv"]["kernel"][0, 0, 0, 0])
    assert np.isnan(ours["embed"]["embedding"][3, 2])
    finite = np.isfinite(np.asarray(ours["embed"]["embedding"]))
    assert finite.sum() == finite.size - 1
    bad = sum(int((~np.isfinite(np.asarray(x))).sum()) for x in jax.tree.leaves(state))
    assert bad >= 2  # the optimizer state carries them too: skip such steps (next test)


@pytest.mark.parametrize("fused, _", NON_FINITE_CASES)
def test_apply_if_finite_skips_the_step_and_keeps_the_state(fused, _):
    params = _random_tree(0)
    safe = optax.apply_if_finite(fused(), max_consecutive_errors=3)
    state = safe.init(params)
    updates, skipped = jax.jit(safe.update)(_with_non_finite(_random_tree(1)), state, params)
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
    assert int(skipped.notfinite_count) == 1 and not bool(skipped.last_finite)
    chex.assert_trees_all_equal(skipped.inner_state, state.inner_state)
    # The next, finite step is the unwrapped optimizer's first step.
    clean = _random_tree(2)
    got, _ = jax.jit(safe.update)(clean, skipped, params)
    want, _ = fused().update(clean, fused().init(params), params)
    assert ref.max_rel_diff(got, want) <= 1e-6


GUARDED = {
    "sgd_agc": lambda **kw: agc_optax.sgd_agc(0.1, weight_decay=1e-2, stats=True, **kw),
    "sgd_agc_plain": lambda **kw: agc_optax.sgd_agc(0.1, momentum=0.0, nesterov=False, **kw),
    "adamw_agc": lambda **kw: agc_optax.adamw_agc(1e-2, clipping=0.05, stats=True, **kw),
}


@pytest.mark.parametrize("name", GUARDED)
def test_skip_nonfinite_skips_inside_the_update_and_otherwise_changes_nothing(name):
    # Reference: the unguarded optimizer run on the finite steps only. Bad steps, each caught
    # by a different part of the check: a NaN in a clipped gradient, an Inf in the gradient of
    # the leaf AGC leaves alone (head/kernel), a NaN weight (then the weights are restored),
    # and a NaN loss passed as `value` with finite gradients.
    guarded, plain = GUARDED[name](skip_nonfinite=True), GUARDED[name]()
    params = _random_tree(0)
    clean = _grads_seq(3, 1.0)
    nan, inf, loss = jnp.float32(jnp.nan), jnp.float32(jnp.inf), jnp.float32(1.5)
    bad = [
        (
            ref.with_entry(clean[0], ("blocks", "0", "conv0", "kernel"), (0, 0, 1, 2), nan),
            params,
            loss,
        ),
        (ref.with_entry(clean[0], ("head", "kernel"), (1, 1), inf), params, loss),
        (clean[0], ref.with_entry(params, ("stem", "conv", "gain"), 3, nan), loss),
        (clean[0], params, nan),
    ]
    update = jax.jit(lambda g, s, p, v: guarded.update(g, s, p, value=v))
    update_plain = jax.jit(plain.update)
    g_state, p_state = guarded.init(params), plain.init(params)
    for i, grads in enumerate(clean):
        if i == 1:
            for g, w, value in bad:
                before = g_state
                updates, g_state = update(g, g_state, w, value)
                assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
                assert not bool(g_state.guard.last_finite)
                assert int(g_state.guard.total_notfinite) == int(before.guard.total_notfinite) + 1
                chex.assert_trees_all_equal(
                    g_state._replace(agc=0, guard=0), before._replace(agc=0, guard=0)
                )
        updates, g_state = update(grads, g_state, params, loss)
        want, p_state = update_plain(grads, p_state, params)
        guard = g_state.guard
        assert bool(guard.last_finite)
        if name == "adamw_agc":  # unguarded, XLA fuses (1 - b1) * g + b1 * mu into an FMA
            got = (updates, g_state._replace(guard=optax.EmptyState()))
            assert ref.max_rel_diff(got, (want, p_state)) <= 1e-6
            g_state = p_state._replace(guard=guard)  # go on from the same state
        else:  # bit for bit
            chex.assert_trees_all_equal((updates, g_state), (want, p_state._replace(guard=guard)))
    assert int(g_state.guard.total_notfinite) == len(bad)


def test_skip_nonfinite_statistics_describe_the_skipped_step():
    tx = agc_optax.sgd_agc(0.1, stats=True, skip_nonfinite=True)
    params = _random_tree(0)
    grads = ref.with_entry(
        _random_tree(1), ("blocks", "0", "conv0", "kernel"), (0, 0, 1, 2), jnp.nan
    )
    _, state = tx.update(grads, tx.init(params), params)
    assert np.isnan(float(state.agc.max_ratio)) and not bool(state.guard.last_finite)
    assert optax.tree.get(state, "total_notfinite") == 1  # as with optax.apply_if_finite


def test_skip_nonfinite_is_a_static_flag():
    with pytest.raises(TypeError, match="skip_nonfinite"):
        agc_optax.sgd_agc(0.1, skip_nonfinite=jnp.array(True))
    with pytest.raises(TypeError, match="skip_nonfinite"):
        agc_optax.adamw_agc(1e-3, skip_nonfinite=jnp.array(True))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: agc_optax.sgd_agc(0.1, momentum=-0.9), r"`momentum` must be a finite number >= 0"),
        (lambda: agc_optax.sgd_agc(0.1, weight_decay=float("nan")), r"`weight_decay` must be"),
        (lambda: agc_optax.sgd_agc(0.1, clipping=-0.01), r"`clipping` must be"),
        (lambda: agc_optax.adamw_agc(1e-3, b1=1.0), r"`b1` must be in \[0, 1\).*divide by zero"),
        (lambda: agc_optax.adamw_agc(1e-3, b2=1.5), r"`b2` must be in \[0, 1\)"),
        (lambda: agc_optax.adamw_agc(1e-3, eps=-1e-8), r"`eps` must be"),
        (lambda: agc_optax.adamw_agc(1e-3, agc_eps=float("inf")), r"`agc_eps` must be"),
    ],
)
def test_bad_hyperparameters_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_state_holds_where_each_clipped_leaf_starts_in_the_unit_vector():
    params = _random_tree(0)
    # Leaf order: conv0 kernel (16 output units), skip_gain (1), embedding (10 rows),
    # head/bias (1), head/kernel (excluded: no offset), stem bias, gain (1 each), kernel.
    want = [0, 16, 17, 27, 28, 29, 30]
    for tx in (
        agc_optax.sgd_agc(0.1),
        agc_optax.adamw_agc(1e-3),
        agc_optax.adaptive_grad_clip(0.01, exclude=agc_optax.HEAD_PATTERN),
        agc_optax.adaptive_grad_clip(0.01, exclude=agc_optax.HEAD_PATTERN, stats=True),
    ):
        offsets = tx.init(params).unit_offsets
        assert [int(o) for o in offsets] == want
        assert all(o.dtype == jnp.int32 and o.shape == () for o in offsets)


def _update_and_apply(tx):
    """``(params, state, grads) -> (new params, new state)``: one step of ``tx``."""

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step


def _fused_bodies(hlo_text):
    """Distinct fused computations of an optimized HLO module, names stripped: XLA:CPU
    generates one kernel per distinct body."""
    bodies = set()
    for block in hlo_text.split("\n\n"):
        head, _, body = block.strip().partition("\n")
        if "fused" in head.split("(")[0] or "fusion" in head.split("(")[0]:
            body = re.sub(r"metadata=\{[^}]*\}", "", body)
            bodies.add(re.sub(r"%[\w.\-]+", "%x", body))
    return bodies


@pytest.mark.parametrize(
    "make",
    [
        lambda: agc_optax.sgd_agc(0.1),
        lambda: agc_optax.adamw_agc(1e-3),
        lambda: agc_optax.adaptive_grad_clip(0.01),
    ],
)
def test_leaves_of_one_shape_share_their_update_kernels(make):
    tx = make()
    step = _update_and_apply(tx)

    def kernels(num_leaves, constant_offsets=False):
        params = {
            f"conv{i}": {"kernel": jnp.full((3, 3, 4, 8), i + 1.0)} for i in range(num_leaves)
        }
        state = tx.init(params)
        if constant_offsets:  # a state without offsets: each leaf slices at a constant
            state = state._replace(unit_offsets=())
        return len(_fused_bodies(jax.jit(step).lower(params, state, params).compile().as_text()))

    # The joined norms' kernels depend on the leaf count too; from 6 leaves on, they do not.
    assert kernels(12) == kernels(6)
    assert kernels(12, constant_offsets=True) >= kernels(6, constant_offsets=True) + 6  # control


@pytest.mark.parametrize(
    "make",
    [
        lambda: agc_optax.sgd_agc(0.1, stats=True),
        lambda: agc_optax.adamw_agc(1e-3, stats=True),
        lambda: agc_optax.adaptive_grad_clip(0.01, stats=True),
    ],
)
@pytest.mark.parametrize("mixed_dtypes", [False, True])
def test_runtime_offsets_give_exactly_the_constant_slices_step(make, mixed_dtypes):
    tx = make()
    params = _random_tree(0)
    if mixed_dtypes:  # two norm dtypes: two unit vectors, then each leaf slices at a constant
        params["embed"]["embedding"] = params["embed"]["embedding"].astype(jnp.bfloat16)
    grads = jax.tree.map(lambda p: (3.0 * p).astype(p.dtype), params)

    step = jax.jit(_update_and_apply(tx))

    state = tx.init(params)
    got = step(params, state, grads)
    want = step(params, state._replace(unit_offsets=()), grads)
    chex.assert_trees_all_equal(got[0], want[0])
    chex.assert_trees_all_equal(got[1]._replace(unit_offsets=()), want[1])
    assert float(optax.tree.get(got[1], "clip_fraction")) > 0  # the scales were used


@pytest.mark.parametrize(
    "make",
    [
        lambda: agc_optax.sgd_agc(0.1, stats=True, skip_nonfinite=True),
        lambda: agc_optax.adamw_agc(1e-3, stats=True),
        lambda: agc_optax.adaptive_grad_clip(0.01, stats=True),
    ],
)
def test_a_donated_state_keeps_its_unit_offsets_in_place(make):
    # jit drops inputs the step does not read (the old statistics) and pairs the donated
    # inputs left with same-shaped outputs in order; a fresh `num_units` output once shifted
    # every offset onto its neighbour's buffer, and XLA copied each offset every step.
    tx, params = make(), _random_tree(0)
    step = _update_and_apply(tx)

    state = tx.init(params)
    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()
    copied = re.findall(r"copy\(%([\w.]+)\)", hlo)
    assert len(state.unit_offsets) >= 7
    assert not [name for name in copied if "unit_offsets" in name or "num_units" in name]
    got = jax.jit(step)(params, state, params)[1]
    assert int(optax.tree.get(got, "num_units")) == int(optax.tree.get(state, "num_units"))


def test_a_state_made_for_other_parameters_is_named():
    params = _random_tree(0)
    state = agc_optax.sgd_agc(0.1, exclude=r"head/").init(params)  # head/bias not clipped
    with pytest.raises(ValueError, match=r"unit offsets for 6 clipped leaves.*have 7.*tx.init"):
        agc_optax.sgd_agc(0.1).update(params, state, params)


def test_adaptive_grad_clip_also_takes_an_empty_state():
    # A state made by hand (or by optax's own adaptive_grad_clip) slices at constant offsets.
    tx, params = agc_optax.adaptive_grad_clip(0.01), _random_tree(0)
    grads = jax.tree.map(lambda p: 3.0 * p, params)
    want, _ = tx.update(grads, tx.init(params), params)
    got, state = tx.update(grads, optax.EmptyState(), params)
    chex.assert_trees_all_equal(got, want)
    assert state == optax.EmptyState()

"""adaptive_grad_clip inside optax combinators, nnx.Optimizer, jit, pmap and a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import agc_optax

from . import agc_reference as ref
from .multidevice import run_on_cpu_devices


def _tree(seed=0, gscale=0.2):
    rng = np.random.default_rng(seed)
    shapes = {"conv": {"kernel": (3, 3, 4, 8), "bias": (8,)}, "head": {"kernel": (8, 5)}}
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape) * gscale, p.dtype), params
    )
    return params, grads


def _reference(grads, params, clipping, eps=1e-3, skip=()):
    out = {}
    for mod, leaves in grads.items():
        out[mod] = {}
        for name, g in leaves.items():
            path = f"{mod}/{name}"
            axes = agc_optax.infer_unit_axes(path, g.shape)
            w = np.asarray(params[mod][name])
            out[mod][name] = (
                np.asarray(g) if path in skip else ref.agc(np.asarray(g), w, axes, clipping, eps)[0]
            )
    return out


def _close(a, b, rtol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-9), a, b)


def test_chain_with_sgd():
    params, grads = _tree()
    tx = optax.chain(agc_optax.adaptive_grad_clip(0.01), optax.scale(-0.5))
    updates, _ = tx.update(grads, tx.init(params), params)
    want = jax.tree.map(lambda x: -0.5 * x, _reference(grads, params, 0.01))
    _close(updates, want)


def test_masked_and_partition():
    params, grads = _tree()
    mask = {"conv": {"kernel": True, "bias": True}, "head": {"kernel": False}}
    tx = optax.masked(agc_optax.adaptive_grad_clip(0.01), mask)
    updates, _ = tx.update(grads, tx.init(params), params)
    _close(updates, _reference(grads, params, 0.01, skip={"head/kernel"}))

    labels = {"conv": {"kernel": "agc", "bias": "agc"}, "head": {"kernel": "plain"}}
    tx = optax.partition(
        {"agc": agc_optax.adaptive_grad_clip(0.01), "plain": optax.identity()}, labels
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    _close(updates, _reference(grads, params, 0.01, skip={"head/kernel"}))


def test_multisteps_clips_the_averaged_gradient():
    params, grads = _tree()
    grads2 = jax.tree.map(lambda g: -0.5 * g, grads)
    tx = optax.MultiSteps(agc_optax.adaptive_grad_clip(0.01), every_k_schedule=2)
    state = tx.init(params)
    u1, state = tx.update(grads, state, params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u1))
    u2, state = tx.update(grads2, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, grads, grads2)
    _close(u2, _reference(mean, params, 0.01), rtol=1e-5)


def test_inject_hyperparams_schedules_clipping_under_jit():
    params, grads = _tree()
    tx = optax.inject_hyperparams(
        agc_optax.adaptive_grad_clip, static_args=("unit_axes", "exclude", "stats")
    )(clipping=optax.linear_schedule(0.01, 0.05, 4), eps=1e-3, exclude="head", stats=True)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(3):
        updates, state = step(grads, state, params)
        clipping = 0.01 + 0.01 * i
        _close(updates, _reference(grads, params, clipping, skip={"head/kernel"}), rtol=1e-5)
    assert float(state.hyperparams["clipping"]) == pytest.approx(0.03)
    assert 0 < float(optax.tree.get(state, "clip_fraction")) <= 1


def test_sgd_agc_with_schedule_matches_manual_recipe():
    params, grads = _tree()
    schedule = optax.cosine_decay_schedule(0.1, 10)
    tx = agc_optax.sgd_agc(schedule, weight_decay=1e-2, clipping=0.01)
    state = tx.init(params)
    u, state = jax.jit(tx.update)(grads, state, params)
    # Step 1 by hand: AGC (head kernel excluded), + wd except biases, momentum buffer = g,
    # Nesterov update = -lr * (g + 0.9 * g).
    clipped = _reference(grads, params, 0.01, skip={"head/kernel"})
    for mod, name in (("conv", "kernel"), ("conv", "bias"), ("head", "kernel")):
        g = clipped[mod][name] + (0 if name == "bias" else 1e-2 * np.asarray(params[mod][name]))
        np.testing.assert_allclose(u[mod][name], -0.1 * 1.9 * g, rtol=1e-5, atol=1e-8)


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.mean(nnx.relu(self.conv(x)), axis=(1, 2)))


def test_nnx_optimizer():
    model = _Tiny(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 3)), jnp.float32)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt = nnx.Optimizer(
        model,
        optax.chain(agc_optax.adaptive_grad_clip(0.01, stats=True), optax.sgd(1.0)),
        wrt=nnx.Param,
    )
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)

    @nnx.jit
    def step(model, opt, grads):
        opt.update(model, grads)

    step(model, opt, grads)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    g = nnx.to_pure_dict(grads)
    want = _reference(g, before, 0.01)
    delta = jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), after, before)
    _close(delta, want, rtol=1e-4)
    assert float(optax.tree.get(opt.opt_state, "num_units")) == 4 + 1 + 2 + 1


def test_pmap_on_available_devices():
    params, grads = _tree()
    n = jax.local_device_count()
    tx = agc_optax.adaptive_grad_clip(0.01)
    rep = lambda t: jax.tree.map(lambda x: jnp.stack([x] * n), t)
    out, _ = jax.pmap(tx.update)(rep(grads), rep(tx.init(params)), rep(params))
    _close(jax.tree.map(lambda x: x[0], out), _reference(grads, params, 0.01))


SHARDED_SCRIPT = """
grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
tx = agc_optax.adaptive_grad_clip(0.01, stats=True)
state = tx.init(params)
plain, _ = jax.jit(tx.update)(grads, state, params)
step = jax.jit(tx.update)
sharded, sstate = step(shard(grads), state, shard(params))
assert_same_values_and_shardings(plain, sharded)
assert_no_gather(step, shard(grads), state, shard(params))
# pmap over the 8 devices, a different gradient on each.
many = jax.tree.map(lambda g: jnp.stack([g * (i + 1) for i in range(8)]), grads)
rep = lambda t: jax.tree.map(lambda x: jnp.stack([x] * 8), t)
pout, _ = jax.pmap(tx.update)(many, rep(state), rep(params))
for i in range(8):
    one, _ = jax.jit(tx.update)(jax.tree.map(lambda g: g * (i + 1), grads), state, params)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(pout)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b[i]), rtol=1e-6, atol=1e-9)
print("SHARDED_OK", len(jax.devices()))
"""


def test_sharded_and_pmapped_over_8_cpu_devices():
    assert "SHARDED_OK 8" in run_on_cpu_devices(SHARDED_SCRIPT, sharded_tree=True)

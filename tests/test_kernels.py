"""The Pallas path of sgd_agc (interpret mode on CPU) equals the XLA path and the optax chain."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import agc_optax
from agc_optax import kernels
from agc_optax._norms import squared_unit_norms
from agc_optax._plan import UnitInfo
from agc_optax.kernels import _sgd_agc_pallas as sgd_agc_pallas
from agc_optax.optimizers import _sgd_elementwise

from . import agc_reference as ref

# Small leaves must take the kernel here; interpret mode is slow, so shapes stay small.
SHAPES = {
    # 45 rows, 24 units: no row or column count divides the (16, 8) test blocks.
    "stem": {"conv": {"kernel": (3, 3, 5, 24), "bias": (24,), "gain": (24,)}},
    # 300 rows: with the GPU blocks, two phase-1 and five phase-2 row blocks, the last partial.
    "blocks": {"0": {"conv0": {"kernel": (1, 1, 300, 40)}, "skip_gain": ()}},
    # Units on axes (-2, -1) and (0,): not the kernel's layout, these fall back to XLA.
    "attn": {"query": {"kernel": (16, 2, 8)}},
    "embed": {"embedding": (10, 16)},
    "head": {"kernel": (16, 5), "bias": (5,)},
}
KERNEL_LEAVES = 2  # stem/conv/kernel, blocks/0/conv0/kernel


def _random_tree(seed, scale=1.0, dtype=jnp.float32, shapes=SHAPES):
    return ref.random_tree(shapes, seed, scale, dtype)


@pytest.fixture
def small_leaves(monkeypatch):
    """Lets every leaf of SHAPES with units last take the kernel."""
    monkeypatch.setattr(kernels, "MIN_SIZE", 1)


def _count_pallas_calls(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    return str(jaxpr).count("pallas_call")


# --------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize(
    ("rows", "cols", "block_rows", "block_cols", "dtype"),
    [
        (45, 24, 16, 8, jnp.float32),  # partial last row block, and 3 column blocks
        (45, 20, 16, 8, jnp.float32),  # partial last column block too
        (64, 32, 16, 32, jnp.bfloat16),
        (7, 3, None, None, jnp.float16),  # default blocks bigger than the array
    ],
)
def test_column_sums_of_squares(rows, cols, block_rows, block_cols, dtype):
    rng = np.random.default_rng(1)
    g = jnp.asarray(rng.standard_normal((rows, cols)), dtype)
    w = jnp.asarray(rng.standard_normal((rows, cols)), dtype)
    gsq, wsq = sgd_agc_pallas.column_sums_of_squares(g, w, block_rows, block_cols)
    assert gsq.shape == (cols,) and gsq.dtype == jnp.float32
    np.testing.assert_allclose(gsq, squared_unit_norms(g, (1,))[0], rtol=1e-6)
    np.testing.assert_allclose(wsq, squared_unit_norms(w, (1,))[0], rtol=1e-6)


@pytest.mark.parametrize(
    ("momentum", "nesterov", "decay", "apply", "dtype"),
    [
        (0.9, True, True, False, jnp.float32),
        (0.9, False, False, False, jnp.float32),
        (0.0, False, True, False, jnp.float32),
        (0.9, True, False, True, jnp.float32),
        (0.9, True, True, True, jnp.bfloat16),
    ],
)
def test_fused_update_is_leaf_update(momentum, nesterov, decay, apply, dtype):
    rng = np.random.default_rng(2)
    g, w, m = (jnp.asarray(rng.standard_normal((45, 20)), dtype) for _ in range(3))
    s = jnp.asarray(rng.uniform(size=(1, 20)), jnp.float32)
    hyper = dict(momentum=momentum, nesterov=nesterov, weight_decay=1e-2)
    elementwise = functools.partial(_sgd_elementwise, **hyper)
    m = m if momentum else None
    got = sgd_agc_pallas.fused_update(
        g,
        w,
        s,
        m,
        -0.1,
        elementwise=elementwise,
        decay=decay,
        apply=apply,
        block_rows=16,
        block_cols=8,
    )

    def reference(g, w, s, m):
        u, m_next = elementwise(g, w if decay else None, s, m, -0.1)
        return (optax.apply_updates(w, u) if apply else u), m_next

    want = jax.jit(reference)(g, w, s, m)
    if not momentum:
        assert got[1] is None and want[1] is None
        got, want = got[0], want[0]
    assert ref.max_rel_diff(got, want) <= (1e-6 if dtype == jnp.float32 else 1e-2)


def test_fused_update_needs_w():
    x = jnp.zeros((8, 8))
    elementwise = functools.partial(
        _sgd_elementwise, momentum=0.9, nesterov=True, weight_decay=1e-2
    )
    with pytest.raises(ValueError, match="needs `w`"):
        sgd_agc_pallas.fused_update(x, None, jnp.ones((1, 8)), x, -0.1, elementwise=elementwise)


def _row(shape, unit_axes):
    return UnitInfo("k", shape, "float32", unit_axes, 0, unit_axes is None)


def test_eligible():
    x = jnp.zeros((3, 3, 8, 16))
    eligible = sgd_agc_pallas.eligible
    assert eligible(_row(x.shape, (3,)), x, x, x, min_size=1)
    assert eligible(_row(x.shape, (3,)), x, x, None, min_size=1)
    assert not eligible(_row(x.shape, (3,)), x, x, x)  # smaller than MIN_SIZE
    assert not eligible(_row(x.shape, (2, 3)), x, x, x, min_size=1)
    assert not eligible(_row(x.shape, (0,)), x, x, x, min_size=1)
    assert not eligible(_row(x.shape, None), x, x, x, min_size=1)
    assert not eligible(_row((16,), (0,)), jnp.zeros(16), jnp.zeros(16), None, min_size=1)
    assert not eligible(_row(x.shape, (3,)), x.astype(jnp.int32), x, x, min_size=1)
    assert not eligible(_row(x.shape, (3,)), x, x, jnp.zeros((3, 3, 8, 15)), min_size=1)


# --------------------------------------------------------------------------- the whole step


@pytest.mark.parametrize(
    ("momentum", "nesterov", "weight_decay", "stats", "blocks"),
    [
        (0.9, True, 1e-2, True, "gpu"),
        (0.9, False, 2e-5, False, "interpret"),
        (0.0, False, 1e-2, False, "tpu"),
    ],
)
def test_pallas_equals_xla_and_optax_chain(
    small_leaves, monkeypatch, momentum, nesterov, weight_decay, stats, blocks
):
    # Each backend's default block shapes, still run in interpret mode.
    default_blocks = sgd_agc_pallas.default_blocks
    monkeypatch.setattr(
        sgd_agc_pallas,
        "default_blocks",
        lambda rows, cols, _=None: default_blocks(rows, cols, blocks),
    )
    params = _random_tree(0)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10)
    common = dict(
        learning_rate=schedule,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        clipping=0.05,
        stats=stats,
    )
    pallas = agc_optax.sgd_agc(**common, implementation="pallas")
    xla = agc_optax.sgd_agc(**common, implementation="xla")
    chain = optax.chain(
        agc_optax.adaptive_grad_clip(0.05, exclude=agc_optax.HEAD_PATTERN, stats=stats),
        optax.add_decayed_weights(weight_decay, mask=agc_optax.weight_decay_mask),
        optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov),
    )
    # Mixed scales: some units clipped, some not.
    grads = [_random_tree(10 + i, scale) for i, scale in enumerate((1e-3, 1.0, 0.05))]
    state = pallas.init(params)
    assert _count_pallas_calls(pallas.update, grads[0], state, params) == 2 * KERNEL_LEAVES
    a, pa, sa = ref.run_steps(pallas, params, grads)
    b, pb, sb = ref.run_steps(xla, params, grads)
    c, pc, sc = ref.run_steps(chain, params, grads)
    for x, y, z in zip(a, b, c, strict=True):
        assert ref.max_rel_diff(x, y) <= 1e-6
        assert ref.max_rel_diff(x, z) <= 1e-6
    assert ref.max_rel_diff(pa, pb) <= 1e-6
    assert ref.max_rel_diff(pa, pc) <= 1e-6
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    if momentum:
        assert ref.max_rel_diff(sa.momentum, sb.momentum) <= 1e-6
    if stats:
        for name in ("clip_fraction", "max_ratio", "num_units"):
            got, want = optax.tree.get(sa, name), optax.tree.get(sb, name)
            np.testing.assert_allclose(got, want, rtol=1e-6)
            np.testing.assert_allclose(got, optax.tree.get(sc, name), rtol=1e-6)
        assert 0 < float(sa.agc.clip_fraction) < 1


def test_pallas_bf16_matches_xla(small_leaves):
    params = _random_tree(0, dtype=jnp.bfloat16)
    grads = [_random_tree(10 + i, 0.05, jnp.bfloat16) for i in range(2)]
    a, pa, sa = ref.run_steps(
        agc_optax.sgd_agc(0.1, clipping=0.05, implementation="pallas"), params, grads
    )
    b, pb, sb = ref.run_steps(
        agc_optax.sgd_agc(0.1, clipping=0.05, implementation="xla"), params, grads
    )
    assert jax.tree.map(lambda x: x.dtype, sa.momentum) == jax.tree.map(
        lambda x: x.dtype, sb.momentum
    )
    # The norms sum in a different order, which can move a bf16 rounding by one ulp (2**-8).
    for x, y in zip(a, b, strict=True):
        assert ref.max_rel_diff(x, y) <= 2**-7
    # The momentum buffers stay bf16 (as in the optax chain), so they carry the same rounding.
    assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(sa.momentum))
    assert ref.max_rel_diff(sa.momentum, sb.momentum) <= 2**-7


def test_pallas_jit_with_donation(small_leaves):
    params = _random_tree(0)
    tx = agc_optax.sgd_agc(0.1, clipping=0.05, implementation="pallas")
    ref_tx = agc_optax.sgd_agc(0.1, clipping=0.05)
    grads = _random_tree(3, 0.1)

    def step(tx):
        def go(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return jax.jit(go, donate_argnums=(0, 1))

    p1, s1 = step(tx)(params, tx.init(params), grads)
    p2, s2 = step(ref_tx)(_random_tree(0), ref_tx.init(params), grads)
    assert ref.max_rel_diff(p1, p2) <= 1e-6
    assert ref.max_rel_diff(s1.momentum, s2.momentum) <= 1e-6


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_sgd_agc_step_equals_update_then_apply(small_leaves, implementation):
    params = _random_tree(0)
    kwargs = dict(momentum=0.9, weight_decay=1e-2, clipping=0.05)
    tx = agc_optax.sgd_agc(0.1, **kwargs)
    step = jax.jit(
        agc_optax.sgd_agc_step(0.1, implementation=implementation, **kwargs), donate_argnums=(0, 1)
    )
    grads = [_random_tree(10 + i, 0.1) for i in range(2)]
    if implementation == "pallas":
        assert _count_pallas_calls(step, params, tx.init(params), grads[0]) == 2 * KERNEL_LEAVES
        assert "agc_sgd_apply" in str(jax.make_jaxpr(step)(params, tx.init(params), grads[0]))
    _, want_params, want_state = ref.run_steps(tx, params, grads)
    got_params, got_state = _random_tree(0), tx.init(params)
    for g in grads:
        got_params, got_state = step(got_params, got_state, g)
    assert ref.max_rel_diff(got_params, want_params) <= 1e-6
    assert ref.max_rel_diff(got_state.momentum, want_state.momentum) <= 1e-6


@pytest.mark.parametrize("nesterov", [True, False])
def test_pallas_skip_nonfinite_equals_xla(small_leaves, nesterov):
    # A NaN in a kernel leaf's gradient (caught by its unit norms), then an Inf in a leaf the
    # kernel does not take, between finite steps: the kernel reads the guard's flag and skips
    # exactly as the XLA path does.
    params = _random_tree(0)
    kwargs = dict(nesterov=nesterov, weight_decay=1e-2, clipping=0.05, skip_nonfinite=True)
    pallas = agc_optax.sgd_agc(0.1, implementation="pallas", **kwargs)
    xla = agc_optax.sgd_agc(0.1, implementation="xla", **kwargs)
    grads = [_random_tree(10 + i, 0.1) for i in range(4)]
    grads[1] = ref.with_entry(grads[1], ("stem", "conv", "kernel"), (0, 1, 2, 3), jnp.nan)
    grads[2] = ref.with_entry(grads[2], ("embed", "embedding"), (1, 1), jnp.inf)
    assert _count_pallas_calls(pallas.update, grads[0], pallas.init(params), params) == (
        2 * KERNEL_LEAVES
    )
    a, pa, sa = ref.run_steps(pallas, params, grads)
    b, pb, sb = ref.run_steps(xla, params, grads)
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        if step in (1, 2):  # skipped: zero updates on both paths, bit for bit
            chex.assert_trees_all_equal(x, jax.tree.map(jnp.zeros_like, x))
            chex.assert_trees_all_equal(y, x)
        else:
            assert ref.max_rel_diff(x, y) <= 1e-6
    assert ref.max_rel_diff(pa, pb) <= 1e-6
    assert ref.max_rel_diff(sa.momentum, sb.momentum) <= 1e-6
    assert int(sa.guard.total_notfinite) == int(sb.guard.total_notfinite) == 2
    assert int(sa.count) == int(sb.count) == 2


def test_pallas_skipped_step_keeps_the_momentum_bit_for_bit(small_leaves):
    params = _random_tree(0)
    tx = agc_optax.sgd_agc(0.1, clipping=0.05, skip_nonfinite=True, implementation="pallas")
    step = jax.jit(tx.update)
    _, state = step(_random_tree(10, 0.1), tx.init(params), params)
    bad = ref.with_entry(
        _random_tree(11, 0.1), ("blocks", "0", "conv0", "kernel"), (0, 0, 5, 3), jnp.inf
    )
    updates, skipped = step(bad, state, params)
    chex.assert_trees_all_equal(skipped.momentum, state.momentum)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
    assert not bool(skipped.guard.last_finite)
    # The loss passed as `value` is checked too, with finite gradients.
    _, skipped = step(_random_tree(12, 0.1), state, params, value=jnp.float32(jnp.nan))
    chex.assert_trees_all_equal(skipped.momentum, state.momentum)


def test_large_leaves_only_by_default():
    params = _random_tree(0)
    tx = agc_optax.sgd_agc(0.1, implementation="pallas")
    assert _count_pallas_calls(tx.update, params, tx.init(params), params) == 0
    big = {"conv": {"kernel": jnp.zeros((3, 3, 64, 128))}}  # 73,728 >= MIN_SIZE elements
    assert _count_pallas_calls(tx.update, big, tx.init(big), big) == 2


# --------------------------------------------------------------------------- dispatch


def test_auto_selects_xla_on_cpu(small_leaves):
    if jax.default_backend() != "cpu":  # benchmarks/device_checks.sh runs this file on a GPU
        pytest.skip("the CPU rule: run on CPU")
    assert kernels.resolve_implementation("auto") == "xla"
    assert kernels.resolve_implementation("auto", backend="gpu") == "pallas"
    assert kernels.resolve_implementation("auto", backend="tpu") == "pallas"
    # Several devices may shard the params, which a Pallas call would gather: XLA then.
    assert kernels.resolve_implementation("auto", backend="gpu", num_devices=8) == "xla"
    assert kernels.resolve_implementation("pallas") == "pallas"
    params = _random_tree(0)
    for implementation, calls in (("auto", 0), ("xla", 0), ("pallas", 2 * KERNEL_LEAVES)):
        tx = agc_optax.sgd_agc(0.1, implementation=implementation)
        assert _count_pallas_calls(tx.update, params, tx.init(params), params) == calls


def test_bad_implementation():
    with pytest.raises(ValueError, match="implementation"):
        agc_optax.sgd_agc(0.1, implementation="triton")


def test_pallas_needs_params():
    params = _random_tree(0)
    tx = agc_optax.sgd_agc(0.1, implementation="pallas")
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_gpu_and_tpu(small_leaves, monkeypatch, platform):
    """Cross-lowering without the device: Triton (GPU) and Mosaic (TPU) accept the kernels.

    This checks block shapes and that every op in the kernels has a lowering rule; it cannot
    check numerics or speed, which need the device.
    """
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(sgd_agc_pallas, "_platform", lambda: "gpu" if platform == "cuda" else "tpu")
    shapes = {
        "conv": {"kernel": (3, 3, 64, 128)},
        "odd": {"kernel": (1, 1, 300, 40)},
        "bn": {"scale": (128,)},
    }
    params = _random_tree(0, shapes=shapes)
    params["half"] = {"kernel": jnp.zeros((3, 3, 30, 100), jnp.bfloat16)}
    tx = agc_optax.sgd_agc(0.1)
    checks = [
        jax.export.DisabledSafetyCheck.custom_call(target)
        for target in ("__gpu$xla.gpu.triton", "tpu_custom_call")
    ]
    guarded = agc_optax.sgd_agc(0.1, implementation="pallas", skip_nonfinite=True)
    for fn, state in (
        (agc_optax.sgd_agc_step(0.1, implementation="pallas"), tx.init(params)),
        (
            lambda p, s, g: agc_optax.sgd_agc(0.1, implementation="pallas").update(g, s, p),
            tx.init(params),
        ),
        (lambda p, s, g: guarded.update(g, s, p, value=jnp.float32(1)), guarded.init(params)),
    ):
        exported = jax.export.export(jax.jit(fn), platforms=(platform,), disabled_checks=checks)(
            params, state, params
        )
        text = exported.mlir_module()
        target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
        assert text.count(f"@{target}") == 6  # 2 kernels x 3 eligible leaves


def test_pallas_benchmark_runs():
    from benchmarks import pallas_step

    assert "skipped: no GPU" in pallas_step.run()
    table = pallas_step.run(repeats=1, small=True, force=True)
    assert "| sgd_agc_step, Pallas |" in table and "| copy |" in table
    # The benchmark checks the kernel's numbers on the device before timing it.
    rows = {
        line.split("|")[1].strip(): line.split("|")[-2].strip()
        for line in table.splitlines()
        if line.startswith("|")
    }
    for name in (
        "sgd_agc_step, Pallas",
        "sgd_agc, Pallas + apply_updates",
        "sgd_agc_step, Pallas, skip_nonfinite",
    ):
        assert float(rows[name]) <= 1e-6, (name, rows[name])
    assert rows["copy"] == "-"


def test_pallas_non_finite_gradients_like_xla(small_leaves):
    # A NaN column passes unclipped, an Inf column is scaled by 0 (its Inf becomes NaN): the
    # kernel's column sums and scale give the same non-finite entries as the XLA path.
    params = _random_tree(0)
    grads = _random_tree(1)
    kernel = grads["stem"]["conv"]["kernel"]
    grads["stem"]["conv"]["kernel"] = kernel.at[0, 0, 0, 3].set(jnp.nan).at[1, 2, 4, 7].set(jnp.inf)
    outs = {}
    for implementation in ("pallas", "xla"):
        tx = agc_optax.sgd_agc(0.1, implementation=implementation)
        outs[implementation] = jax.jit(tx.update)(grads, tx.init(params), params)
    assert _count_pallas_calls(
        agc_optax.sgd_agc(0.1, implementation="pallas").update,
        grads,
        agc_optax.sgd_agc(0.1).init(params),
        params,
    )
    for a, b in zip(*(jax.tree.leaves(o) for o in outs.values()), strict=True):
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
        np.testing.assert_allclose(
            np.where(np.isfinite(a), a, 0), np.where(np.isfinite(b), b, 0), rtol=1e-5, atol=1e-7
        )
    update = np.asarray(outs["pallas"][0]["stem"]["conv"]["kernel"])
    assert np.isnan(update[0, 0, 0, 3]) and np.isnan(update[1, 2, 4, 7])
    assert (~np.isfinite(update)).sum() == 2

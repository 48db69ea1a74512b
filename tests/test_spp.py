"""Signal propagation: the NF-ResNet's statistics at init follow the paper; plots are written."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agc_optax import expected_variance, plot_signal_propagation, signal_propagation
from agc_optax.models import NFResNet, ResNet

ALPHA = 0.2
DEPTHS = (3, 3, 3)


def _model(scaled: bool) -> NFResNet:
    # Skip gains of one: with DeepMind's zero init every branch would be muted at init.
    return NFResNet(
        10,
        "ResNet26",
        width=1,
        depths=DEPTHS,
        widths=(64, 128, 256),
        alpha=ALPHA,
        skipinit_gain=nnx.initializers.ones,
        scaled=scaled,
        rngs=nnx.Rngs(0),
    )


@pytest.fixture(scope="module")
def batch() -> jax.Array:
    # 128 px keeps the last stage at 8x8, where SAME padding barely biases the variances.
    return jax.random.normal(jax.random.key(42), (8, 128, 128, 3))


@pytest.fixture(scope="module")
def nf_stats(batch) -> dict:
    model = _model(scaled=True)
    model.eval()
    return jax.tree.map(np.asarray, signal_propagation(model, batch))


@pytest.fixture(scope="module")
def unscaled_stats(batch) -> dict:
    model = _model(scaled=False)
    model.eval()
    return jax.tree.map(np.asarray, signal_propagation(model, batch))


def _designed_variance() -> np.ndarray:
    """The paper's schedule, written out: block k of a stage outputs 1 + (k + 1) * alpha^2."""
    return np.array([1.0 + (k + 1) * ALPHA**2 for depth in DEPTHS for k in range(depth)])


def test_shapes(nf_stats):
    num_blocks = sum(DEPTHS)
    assert nf_stats["avg_sq_mean"].shape == (num_blocks + 1,)
    assert nf_stats["avg_var"].shape == (num_blocks + 1,)
    assert nf_stats["res_avg_var"].shape == (num_blocks,)


def test_nf_resnet_variance_follows_the_alpha_schedule(nf_stats):
    want = _designed_variance()
    np.testing.assert_allclose(expected_variance(DEPTHS, ALPHA), want, rtol=1e-12)
    block_var = nf_stats["avg_var"][1:]
    # Measured on one batch of 8 at init: a few percent of sampling and border effects.
    np.testing.assert_allclose(block_var, want, rtol=0.06)
    starts = np.cumsum((0,) + DEPTHS[:-1])
    for start, depth in zip(starts, DEPTHS, strict=True):
        growth = np.diff(block_var[start : start + depth])
        # Each block adds alpha^2 = 0.04 of variance within a stage ...
        np.testing.assert_allclose(growth, ALPHA**2, atol=0.5 * ALPHA**2)
        # ... and the transition block brings it back to about 1 + alpha^2.
        if start > 0:
            assert block_var[start] < block_var[start - 1] - 0.5 * ALPHA**2
    # Every residual branch sees a unit-variance input (beta) and preserves it (WS + gamma).
    np.testing.assert_allclose(nf_stats["res_avg_var"], 1.0, atol=0.15)


def test_nf_resnet_has_no_mean_shift(nf_stats):
    # The stem's max pool shifts the mean; from the first (weight-standardized, projecting)
    # block on, the channel means stay near zero.
    assert nf_stats["avg_sq_mean"][0] > 0.5
    assert np.all(nf_stats["avg_sq_mean"][1:] < 0.02)


def test_unscaled_resnet_explodes(nf_stats, unscaled_stats):
    var = unscaled_stats["avg_var"][1:]
    # Without beta/alpha the variance roughly doubles per block (grows > 1.4x on average).
    assert np.all(np.diff(var) > 0)
    assert var[-1] / var[0] > 1.4 ** (len(var) - 1)
    assert var[-1] > 100 * nf_stats["avg_var"][-1]
    assert unscaled_stats["avg_sq_mean"][-1] > 100 * nf_stats["avg_sq_mean"][-1]


def test_signal_propagation_leaves_the_model_unchanged():
    model = ResNet(3, depths=(1, 1), widths=(16, 32), stem_width=8, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    model.train()  # Batch statistics, as in the paper; this would update running averages.
    stats = signal_propagation(model, jnp.ones((2, 16, 16, 3)) * 3.0)
    assert stats["res_avg_var"].shape == (2,)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    with pytest.raises(TypeError, match="`model`"):
        signal_propagation(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), jnp.ones((1, 2)))


def test_plot_writes_png(tmp_path, nf_stats, unscaled_stats):
    pytest.importorskip("matplotlib")
    path = tmp_path / "spp.png"
    out = plot_signal_propagation(
        [nf_stats, unscaled_stats], path, labels=["NF-ResNet", "unscaled ResNet"]
    )
    assert out == str(path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    with pytest.raises(ValueError, match="`labels`"):
        plot_signal_propagation([nf_stats], tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ValueError, match="`stats`"):
        plot_signal_propagation({"avg_var": nf_stats["avg_var"]}, tmp_path / "x.png")


def test_plot_without_matplotlib_says_which_extra(monkeypatch, tmp_path, nf_stats):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install agc_optax\[train\]"):
        plot_signal_propagation(nf_stats, tmp_path / "spp.png")

"""BatchNorm ResNet baseline: torchvision's parameter count, API parity with the NF families."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agc_optax.models import ResNet, create_model

from .reference import num_params


def test_resnet50_has_torchvisions_parameter_count():
    model = nnx.eval_shape(lambda: create_model("resnet50", rngs=nnx.Rngs(0)))
    assert isinstance(model, ResNet)
    assert num_params(model) == 25_557_032  # torchvision.models.resnet50
    # Running statistics are state, not parameters: 2 per BatchNorm channel.
    stats = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    assert stats == 2 * 26_560
    assert model.head.kernel.shape == (2048, 1000)
    assert model.blocks[3].conv1.strides == 2  # v1.5: the stride is on the 3x3 conv.
    assert model.blocks[3].conv0.strides == 1


@pytest.fixture(scope="module")
def tiny() -> ResNet:
    return ResNet(5, depths=(1, 2), widths=(32, 64), stem_width=16, rngs=nnx.Rngs(0))


def test_jit_grad_and_batch_stats_update(tiny):
    model = nnx.clone(tiny)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    labels = jnp.array([0, 1, 2, 3])

    def loss_fn(m):
        logp = jax.nn.log_softmax(m(x))
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1))

    before = np.asarray(model.stem.bn.mean[...])

    @nnx.jit
    def step(m):
        return nnx.value_and_grad(loss_fn)(m)

    loss, grads = step(model)
    assert np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.linalg.norm(grads["blocks"][0]["conv0"]["kernel"][...])) > 0
    # Training mode normalizes with batch statistics and updates the running averages.
    assert not np.allclose(np.asarray(model.stem.bn.mean[...]), before)


def test_eval_mode_uses_running_statistics(tiny):
    model = nnx.clone(tiny)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    model.eval()
    forward = nnx.jit(lambda m, x: m.forward_outputs(x, return_metrics=True))
    a = forward(model, x)
    # Per-example outputs do not depend on the rest of the batch in eval mode.
    b = forward(model, x[:1])
    np.testing.assert_allclose(np.asarray(a["logits"][:1]), np.asarray(b["logits"]), atol=1e-5)
    assert set(a) == {"pool", "logits"} | {
        f"{k}_{i}" for k in ("avg_sq_mean", "avg_var") for i in range(4)
    } | {f"res_avg_var_{i}" for i in range(3)}
    # The BatchNorm'd residual branch has unit variance per channel in training mode.
    model.train()
    stats = forward(nnx.clone(model), x)
    np.testing.assert_allclose([float(stats[f"res_avg_var_{i}"]) for i in range(3)], 1.0, atol=1e-2)


def test_bfloat16_forward_close_to_float32(tiny):
    model = nnx.clone(tiny)
    model.eval()
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    full = nnx.jit(lambda m, x: m(x))(model, x)
    half_model = nnx.eval_shape(
        lambda: ResNet(
            5, depths=(1, 2), widths=(32, 64), stem_width=16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
        )
    )
    nnx.update(half_model, nnx.state(model))
    half_model.eval()
    half = nnx.jit(lambda m, x: m(x))(half_model, x)
    assert half.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(full)))
    np.testing.assert_allclose(
        np.asarray(half, np.float32), np.asarray(full), atol=0.05 * scale, rtol=0
    )


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="`widths`"):
        ResNet(10, depths=(1, 1), widths=(64,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`depths`"):
        ResNet(10, depths=(1, 0), widths=(64, 128), rngs=nnx.Rngs(0))

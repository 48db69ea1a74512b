"""A tiny NNX classifier for trainer tests that should not wait on the model zoo's compile time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class TinyNet(nnx.Module):
    """conv -> relu -> conv -> mean-pool -> dropout -> head (classifier at ``head/kernel``)."""

    def __init__(
        self, num_classes: int, *, dropout: float = 0.0, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.conv1 = nnx.Conv(3, 8, (3, 3), dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(16, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        return self.head(self.dropout(x.mean(axis=(1, 2))))


def tiny_model(num_classes: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> TinyNet:
    """Dropout off, so per-device (pmap) and global (jit) runs draw nothing that could differ."""
    return TinyNet(num_classes, dtype=dtype, rngs=rngs)

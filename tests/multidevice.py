"""Run a snippet in a fresh Python process that sees several virtual CPU devices."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

PRELUDE = 'import jax\njax.config.update("jax_num_cpu_devices", {n})\n'


def run_on_cpu_devices(
    script: str, num_devices: int = 8, timeout: int = 300, *, sharded_tree: bool = False
) -> str:
    """Runs ``script`` with ``num_devices`` CPU devices; returns stdout, fails with stderr.

    ``sharded_tree`` prepends :data:`SHARDED_TREE` (needs 8 devices).
    """
    code = PRELUDE.format(n=num_devices) + (SHARDED_TREE if sharded_tree else "")
    code += textwrap.dedent(script)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def assert_no_leaf_gathered(hlo: str) -> None:
    """No sharded leaf of rank >= 2 was gathered whole, nor shuffled by an all-to-all, in the
    compiled program ``hlo``. AGC computes its scales on one vector of all units' norms, so the
    unit norms of leaves sharded along their unit axis (one number per unit, rank 1) do travel;
    a gathered kernel, momentum or gradient would have rank >= 2."""
    assert "all-to-all" not in hlo
    gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)
    assert all(dims.count(",") == 0 for dims in gathered), f"gathered shapes: {gathered}"


#: Prepended to a script by ``run_on_cpu_devices(script, sharded_tree=True)``: an 8-device mesh
#: axis ``model``, a small tree of conv, dense and embedding leaves (``params``, random), each
#: sharded along the axis that indexes its units (FSDP style, so unit norms stay local), and the
#: checks every sharded test makes.
SHARDED_TREE = """
from tests.multidevice import assert_no_leaf_gathered
import numpy as np, jax.numpy as jnp, optax, agc_optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

mesh = Mesh(np.array(jax.devices()).reshape(8), ("model",))
rng = np.random.default_rng(0)
params = {"conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 16, 64)), jnp.float32)},
          "dense": {"kernel": jnp.asarray(rng.standard_normal((32, 64)), jnp.float32),
                    "bias": jnp.asarray(rng.standard_normal(64), jnp.float32)},
          "embed": {"embedding": jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)}}
specs = {"conv": {"kernel": P(None, None, None, "model")},
         "dense": {"kernel": P(None, "model"), "bias": P("model")},
         "embed": {"embedding": P("model", None)}}
shard = lambda t: jax.tree.map(
    lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs,
    is_leaf=lambda x: isinstance(x, P) or hasattr(x, "shape"))

def assert_same_values_and_shardings(plain, sharded):
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for leaf, spec in zip(jax.tree.leaves(sharded), spec_leaves, strict=True):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), spec

def assert_no_gather(jitted, *args):
    assert_no_leaf_gathered(jitted.lower(*args).compile().as_text())

# A params-free stateful transform on plain and on sharded gradients (x100 at spike_step):
# same updates, shardings and states, no gather. Returns the sharded state.
def compare_stateful_steps(tx, num_steps, spike_step, scale):
    plain_state = sharded_state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(num_steps):
        g = jax.tree.map(lambda p: jnp.asarray(
            rng.standard_normal(p.shape) * scale * (100.0 if t == spike_step else 1.0),
            jnp.float32), params)
        plain, plain_state = step(g, plain_state)
        sharded, sharded_state = step(shard(g), sharded_state)
        assert_same_values_and_shardings(plain, sharded)
    for a, b in zip(jax.tree.leaves(plain_state), jax.tree.leaves(sharded_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert_no_gather(step, shard(g), sharded_state)
    return sharded_state
"""

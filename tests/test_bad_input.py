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
        (lambda: agc_optax.adaptive_grad_clip(jnp.array(-1.0)), r"`clipping` must be a finite"),
        (lambda: agc_optax.adaptive_grad_clip(jnp.array(np.nan)), r"`clipping` must be a finite"),
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

"""NF-RegNet: DeepMind's parameter layout and counts, block details, jit/grad, dtypes."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agc_optax.models import NFRegNet, create_model, get_config, load_haiku_params

from .reference import REFERENCE, load_manifest, num_params, param_shapes

# An NF-RegNet parity case made like the NF-ResNet one in the reference README: DeepMind's
# nfnets/nf_regnet.py (commit f5de0ede, dm-haiku 0.0.17, jax 0.10.2, CPU, float32) with the
# experiment kwargs (width 0.75, expansion 2.25, group size 8, SE ratio 0.5, alpha 0.2,
# stochdepth_rate 0.1, silu) on a custom variant {'width': [24, 48, 64, 88], 'depth': [1, 2, 2, 1],
# 'drop_rate': 0.2}; init with PRNGKey(0) on the input below, each parameter (in sorted key order)
# perturbed by 0.1 * default_rng(1234).standard_normal, then the jitted
# apply(..., is_training=False, return_metrics=True). Keys: "param:<haiku key>" and
# "output:<key of the returned dict>". The 57x57 input makes the strided shortcuts' 2x2 average
# pools see odd sizes (29, 15), where padded cells must not count.
PARITY_CASE = Path(__file__).resolve().parent / "data" / "nfregnet_small.npz"
VARIANTS = ("B0", "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return load_manifest()


@pytest.mark.parametrize("variant", VARIANTS)
def test_registry_model_matches_deepmind_manifest(manifest, variant):
    """The registry's nf_regnet_b* use DeepMind's experiment kwargs; counts agree to the unit."""
    entry = manifest[f"NF-RegNet-{variant}"]
    model = nnx.eval_shape(lambda: create_model(f"nf_regnet_{variant.lower()}", rngs=nnx.Rngs(0)))
    assert num_params(model) == entry["total"]
    theirs = {
        NFRegNet.haiku_names.nnx_path(f"{module}/{param}"): tuple(shape)
        for module, params in entry["params"].items()
        for param, shape in params.items()
    }
    assert theirs == param_shapes(model)


def test_registry_model_is_deepmind_experiment(manifest):
    """``nf_regnet_b0`` is DeepMind's experiment model, ``NF_RegNet(**constructor)``."""
    kwargs = {k: v for k, v in manifest["NF-RegNet-B0"]["constructor"].items() if k != "class"}
    assert get_config("nf_regnet_b0").variant == kwargs["variant"]

    def summary(model: NFRegNet) -> tuple:
        blocks = [
            (b.beta, b.width, b.groups, b.stride, b.stoch_depth and b.stoch_depth.rate)
            for b in model.blocks
        ]
        act = float(model.activation(jnp.ones(())))
        return model.alpha, model.drop_rate, model.widths, model.depths, blocks, act

    ours = nnx.eval_shape(lambda: create_model("nf_regnet_b0", rngs=nnx.Rngs(0)))
    theirs = nnx.eval_shape(lambda: NFRegNet(**kwargs, rngs=nnx.Rngs(0)))
    assert summary(ours) == summary(theirs)
    model = nnx.eval_shape(lambda: create_model("nf_regnet_b3", rngs=nnx.Rngs(0)))
    assert model.drop_rate == 0.3  # The variant's rate, as DeepMind's drop_rate=None gives.


def test_block_structure_b0():
    model = nnx.eval_shape(lambda: NFRegNet(1000, "B0", activation="silu", rngs=nnx.Rngs(0)))
    first, second = model.blocks[0], model.blocks[1]
    # Widths are int(w * 0.75); the first block's expansion is 1: int(36 * 1) // 8 * 8 = 32.
    assert model.widths == (36, 78, 156, 330)
    assert (first.width, first.groups, first.stride) == (32, 4, 2)
    # int(36 * 2.25) = 81 -> 10 groups of 8.
    assert (second.width, second.groups, second.stride) == (80, 10, 2)
    assert second.se.fc0.kernel.shape == (80, 40)  # SE on the expanded width, ratio 0.5.
    assert model.final_conv.kernel.shape == (1, 1, 330, 1280 * 330 // 440)
    betas = [b.beta for b in model.blocks]
    # Depths (1, 3, ...): each stage's first block sees the previous stage's accumulated std.
    np.testing.assert_allclose(betas[:5], 1 / np.sqrt([1.0, 1.04, 1.04, 1.08, 1.12]))


def test_parity_with_deepmind_haiku_nf_regnet():
    if not (REFERENCE / "input.npy").exists():
        pytest.skip(f"input.npy not found at {REFERENCE}")
    with np.load(PARITY_CASE) as npz:
        params = {k.removeprefix("param:"): npz[k] for k in npz.files if k.startswith("param:")}
        want = {k.removeprefix("output:"): npz[k] for k in npz.files if k.startswith("output:")}
    model = nnx.eval_shape(
        lambda: NFRegNet(
            10,
            "B0",
            width=0.75,
            expansion=2.25,
            group_size=8,
            se_ratio=0.5,
            alpha=0.2,
            stochdepth_rate=0.1,
            drop_rate=0.2,
            activation="silu",
            widths=(24, 48, 64, 88),
            depths=(1, 2, 2, 1),
            rngs=nnx.Rngs(0),
        )
    )
    load_haiku_params(model, params)  # Every key used, every leaf filled.
    model.eval()
    x = jnp.asarray(np.load(REFERENCE / "input.npy")[:, :57, :57, :])
    got = nnx.jit(lambda m, x: m.forward_outputs(x, return_metrics=True))(model, x)
    assert set(got) == set(want)
    np.testing.assert_allclose(np.asarray(got["logits"]), want["logits"], rtol=0, atol=2e-5)
    for key in want:
        np.testing.assert_allclose(
            np.asarray(got[key]), want[key], rtol=1e-4, atol=2e-5, err_msg=key
        )


def _tiny(**kwargs) -> NFRegNet:
    return NFRegNet(
        5,
        "B0",
        width=1.0,
        widths=(16, 16, 32, 32),
        depths=(1, 2, 1, 1),
        activation="silu",
        rngs=nnx.Rngs(params=0, dropout=1),
        **kwargs,
    )


@pytest.fixture(scope="module")
def initialized() -> NFRegNet:
    return _tiny()


@pytest.fixture(scope="module")
def tiny(initialized) -> NFRegNet:
    model = nnx.clone(initialized)
    # DeepMind initializes skip gains and the classifier to zero; nonzero values make every
    # branch reach the logits (and the gradients).
    for block in model.blocks:
        block.skip_gain[...] = jnp.ones(())
    model.head.kernel[...] = jax.random.normal(jax.random.key(2), model.head.kernel.shape) * 0.1
    return model


def test_head_and_skip_gains_are_zero_initialized(initialized):
    assert not np.any(np.asarray(initialized.head.kernel[...]))
    assert all(float(b.skip_gain[...]) == 0.0 for b in initialized.blocks)


def test_jit_grad_is_finite(tiny):
    model = nnx.clone(tiny)
    x = jax.random.normal(jax.random.key(0), (2, 33, 33, 3))  # Odd sizes at every stage.
    labels = jnp.array([0, 4])

    def loss_fn(m):
        logp = jax.nn.log_softmax(m(x))
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1))

    loss, grads = nnx.jit(lambda m: nnx.value_and_grad(loss_fn)(m))(model)
    assert np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    for path in (
        ("blocks", 2, "se", "fc0", "kernel"),
        ("blocks", 0, "conv_shortcut", "gain"),
        ("final_conv", "kernel"),
        ("stem", "conv", "kernel"),
    ):
        leaf = grads
        for p in path:
            leaf = leaf[p]
        assert float(jnp.linalg.norm(leaf[...])) > 0, path


def test_bfloat16_forward_close_to_float32(tiny):
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    model = nnx.clone(tiny)
    model.eval()
    full = nnx.jit(lambda m, x: m(x))(model, x)
    half_model = nnx.eval_shape(lambda: _tiny(dtype=jnp.bfloat16))
    nnx.update(half_model, nnx.state(model))
    half_model.eval()
    half = nnx.jit(lambda m, x: m(x))(half_model, x)
    assert half.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(full)))
    assert scale > 0
    np.testing.assert_allclose(
        np.asarray(half, np.float32), np.asarray(full), atol=0.05 * scale, rtol=0
    )


def test_load_haiku_names_from_manifest(manifest):
    """Every NF_RegNet/~/... key of DeepMind's B0 lands on the leaf of the same role."""
    rng = np.random.default_rng(0)
    params = {
        module: {
            name: rng.standard_normal(shape).astype(np.float32) for name, shape in leaves.items()
        }
        for module, leaves in manifest["NF-RegNet-B0"]["params"].items()
    }
    model = nnx.eval_shape(lambda: create_model("nf_regnet_b0", rngs=nnx.Rngs(0)))
    load_haiku_params(model, params)
    checks = {
        ("NF_RegNet/~/initial_conv", "w"): model.stem.conv.kernel,
        ("NF_RegNet/~/final_conv", "gain"): model.final_conv.gain,
        ("NF_RegNet/~/linear", "b"): model.head.bias,
        ("NF_RegNet/~/nf_block_11", "skip_gain"): model.blocks[11].skip_gain,
        ("NF_RegNet/~/nf_block_3/~/squeeze_excite/~/linear_1", "w"): model.blocks[3].se.fc1.kernel,
        ("NF_RegNet/~/nf_block/~/conv_shortcut", "bias"): model.blocks[0].conv_shortcut.bias,
    }
    for (module, name), leaf in checks.items():
        np.testing.assert_array_equal(np.asarray(leaf[...]), params[module][name])


def test_swish_is_silu_and_errors_name_the_argument():
    model = nnx.eval_shape(lambda: NFRegNet(5, "B0", rngs=nnx.Rngs(0)))  # DeepMind's 'swish'.
    want = 1.7881293296813965 * float(jax.nn.silu(1.0))
    assert float(model.activation(jnp.ones(()))) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="`variant`"):
        NFRegNet(5, "B9", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`group_size`"):
        NFRegNet(
            5, "B0", width=1.0, widths=(4, 8, 8, 8), depths=(1,) * 4, group_size=8, rngs=nnx.Rngs(0)
        )
    with pytest.raises(ValueError, match="`widths`"):
        NFRegNet(5, "B0", widths=(16, 16), rngs=nnx.Rngs(0))

"""NF-ResNet: parity with DeepMind's Haiku model, parameter counts, jit/grad, dtypes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agc_optax.models import NFResNet, create_model, get_config, load_haiku_params

from .reference import REFERENCE, load_manifest, num_params, param_shapes

needs_reference = pytest.mark.skipif(
    not (REFERENCE / "nfresnet_small_params.npz").exists(),
    reason=f"DeepMind reference data not found at {REFERENCE}",
)

# The manifest names -> our variant names (the official table plus the custom ResNet26).
MANIFEST_VARIANTS = {
    "NF-ResNet26(custom)": "ResNet26",
    "NF-ResNet50": "ResNet50",
    "NF-ResNet101": "ResNet101",
    "NF-ResNet152": "ResNet152",
    "NF-ResNet200": "ResNet200",
    "NF-ResNet288": "ResNet288",
    "NF-ResNet600": "ResNet600",
}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return load_manifest()


@pytest.fixture(scope="module")
def small_config() -> dict:
    return json.loads((REFERENCE / "nfresnet_small_config.json").read_text())


def _build_reference_model(config: dict) -> NFResNet:
    kwargs = dict(config["constructor"]["kwargs"])
    depths = config["constructor"]["custom_variant_added_to_NF_ResNet.variant_dict"][
        kwargs["variant"]
    ]["depth"]
    for key in ("name", "skipinit_gain"):  # Haiku-only arguments; skip gains are loaded anyway.
        kwargs.pop(key)
    return NFResNet(depths=depths, rngs=nnx.Rngs(0), **kwargs)


@pytest.fixture(scope="module")
def activations() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "nfresnet_small_activations.npz") as npz:
        return {key: npz[key] for key in npz.files}


@pytest.fixture(scope="module")
def reference_run(small_config) -> tuple[dict, dict]:
    """Our model with DeepMind's perturbed weights, run once (jitted) on the reference input.

    Returns the ``forward_outputs`` dict and every submodule method's output, keyed by path.
    """
    # eval_shape: nothing is initialized, the loader fills every parameter.
    model = nnx.eval_shape(lambda: _build_reference_model(small_config))
    load_haiku_params(model, REFERENCE / "nfresnet_small_params.npz")
    model.eval()
    forward = nnx.capture(
        lambda m, x: m.forward_outputs(x, return_metrics=True),
        nnx.Intermediate,
        method_outputs=nnx.Intermediate,
    )
    x = jnp.asarray(np.load(REFERENCE / "input.npy"))
    outputs, intermediates = nnx.jit(forward)(model, x)
    captured = {path: var.get_value() for path, var in nnx.to_flat_state(intermediates)}
    return outputs, captured


@needs_reference
def test_parity_logits_and_metrics(reference_run, activations):
    outputs, _ = reference_run
    want = np.load(REFERENCE / "nfresnet_small_logits.npy")
    np.testing.assert_allclose(np.asarray(outputs["logits"]), want, rtol=0, atol=2e-5)
    reference_keys = {
        k.split(":", 1)[1] for k in activations if k.startswith("return_metrics_outputs:")
    }
    assert set(outputs) == reference_keys
    for key in reference_keys:
        np.testing.assert_allclose(
            np.asarray(outputs[key]),
            activations[f"return_metrics_outputs:{key}"],
            rtol=1e-4,
            atol=2e-5,
            err_msg=key,
        )


def _our_activation(key: str, captured: dict, outputs: dict) -> np.ndarray:
    """Finds our counterpart of a reference activation key (see the reference README)."""
    if key.startswith("NF_ResNet:"):
        return np.asarray(outputs[key.split(":", 1)[1]])
    module, _, tuple_index = key.partition(":")
    parts = module.split("/~/")[1:]
    if parts == ["initial_conv"]:
        path: tuple = ("stem", "conv")
    elif parts == ["linear"]:
        path = ("head",)
    else:
        match = re.fullmatch(r"nf_res_block(?:_(\d+))?", parts[0])
        assert match, key
        path = ("blocks", int(match.group(1) or 0), *parts[1:])
    value = captured[(*path, "__call__")][0]
    if tuple_index:
        value = value[int(tuple_index)]
    return np.asarray(value)


@needs_reference
def test_parity_per_module_activations(reference_run, activations):
    outputs, captured = reference_run
    keys = [k for k in activations if not k.startswith("return_metrics_outputs:")]
    worst = 0.0
    for key in keys:
        want = activations[key]
        got = _our_activation(key, captured, outputs)
        assert got.shape == want.shape, key
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5, err_msg=key)
        worst = max(worst, float(np.max(np.abs(got - want), initial=0.0)))
    # Stem, 8 blocks (convs, stochastic depth, both outputs), the classifier, the output dict.
    assert len(keys) > 80
    assert worst < 2e-5


# Squeeze-excite blocks, which the shared reference does not cover: generated here with DeepMind's
# NF_ResNet (deepmind-research/nfnets at abc9ba06, dm-haiku 0.0.17, CPU, float32) as
# NF_ResNet(num_classes=10, variant={'depth': [1, 2, 1, 1]}, width=1, alpha=0.2,
# stochdepth_rate=0.1, drop_rate=0.2, activation='silu', use_se=True, se_ratio=0.5), applied
# jitted with is_training=False, return_metrics=True on the reference input. Haiku's init gave
# only the parameter names and shapes ("param_shapes"); the values are the NumPy draws of
# _se_parity_params, so the file holds just the spec and DeepMind's outputs ("output:<key>").
SE_PARITY_CASE = Path(__file__).resolve().parent / "data" / "nfresnet_se_small.npz"


def _se_parity_params(spec: dict[str, list[int]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2024)
    params = {}
    for key, shape in sorted(spec.items()):
        name = key.rsplit("/", 1)[1]
        noise = rng.standard_normal(shape)
        if name == "gain":
            value = 1.0 + 0.1 * noise
        elif name in ("bias", "b"):
            value = 0.1 * noise
        elif name == "skip_gain":
            value = 0.5 + 0.1 * noise
        else:  # conv and linear kernels "w", fan-in scaled
            value = noise / np.sqrt(np.prod(shape[:-1]))
        params[key] = value.astype(np.float32)
    return params


@needs_reference  # for the input images
def test_parity_with_squeeze_excite():
    with np.load(SE_PARITY_CASE) as npz:
        spec = json.loads(str(npz["param_shapes"]))
        want = {k.split(":", 1)[1]: npz[k] for k in npz.files if k.startswith("output:")}
    model = nnx.eval_shape(
        lambda: NFResNet(
            10,
            depths=(1, 2, 1, 1),
            width=1,
            alpha=0.2,
            stochdepth_rate=0.1,
            drop_rate=0.2,
            activation="silu",
            use_se=True,
            se_ratio=0.5,
            rngs=nnx.Rngs(0),
        )
    )
    load_haiku_params(model, _se_parity_params(spec))
    model.eval()
    x = jnp.asarray(np.load(REFERENCE / "input.npy"))
    got = nnx.jit(lambda m, x: m.forward_outputs(x, return_metrics=True))(model, x)
    assert set(got) == set(want)
    np.testing.assert_allclose(np.asarray(got["logits"]), want["logits"], rtol=0, atol=2e-5)
    for key, value in want.items():
        np.testing.assert_allclose(np.asarray(got[key]), value, rtol=1e-4, atol=2e-5, err_msg=key)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in ("NF-ResNet288", "NF-ResNet600") else n
        for n in sorted(MANIFEST_VARIANTS)
    ],
)
def test_parameter_count_and_names_match_deepmind(manifest, name):
    entry = manifest[name]
    model = nnx.eval_shape(
        lambda: NFResNet(1000, MANIFEST_VARIANTS[name], width=4, rngs=nnx.Rngs(0))
    )
    assert num_params(model) == entry["total"]
    # Every DeepMind parameter maps onto a model leaf of the same shape, and nothing is left over.
    ours = param_shapes(model)
    theirs = {
        NFResNet.haiku_names.nnx_path(f"{module}/{param}"): tuple(shape)
        for module, params in entry["params"].items()
        for param, shape in params.items()
    }
    assert theirs == ours


def test_registry_names_and_counts():
    variants = {
        "nf_resnet26": (2, 2, 2, 2),
        "nf_resnet50": (3, 4, 6, 3),
        "nf_resnet101": (3, 4, 23, 3),
        "nf_resnet152": (3, 8, 36, 3),
        "nf_resnet200": (3, 24, 36, 3),
    }
    for name, depths in variants.items():
        assert get_config(name).variant == f"ResNet{name.removeprefix('nf_resnet')}"
        model = nnx.eval_shape(lambda name=name: create_model(name, 10, rngs=nnx.Rngs(0)))
        assert isinstance(model, NFResNet) and model.depths == depths
        assert model.head.kernel.shape == (2048, 10)
    model = nnx.eval_shape(lambda: create_model("nf_resnet50", rngs=nnx.Rngs(0)))
    assert num_params(model) == 25_557_048  # DeepMind's NF-ResNet-50 (reference README).


def _tiny(**kwargs) -> NFResNet:
    return NFResNet(
        5,
        "ResNet26",
        width=1,
        widths=(32, 64),
        depths=(1, 2),
        stem_width=8,
        drop_rate=0.1,
        rngs=nnx.Rngs(params=0, dropout=1),
        **kwargs,
    )


@pytest.fixture(scope="module")
def tiny() -> NFResNet:
    # Skip gains of one so that every branch (and its SE) affects the output and the gradients.
    return _tiny(use_se=True, skipinit_gain=nnx.initializers.ones)


def test_jit_grad_is_finite(tiny):
    model = nnx.clone(tiny)
    x = jax.random.normal(jax.random.key(0), (2, 17, 17, 3))  # Odd size: asymmetric SAME pads.
    labels = jnp.array([1, 3])

    def loss_fn(m):
        logits = m(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    loss, grads = nnx.jit(lambda m: nnx.value_and_grad(loss_fn)(m))(model)
    assert np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["blocks"][1]["skip_gain"][...])) > 0
    assert float(jnp.linalg.norm(grads["blocks"][0]["se"]["fc1"]["kernel"][...])) > 0
    assert float(jnp.linalg.norm(grads["stem"]["conv"]["kernel"][...])) > 0


def test_train_mode_is_stochastic_and_eval_is_not(tiny):
    model = nnx.clone(tiny)
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    forward = nnx.jit(lambda m, x: m(x))
    model.eval()
    np.testing.assert_array_equal(np.asarray(forward(model, x)), np.asarray(forward(model, x)))
    model.train()  # Dropout and stochastic depth now draw from the `dropout` stream.
    assert not np.allclose(np.asarray(forward(model, x)), np.asarray(forward(model, x)))


def test_bfloat16_forward_close_to_float32(tiny):
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    model = nnx.clone(tiny)
    model.eval()
    full = nnx.jit(lambda m, x: m(x))(model, x)
    # The same weights in a bfloat16-compute model.
    half_model = nnx.eval_shape(
        lambda: _tiny(use_se=True, skipinit_gain=nnx.initializers.ones, dtype=jnp.bfloat16)
    )
    nnx.update(half_model, nnx.state(model))
    half_model.eval()
    half = nnx.jit(lambda m, x: m(x))(half_model, x)
    assert half.dtype == jnp.bfloat16
    assert half_model.head.kernel[...].dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(full)))
    assert scale > 0
    np.testing.assert_allclose(
        np.asarray(half, np.float32), np.asarray(full), atol=0.05 * scale, rtol=0
    )


def test_unscaled_variant_is_the_plain_resnet():
    model = nnx.eval_shape(lambda: _tiny(scaled=False))
    paths = param_shapes(model)
    assert "blocks/0/conv0/gain" not in paths  # No weight standardization.
    assert "blocks/0/conv0/kernel" in paths
    assert model.blocks[1].beta == 1.0 and model.blocks[1].alpha == 1.0
    model = _tiny(scaled=False)
    assert float(model.blocks[1].skip_gain[...]) == 1.0


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="`variant`"):
        NFResNet(10, "ResNet51", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`widths`"):
        NFResNet(10, widths=(64, 128), depths=(1, 1, 1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`activation`"):
        NFResNet(10, activation="swishh", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`drop_rate`"):
        NFResNet(10, drop_rate=1.5, rngs=nnx.Rngs(0))


def test_width_multiplies_custom_widths_like_the_other_families():
    model = nnx.eval_shape(
        lambda: NFResNet(10, width=2, widths=(16, 32, 64), depths=(1, 1, 2), rngs=nnx.Rngs(0))
    )
    assert model.widths == (32, 64, 128)
    assert model.stem.conv.kernel.shape == (7, 7, 3, 32)  # int(16 * width)
    assert [b.stride for b in model.blocks] == [1, 2, 2, 1]
    assert model.head.kernel.shape == (128, 10)

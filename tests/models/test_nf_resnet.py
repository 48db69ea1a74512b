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

from agc_optax.models import NFResNet, create_model, load_haiku_params
from agc_optax.models.haiku_weights import haiku_to_nnx_path

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"
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


def _num_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {
        "/".join(map(str, path)): tuple(var.shape)
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


@pytest.fixture(scope="module")
def manifest() -> dict:
    path = REFERENCE / "param_manifest.json"
    if not path.exists():
        pytest.skip(f"param_manifest.json not found at {REFERENCE}")
    return json.loads(path.read_text())


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
def reference_model(small_config) -> NFResNet:
    model = _build_reference_model(small_config)
    load_haiku_params(model, REFERENCE / "nfresnet_small_params.npz")
    model.eval()
    return model


@needs_reference
def test_parity_logits_and_metrics(reference_model):
    x = jnp.asarray(np.load(REFERENCE / "input.npy"))
    want = np.load(REFERENCE / "nfresnet_small_logits.npy")
    activations = np.load(REFERENCE / "nfresnet_small_activations.npz")
    outputs = nnx.jit(lambda m, x: m.forward_features(x, return_metrics=True))(reference_model, x)
    np.testing.assert_allclose(np.asarray(outputs["logits"]), want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(reference_model(x)), want, rtol=0, atol=2e-5)
    reference_keys = {
        k.split(":", 1)[1] for k in activations.files if k.startswith("return_metrics_outputs:")
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
def test_parity_per_module_activations(reference_model):
    x = jnp.asarray(np.load(REFERENCE / "input.npy"))
    activations = np.load(REFERENCE / "nfresnet_small_activations.npz")
    forward = nnx.capture(
        lambda m, x: m.forward_features(x, return_metrics=True),
        nnx.Intermediate,
        method_outputs=nnx.Intermediate,
    )
    outputs, intermediates = forward(reference_model, x)
    captured = {path: var.get_value() for path, var in nnx.to_flat_state(intermediates)}
    checked = 0
    worst = 0.0
    for key in activations.files:
        if key.startswith("return_metrics_outputs:"):
            continue
        want = activations[key]
        got = _our_activation(key, captured, outputs)
        assert got.shape == want.shape, key
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5, err_msg=key)
        worst = max(worst, float(np.max(np.abs(got - want), initial=0.0)))
        checked += 1
    # Stem, 8 blocks x (convs, stoch depth, two outputs), the classifier and the output dict.
    assert checked == len([k for k in activations.files if not k.startswith("return_")])
    assert checked > 80
    assert worst < 2e-5


@pytest.mark.parametrize("name", sorted(MANIFEST_VARIANTS))
def test_parameter_count_and_names_match_deepmind(manifest, name):
    entry = manifest[name]
    model = nnx.eval_shape(
        lambda: NFResNet(1000, MANIFEST_VARIANTS[name], width=4, rngs=nnx.Rngs(0))
    )
    assert _num_params(model) == entry["total"]
    # Every DeepMind parameter maps onto a model leaf of the same shape, and nothing is left over.
    ours = _param_shapes(model)
    theirs = {
        haiku_to_nnx_path(f"{module}/{param}"): tuple(shape)
        for module, params in entry["params"].items()
        for param, shape in params.items()
    }
    assert theirs == ours


def test_registry_names_and_counts():
    counts = {
        "nf_resnet26": 15_995_184,
        "nf_resnet50": 25_557_048,
        "nf_resnet101": 44_549_193,
        "nf_resnet152": 60_192_858,
        "nf_resnet200": 64_673_898,
    }
    for name, count in counts.items():
        model = nnx.eval_shape(lambda name=name: create_model(name, rngs=nnx.Rngs(0)))
        assert isinstance(model, NFResNet)
        assert _num_params(model) == count, name


def _tiny(**kwargs) -> NFResNet:
    return NFResNet(
        5,
        "ResNet26",
        widths=(32, 64),
        depths=(1, 2),
        stem_width=8,
        drop_rate=0.1,
        rngs=nnx.Rngs(params=0, dropout=1),
        **kwargs,
    )


def test_jit_matches_eager_and_grad_is_finite():
    model = _tiny(use_se=True, skipinit_gain=nnx.initializers.ones)
    model.eval()
    x = jax.random.normal(jax.random.key(0), (2, 33, 33, 3))  # Odd size: asymmetric SAME pads.
    eager = model(x)
    jitted = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)

    model.train()
    labels = jnp.array([1, 3])

    def loss_fn(m):
        logits = m(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    loss, grads = nnx.jit(lambda m: nnx.value_and_grad(loss_fn)(m))(model)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads["blocks"][1]["skip_gain"][...])) > 0
    assert float(jnp.linalg.norm(grads["blocks"][0]["se"]["fc1"]["kernel"][...])) > 0


def test_train_mode_is_stochastic_and_eval_is_not():
    model = _tiny(skipinit_gain=nnx.initializers.ones, stochdepth_rate=0.9)
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
    model.train()
    assert not np.allclose(np.asarray(model(x)), np.asarray(model(x)))


def test_bfloat16_forward_close_to_float32():
    model = _tiny(skipinit_gain=nnx.initializers.ones, fc_init=nnx.initializers.lecun_normal())
    model.eval()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    full = model(x)
    half_model = _tiny(
        skipinit_gain=nnx.initializers.ones,
        fc_init=nnx.initializers.lecun_normal(),
        dtype=jnp.bfloat16,
    )
    half_model.eval()
    half = half_model(x)
    assert half.dtype == jnp.bfloat16
    assert nnx.state(half_model, nnx.Param)["head"]["kernel"][...].dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(full)))
    np.testing.assert_allclose(
        np.asarray(half, np.float32), np.asarray(full), atol=0.05 * scale, rtol=0
    )


def test_unscaled_variant_is_the_plain_resnet():
    model = _tiny(scaled=False)
    paths = _param_shapes(model)
    assert "blocks/0/conv0/gain" not in paths  # No weight standardization.
    assert "blocks/0/conv0/kernel" in paths
    assert float(model.blocks[1].skip_gain[...]) == 1.0
    assert model.blocks[1].beta == 1.0 and model.blocks[1].alpha == 1.0


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="`variant`"):
        NFResNet(10, "ResNet51", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`widths`"):
        NFResNet(10, widths=(64, 128), depths=(1, 1, 1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`activation`"):
        NFResNet(10, activation="swishh", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`drop_rate`"):
        NFResNet(10, drop_rate=1.5, rngs=nnx.Rngs(0))

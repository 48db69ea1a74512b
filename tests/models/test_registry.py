"""One config style for every family: frozen presets, names -> configs, configs build models."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agc_optax.models import (
    NFNet,
    NFNetConfig,
    NFRegNet,
    NFRegNetConfig,
    NFResNet,
    NFResNetConfig,
    ResNet,
    ResNetConfig,
    TimmNFNet,
    TimmNFNetConfig,
    create_model,
    get_config,
    list_models,
    load_haiku_params,
)
from agc_optax.models.weights import materialize_abstract_state

FAMILIES = {
    "nfnet_f0": (NFNet, NFNetConfig),
    "nf_resnet26": (NFResNet, NFResNetConfig),
    "nf_regnet_b0": (NFRegNet, NFRegNetConfig),
    "resnet50": (ResNet, ResNetConfig),
    "eca_nfnet_l0": (TimmNFNet, TimmNFNetConfig),
}


def test_every_name_is_a_frozen_config_of_a_family():
    config_types = {config_type for _, config_type in FAMILIES.values()}
    assert len(list_models()) == 42
    for name in list_models():
        config = get_config(name)
        assert type(config) in config_types, name
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.variant = "other"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_config_builds_its_family_by_name_or_by_value(name):
    model_type, _ = FAMILIES[name]
    config = get_config(name)
    by_name = nnx.eval_shape(lambda: create_model(name, 10, rngs=nnx.Rngs(0)))
    assert type(by_name) is model_type and by_name.config == config
    by_value = nnx.eval_shape(lambda: model_type(10, config, rngs=nnx.Rngs(0)))
    by_preset = nnx.eval_shape(lambda: model_type(10, config.variant, rngs=nnx.Rngs(0)))
    assert by_value.config == by_preset.config == config
    assert by_name.head.kernel.shape == by_value.head.kernel.shape


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_stage_overrides_and_config_errors_name_the_field(name):
    model_type, config_type = FAMILIES[name]
    widths = (256, 256, 512, 512)
    model = nnx.eval_shape(
        lambda: create_model(name, 10, widths=widths, depths=[1, 2, 1, 1], rngs=nnx.Rngs(0))
    )
    assert model.config.depths == (1, 2, 1, 1) and model.config.widths == widths
    assert model.config.variant == get_config(name).variant
    with pytest.raises(ValueError, match=rf"{config_type.__name__} `depths`.*like `widths`"):
        model_type(10, widths=widths, depths=(1, 1, 1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`depths`: every stage needs at least one block"):
        model_type(10, widths=widths, depths=(1, 0, 1, 1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`variant`: unknown .* variant 'X9'"):
        model_type(10, "X9", rngs=nnx.Rngs(0))


def test_haiku_loading_needs_a_family_with_haiku_names():
    for model_type in (NFNet, NFResNet, NFRegNet):
        assert model_type.haiku_names.top_level in ("NFNet", "NF_ResNet", "NF_RegNet")
    model = nnx.eval_shape(lambda: ResNet(10, depths=(1,), widths=(64,), rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"`model`: ResNet has no Haiku weight names"):
        load_haiku_params(model, {})


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(num_classes=-1), ValueError, r"`num_classes`: expected >= 0"),
        (dict(num_classes=2.5), TypeError, r"`num_classes`: expected an int"),
        (dict(num_classes=True), TypeError, r"`num_classes`: expected an int"),
        (dict(dtype="float8"), TypeError, r"`dtype`: 'float8' is not a dtype"),
        (dict(dtype="int32"), ValueError, r"`dtype`: int32 is not supported"),
        (dict(param_dtype="float8_e4m3fn"), ValueError, r"`param_dtype`: float8_e4m3fn"),
        (dict(param_dtype=None), TypeError, r"`param_dtype`: expected a float dtype"),
    ],
    ids=["negative", "float", "bool", "float8", "int32", "param float8", "param None"],
)
def test_create_model_rejects_bad_arguments_at_construction(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        create_model("nfnet_f0", **{"num_classes": 10, **kwargs}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", [None, 3, ("nfnet_f0",)])
def test_create_model_name_must_be_a_string(name):
    with pytest.raises(TypeError, match=r"`name`: expected a model name \(str\)"):
        create_model(name, 10, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", [None, "bfloat16", jnp.float16])
def test_create_model_accepts_float_dtypes(dtype):
    model = nnx.eval_shape(
        lambda: create_model("nf_regnet_b0", 10, dtype=dtype, depths=(1,) * 4, rngs=nnx.Rngs(0))
    )
    assert model.head.kernel.shape[-1] == 10


def test_scanned_nfnet_has_the_same_stage_outputs():
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), "float32")
    shapes = []
    for scan in (False, True):
        model = nnx.eval_shape(
            lambda scan=scan: create_model(
                "nfnet_f1", 10, widths=(256,) * 4, scan_blocks=scan, rngs=nnx.Rngs(0)
            )
        )
        got = nnx.eval_shape(lambda m, x: m.forward_intermediates(x), model, x)
        shapes.append({k: v.shape for k, v in got.items()})
    assert shapes[0] == shapes[1]
    assert sorted(shapes[0]) == ["features", "pool", "stages.0", "stages.1", "stages.2",
                                 "stages.3", "stem"]  # fmt: skip


def test_model_zoo_api_on_nfnet():
    """forward_features / forward_head / reset_classifier / num_features, as timm's models."""
    # Random weights filled into an abstract model: much faster than initializing eagerly.
    model = nnx.eval_shape(
        lambda: create_model("nfnet_f0", 5, widths=(256,) * 4, depths=(1,) * 4, rngs=nnx.Rngs(0))
    )
    state, rng = nnx.state(model, nnx.Param), np.random.default_rng(0)
    for _, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(0.1 * rng.standard_normal(var.shape), jnp.float32))
    nnx.update(model, state)
    materialize_abstract_state(model)
    model.eval()
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    logits, outputs, features, intermediates = nnx.jit(
        lambda m, x: (m(x), m.forward_outputs(x), m.forward_features(x), m.forward_intermediates(x))
    )(model, x)
    np.testing.assert_allclose(intermediates["features"], features, rtol=0, atol=1e-6)
    assert features.shape == (2, 1, 1, model.num_features) and model.num_features == 512
    pool = np.asarray(features, np.float64).mean(axis=(1, 2))
    np.testing.assert_allclose(outputs["pool"], pool, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.forward_head(features, pre_logits=True), pool, atol=1e-6)
    kernel = np.asarray(model.head.kernel[...], np.float64)
    want = pool @ kernel + np.asarray(model.head.bias[...])
    np.testing.assert_allclose(logits, want, atol=1e-5)
    np.testing.assert_allclose(outputs["logits"], want, atol=1e-5)
    np.testing.assert_allclose(model.forward_head(features), want, atol=1e-5)
    model.reset_classifier(0)
    assert model.head is None and model.num_classes == 0
    np.testing.assert_allclose(model.forward_head(features), pool, atol=1e-6)
    model.reset_classifier(7, rngs=nnx.Rngs(4))
    assert model.head.kernel.shape == (512, 7) and model.num_classes == 7
    np.testing.assert_array_equal(np.asarray(model.head.bias[...]), 0.0)
    with pytest.raises(ValueError, match="`num_classes`"):
        model.reset_classifier(-2)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_has_the_model_zoo_api(name):
    model = nnx.eval_shape(lambda: create_model(name, 6, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), "float32")
    features = nnx.eval_shape(lambda m, x: m.forward_features(x), model, x)
    assert features.shape == (2, 2, 2, model.num_features)
    # Backbone features: every feature_info entry keys forward_intermediates at its size.
    intermediates = nnx.eval_shape(lambda m, x: m.forward_intermediates(x), model, x)
    assert [info["reduction"] for info in model.feature_info][-3:] == [8, 16, 32]
    for info in model.feature_info:
        size = 64 // info["reduction"]
        assert intermediates[info["module"]].shape == (2, size, size, info["num_chs"]), info
    assert intermediates["pool"].shape == (2, model.num_features)
    assert model.head.kernel.shape == (model.num_features, 6)
    pre_logits = nnx.eval_shape(lambda m, f: m.forward_head(f, pre_logits=True), model, features)
    assert pre_logits.shape == (2, model.num_features)
    assert nnx.eval_shape(lambda m, f: m.forward_head(f), model, features).shape == (2, 6)
    # num_classes=0 (timm's convention): no classifier, the output is the pooled features.
    headless = nnx.eval_shape(lambda: create_model(name, 0, rngs=nnx.Rngs(0)))
    assert headless.head is None and headless.num_features == model.num_features
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(headless))]
    assert not any(p.startswith("head") for p in paths)
    out = nnx.eval_shape(lambda m, f: m.forward_head(f), headless, features)
    assert out.shape == (2, model.num_features)

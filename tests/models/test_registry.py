"""One config style for every family: frozen presets, names -> configs, configs build models."""

from __future__ import annotations

import dataclasses

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
    create_model,
    get_config,
    list_models,
    load_haiku_params,
)

FAMILIES = {
    "nfnet_f0": (NFNet, NFNetConfig),
    "nf_resnet26": (NFResNet, NFResNetConfig),
    "nf_regnet_b0": (NFRegNet, NFRegNetConfig),
    "resnet50": (ResNet, ResNetConfig),
}


def test_every_name_is_a_frozen_config_of_a_family():
    config_types = {config_type for _, config_type in FAMILIES.values()}
    assert len(list_models()) == 31
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

"""Training builds the NF families with ``canonical_conv_grads=True`` unless ``--model-arg``
says otherwise; evaluation keeps the model's default."""

from __future__ import annotations

import pytest

from agc_optax.models import CanonicalGradWSConv, WSConv
from agc_optax.training import PRESETS, recipe
from agc_optax.training.config import parse_model_args

# Small stages: building the abstract model is all these tests compile.
SMALL = {"depths": (1, 1, 1, 1)}


def _conv_classes(model) -> set[type]:
    from flax import nnx

    return {type(m) for _, m in nnx.iter_graph(model) if isinstance(m, WSConv)}


@pytest.mark.parametrize(
    "model, model_args, want",
    [
        ("nfnet_f0", [], CanonicalGradWSConv),  # the trainer's default
        ("nf_resnet26", ["canonical_conv_grads=false"], WSConv),  # the user's word wins
        ("nf_regnet_b0", ["canonical_conv_grads=True"], CanonicalGradWSConv),
    ],
)
def test_training_builds_canonical_convs_unless_told_not_to(model, model_args, want):
    overrides = SMALL | parse_model_args(model_args)
    config = PRESETS["smoke"].replace(model=model, model_overrides=overrides)
    _, abstract = recipe.model_builder(config, 10)
    assert _conv_classes(abstract) == {want}
    assert abstract.canonical_conv_grads is (want is CanonicalGradWSConv)


def test_only_models_that_take_the_option_get_it():
    assert recipe.training_model_defaults("dm_nfnet_f0") == {"canonical_conv_grads": True}
    assert recipe.training_model_defaults("resnet50") == {}  # batch-norm ResNet: no WSConv
    config = PRESETS["smoke"].replace(model="resnet50", model_overrides=SMALL)
    _, abstract = recipe.model_builder(config, 10)  # builds: no keyword it does not take
    assert not hasattr(abstract, "canonical_conv_grads")

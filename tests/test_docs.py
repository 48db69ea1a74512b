"""The docstring examples of the public API run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "agc_optax.clipping",
    "agc_optax.unit_axes",
    "agc_optax.optimizers",
    "agc_optax.models.registry",
    "agc_optax.models.layers",
    "agc_optax.models.nfnet",
    "agc_optax.models.haiku_weights",
    "agc_optax.models.nf_resnet",
    "agc_optax.models.nf_regnet",
    "agc_optax.models.resnet",
    "agc_optax.spp",
    "agc_optax.adagc",
    "agc_optax.zclip",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_public_api_is_documented():
    import agc_optax

    for name in agc_optax.__all__:
        obj = getattr(agc_optax, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name

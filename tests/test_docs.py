"""The docstring examples of the public API run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import agc_optax

# Every module of the package, so a module that moves keeps its examples tested.
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(agc_optax.__path__, prefix="agc_optax.")
    if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_public_api_is_documented():
    for name in agc_optax.__all__:
        obj = getattr(agc_optax, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name

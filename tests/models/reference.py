"""Where DeepMind's reference data lives for the model tests, and small helpers over it."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

#: ``<repo>/../shared/reference`` (the same place in CI).
REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"


def reference_file(name: str) -> Path:
    """The path of a reference file, or a skip naming where it was looked for."""
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference data {name} not found under {REFERENCE}")
    return path


def load_manifest() -> dict:
    """DeepMind's parameter manifest: ``{model: {"total", "params", ...}}``."""
    return json.loads(reference_file("param_manifest.json").read_text())


def num_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {
        "/".join(map(str, path)): tuple(var.shape)
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }

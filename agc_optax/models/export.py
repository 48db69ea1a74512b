"""A model as a serialized inference function (``jax.export``), runnable without this package.

`export` traces the model in eval mode on images ``(batch, resolution, resolution, 3)`` (NHWC,
already normalised, float32), with the weights embedded as constants, and writes the serialized
StableHLO. The batch dimension is symbolic unless ``batch_size`` is given, so one file serves any
batch size. Anyone with JAX loads it with ``jax.export.deserialize(data).call(images)``: no Flax,
no model classes (`load_exported` is that one line).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def export(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    batch_size: int | None = None,
    resolution: int,
    dtype: Any = jnp.float32,
    platforms: Sequence[str] | None = None,
) -> jax.export.Exported:
    """Writes ``model``'s inference function (logits, or pooled features without a head).

    Args:
      model: any model of this package (or an NNX module taking NHWC images); it is not
        modified (a copy runs in eval mode).
      path: the file to write (``.jax`` by convention), overwritten if present.
      batch_size: a fixed batch size, or ``None`` for a symbolic (any-size) batch dimension.
      resolution: the image side in pixels (use ``default_config(name).test_resolution``).
      dtype: the input dtype.
      platforms: backends to compile for, e.g. ``("cpu", "cuda")`` (default: this machine's).

    Returns:
      The ``jax.export.Exported`` that was written.

    Raises:
      ValueError: for a non-positive ``batch_size`` or ``resolution``.

    Example:
      >>> import tempfile, os
      >>> import numpy as np
      >>> from flax import nnx
      >>> from agc_optax.models import create_model, export
      >>> model = create_model("nf_resnet26", 3, depths=(1, 1, 1, 1),
      ...                      widths=(8, 8, 8, 8), rngs=nnx.Rngs(0))
      >>> path = os.path.join(tempfile.mkdtemp(), "model.jax")
      >>> _ = export(model, path, resolution=32)
      >>> restored = jax.export.deserialize(open(path, "rb").read())
      >>> restored.call(np.zeros((5, 32, 32, 3), np.float32)).shape
      (5, 3)
    """
    try:
        import flatbuffers  # noqa: F401  (what jax.export's serialization needs)
    except ImportError as e:
        raise ImportError(
            "export writes jax.export's serialization, which needs `flatbuffers`: "
            "pip install 'agc_optax[export]'"
        ) from e
    for value, argument in ((batch_size, "batch_size"), (resolution, "resolution")):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"`{argument}`: expected a positive int, got {value!r}")
    graphdef, state = nnx.split(nnx.clone(model))
    inference = nnx.merge(graphdef, state)
    inference.eval()
    graphdef, state = nnx.split(inference)

    def forward(images: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(images)

    if batch_size is None:
        (batch,) = jax.export.symbolic_shape("batch")
    else:
        batch = int(batch_size)
    spec = jax.ShapeDtypeStruct((batch, int(resolution), int(resolution), 3), dtype)
    exporter = jax.export.export(
        jax.jit(forward), platforms=tuple(platforms) if platforms else None
    )
    exported = exporter(spec)
    Path(path).write_bytes(exported.serialize())
    return exported


def load_exported(path: str | os.PathLike) -> jax.export.Exported:
    """Reads a file written by `export`: call it as ``load_exported(path).call(images)``.

    Only ``jax`` is needed to do the same: ``jax.export.deserialize(open(path, "rb").read())``.
    """
    return jax.export.deserialize(bytearray(Path(path).read_bytes()))

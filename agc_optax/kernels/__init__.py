"""Optional Pallas kernels behind the optimizers' ``implementation=`` argument.

``agc_optax.sgd_agc(..., implementation="pallas")`` runs the fused kernel of
:mod:`._sgd_agc_pallas` on every leaf whose units lie on its last axis; ``"auto"`` does so on a
single GPU or TPU only. On CPU the kernels run in Pallas interpret mode (correct, slow), which is
how they are tested. This module only decides which implementation runs: Pallas itself
(``jax.experimental.pallas``) is imported the first time a Pallas implementation is selected.
"""

from __future__ import annotations

import jax

IMPLEMENTATIONS = ("xla", "pallas", "auto")

#: Run kernels in Pallas interpret mode: ``None`` (default) interprets on CPU and compiles on GPU
#: and TPU; ``True`` forces interpret mode everywhere (debugging).
INTERPRET: bool | None = None

#: Leaves with fewer elements take the XLA path: a kernel launch and the partial-sum round trip
#: cost more than they save on small leaves (biases, gains, the stem conv).
MIN_SIZE = 1 << 16


def check_implementation(implementation: str) -> str:
    """Validates an ``implementation`` argument (``"xla"``, ``"pallas"`` or ``"auto"``)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"`implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}."
        )
    return implementation


def resolve_implementation(
    implementation: str, backend: str | None = None, num_devices: int | None = None
) -> str:
    """``"xla"`` or ``"pallas"``: what ``implementation`` means on ``backend``.

    ``"auto"`` picks Pallas on a single GPU or TPU and XLA elsewhere: on CPU Pallas only
    interprets, which is correct but far slower than XLA; and with several devices the
    parameters may be sharded, and XLA cannot partition a Pallas call, so it would gather
    every sharded leaf onto each device (the XLA path computes unit norms shard-locally).
    ``"pallas"`` forces the kernels, e.g. for replicated parameters on several devices.

    Args:
      implementation: ``"xla"``, ``"pallas"`` or ``"auto"``.
      backend: a platform name; ``None`` means ``jax.default_backend()``.
      num_devices: devices of that backend; ``None`` means ``jax.device_count()``.

    Returns:
      ``"xla"`` or ``"pallas"``.
    """
    check_implementation(implementation)
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    num_devices = jax.device_count() if num_devices is None else num_devices
    accelerator = backend in ("gpu", "cuda", "rocm", "tpu")
    return "pallas" if accelerator and num_devices == 1 else "xla"


def use_pallas(implementation: str) -> bool:
    """Whether ``implementation`` runs the Pallas kernels on the default backend."""
    return resolve_implementation(implementation) == "pallas"


__all__ = ["IMPLEMENTATIONS", "INTERPRET", "MIN_SIZE", "resolve_implementation"]

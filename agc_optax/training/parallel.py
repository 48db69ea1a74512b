"""Data parallelism: a `data` mesh axis for `jax.jit`, the `jax.pmap` alternative, multi-host.

With ``jit`` the batch is a global ``jax.Array`` sharded over the ``data`` axis and the parameters
are replicated; the mean over the global batch in the loss makes XLA insert the single
all-reduce of the gradients. With ``pmap`` each device sees its shard and the step averages the
gradients once with ``lax.pmean``. Either way AGC then acts on the averaged gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
PARALLEL_MODES = ("jit", "pmap")


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Joins a multi-process (multi-host) run; call before any other JAX use.

    Args:
      coordinator: ``host:port`` of process 0.
      num_processes: total number of processes.
      process_id: this process, in ``[0, num_processes)``.
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(f"`--process-id` {process_id} not in [0, {num_processes})")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


def make_mesh(devices: list[Any] | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over all (global) devices."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data``, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, mode: str) -> None:
    """Raises ``ValueError`` unless the global batch splits evenly over the devices."""
    count = jax.device_count()
    if global_batch_size % count:
        raise ValueError(
            f"`--batch-size` {global_batch_size} is not divisible by the {count} devices "
            f"(`--parallel {mode}`); use a multiple of {count}"
        )


def global_batch(mesh: Mesh, local: Any) -> Any:
    """Assembles the global batch from each process's local rows (a pytree of numpy arrays)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Places a host pytree (identical on every process) replicated on the mesh."""
    sharding = replicated_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


# --- pmap --------------------------------------------------------------------------------------


def pmap_batch(local: Any) -> Any:
    """Splits this process's rows into ``(local_device_count, rows_per_device, ...)``."""
    n = jax.local_device_count()
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), local)


def pmap_replicate(tree: Any) -> Any:
    """One copy of a pytree per local device, laid out for ``jax.pmap``."""
    devices = jax.local_devices()
    sharding = NamedSharding(Mesh(np.asarray(devices), (DATA_AXIS,)), PartitionSpec(DATA_AXIS))
    return jax.tree.map(
        lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree
    )


def pmap_unreplicate(tree: Any) -> Any:
    """The first device's copy of a pmap-replicated pytree, as host numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def to_host(tree: Any) -> Any:
    """A replicated global pytree as host numpy arrays (works on every process)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree)

"""Data parallelism: a `data` mesh axis for `jax.jit`, the `jax.pmap` alternative, multi-host.

With ``jit`` the batch is a global ``jax.Array`` sharded over the ``data`` axis and the state is
replicated; the mean over the global batch in the loss makes XLA insert the single all-reduce of
the gradients. With ``pmap`` each device sees its shard and the step averages the gradients once
with ``lax.pmean``. Either way AGC then acts on the averaged gradients.

A :class:`Placement` hides which of the two a run uses: it creates the state where it lives,
splits batches, compiles steps and hands back host copies. Checkpoints always hold the ``jit``
layout (replicated global arrays), so a run may resume under the other mode.
"""

from __future__ import annotations

from collections.abc import Callable
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


def make_placement(mode: str, devices: list[Any] | None = None) -> Placement:
    """The :class:`Placement` of ``--parallel mode`` over ``devices`` (all global devices)."""
    mesh = Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))
    return {"jit": Placement, "pmap": PmapPlacement}[mode](mesh)


class Placement:
    """``jit``: the state replicated over a 1-D ``data`` mesh, each batch split along it.

    Attributes:
      mode: the ``--parallel`` value.
      pmap: whether steps run under ``jax.pmap`` (they then reduce over ``data`` themselves).
      mesh: the mesh of all (global) devices.
    """

    mode = "jit"
    pmap = False

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, PartitionSpec())

    def check_batch_size(self, global_batch_size: int) -> None:
        """Raises ``ValueError`` unless the global batch splits evenly over the devices."""
        count = self.mesh.size
        if global_batch_size % count:
            raise ValueError(
                f"`--batch-size` {global_batch_size} is not divisible by the {count} devices "
                f"(`--parallel {self.mode}`); use a multiple of {count}"
            )

    def abstract(self, init: Callable[[], Any]) -> Any:
        """The shapes, dtypes and (replicated) shardings of ``init()``, computing nothing."""
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
            jax.eval_shape(init),
        )

    def init(self, init: Callable[[], Any]) -> Any:
        """Runs ``init`` once, its outputs created in place on every device."""
        return self.place(jax.jit(init, out_shardings=self.replicated)())

    def place(self, replicated: Any) -> Any:
        """This placement's layout of a replicated state (as restored from a checkpoint)."""
        return replicated

    def replicate(self, state: Any) -> Any:
        """The state as replicated global arrays, the layout checkpoints hold."""
        return state

    def shard(self, local: Any) -> Any:
        """The global batch from each process's own rows (a pytree of numpy arrays)."""
        sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)

    def compile(self, fn: Callable[..., Any], *, donate_argnums: int | tuple[int, ...] = ()):
        """``fn`` compiled for this placement; arguments placed, results replicated."""
        return jax.jit(fn, donate_argnums=donate_argnums, out_shardings=self.replicated)

    def to_host(self, tree: Any) -> Any:
        """One copy of a placed pytree as host numpy arrays (works on every process)."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree)


class PmapPlacement(Placement):
    """``pmap``: one copy of the state per local device, stacked on a leading axis.

    The copies are views of the replicated arrays' per-device buffers: converting to and from the
    checkpoint layout moves nothing through the host.
    """

    mode = "pmap"
    pmap = True

    def __init__(self, mesh: Mesh):
        super().__init__(mesh)
        local = Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))
        self.stacked = NamedSharding(local, PartitionSpec(DATA_AXIS))

    def place(self, replicated: Any) -> Any:
        n = len(self.stacked.mesh.devices)

        def stack(x: jax.Array) -> jax.Array:
            buffers = [s.data[None] for s in x.addressable_shards]
            return jax.make_array_from_single_device_arrays((n, *x.shape), self.stacked, buffers)

        return jax.tree.map(stack, replicated)

    def replicate(self, state: Any) -> Any:
        def unstack(x: jax.Array) -> jax.Array:
            buffers = [s.data[0] for s in x.addressable_shards]
            return jax.make_array_from_single_device_arrays(x.shape[1:], self.replicated, buffers)

        return jax.tree.map(unstack, state)

    def shard(self, local: Any) -> Any:
        """This process's rows as ``(local_device_count, rows_per_device, ...)``."""
        n = len(self.stacked.mesh.devices)
        return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), local)

    def compile(self, fn: Callable[..., Any], *, donate_argnums: int | tuple[int, ...] = ()):
        return jax.pmap(fn, axis_name=DATA_AXIS, donate_argnums=donate_argnums)

    def to_host(self, tree: Any) -> Any:
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)

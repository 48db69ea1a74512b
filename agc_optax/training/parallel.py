"""Data parallelism: a `data` mesh axis for `jax.jit`, the `jax.pmap` alternative, multi-host.

With ``jit`` the batch is a global ``jax.Array`` sharded over the ``data`` axis and the state is
replicated; the mean over the global batch in the loss makes XLA insert the single all-reduce of
the gradients. With ``pmap`` each device sees its shard and the step averages the gradients once
with ``lax.pmean``. Either way AGC then acts on the averaged gradients.

``--shard-params`` (``jit`` only) splits the parameters, optimizer state and EMA over the same
``data`` axis, FSDP style (:func:`fsdp_spec`): each device holds about ``1/n`` of the state, and
XLA gathers a layer's weights when the step needs them and reduce-scatters its gradients. AGC
needs nothing of its own for this: a unit norm over a split axis is an ordinary reduction that
XLA completes across the shards, so the numbers are those of the replicated run up to the
order of float additions.

A :class:`Placement` hides which layout a run uses: it creates the state where it lives, splits
batches, compiles steps and hands back host copies. Checkpoints hold global arrays whatever the
layout (orbax writes each shard from its device), so a run may resume under any other layout.
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


def make_placement(
    mode: str, devices: list[Any] | None = None, *, shard_params: bool = False
) -> Placement:
    """The :class:`Placement` of ``--parallel mode`` over ``devices`` (all global devices).

    ``shard_params`` (``--shard-params``) gives :class:`ShardedPlacement`: the state split over
    the devices. It needs ``mode="jit"`` (``pmap`` runs one whole copy per device).
    """
    mesh = Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))
    if shard_params:
        if mode != "jit":
            raise ValueError(
                f"`--shard-params` splits the state over the `jit` mesh; it cannot be combined "
                f"with `--parallel {mode}` (use `--parallel jit`)"
            )
        return ShardedPlacement(mesh)
    return {"jit": Placement, "pmap": PmapPlacement}[mode](mesh)


def fsdp_spec(shape: tuple[int, ...], num_devices: int, axis: str = DATA_AXIS) -> PartitionSpec:
    """Where FSDP puts one leaf: split along its largest dimension divisible by ``num_devices``
    (the last such on ties), else replicated.

    Ties go to the last dimension because the weights' layouts (HWIO convolutions, ``(in, out)``
    dense kernels) keep their output units there: AGC's unit norms then stay within a shard.

    >>> fsdp_spec((3, 3, 64, 128), 8)
    P(None, None, None, 'data')
    >>> fsdp_spec((256, 256), 8)
    P(None, 'data')
    >>> fsdp_spec((1000, 3, 3), 8)  # 1000 = 8 * 125
    P('data',)
    >>> fsdp_spec((10,), 8), fsdp_spec((), 8)  # nothing divisible: one copy per device
    (P(), P())
    """
    candidates = [(size, i) for i, size in enumerate(shape) if size % num_devices == 0]
    if not candidates:
        return PartitionSpec()
    _, split = max(candidates)
    return PartitionSpec(*([None] * split), axis)


def fsdp_shardings(abstract: Any, mesh: Mesh) -> Any:
    """:func:`fsdp_spec` of every leaf of ``abstract`` (arrays or ``jax.eval_shape`` output) as
    ``NamedSharding`` objects on ``mesh``'s ``data`` axis: the same shape always gets the same
    layout, so parameters, their optimizer moments and their EMA are split alike."""
    n = mesh.shape[DATA_AXIS]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n)), abstract)


def bytes_per_device(tree: Any) -> int:
    """Bytes of ``tree`` one device holds: arrays, or ``jax.ShapeDtypeStruct`` with shardings.

    >>> bytes_per_device({"w": jax.ShapeDtypeStruct((4, 8), np.float32, sharding=None)})
    128
    """

    def nbytes(x: Any) -> int:
        sharding = getattr(x, "sharding", None)
        shape = x.shape if sharding is None else sharding.shard_shape(x.shape)
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize

    return sum(nbytes(x) for x in jax.tree.leaves(tree))


class Placement:
    """``jit``: the state replicated over a 1-D ``data`` mesh, each batch split along it.

    Attributes:
      mode: the ``--parallel`` value.
      pmap: whether steps run under ``jax.pmap`` (they then reduce over ``data`` themselves).
      mesh: the mesh of all (global) devices.
    """

    mode = "jit"
    pmap = False
    shard_params = False

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, PartitionSpec())

    def state_shardings(self, abstract: Any) -> Any:
        """Where each leaf of a state with these shapes lives (a sharding or a prefix of them)."""
        return self.replicated

    def check_batch_size(self, global_batch_size: int) -> None:
        """Raises ``ValueError`` unless the global batch splits evenly over the devices."""
        count = self.mesh.size
        if global_batch_size % count:
            raise ValueError(
                f"`--batch-size` {global_batch_size} is not divisible by the {count} devices "
                f"(`--parallel {self.mode}`); use a multiple of {count}"
            )

    def abstract(self, init: Callable[[], Any]) -> Any:
        """The shapes, dtypes and shardings of ``init()``, computing nothing."""
        shapes = jax.eval_shape(init)
        shardings = jax.tree.broadcast(self.state_shardings(shapes), shapes)
        return jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            shapes,
            shardings,
        )

    def init(self, init: Callable[[], Any]) -> Any:
        """Runs ``init`` once, each output created in place on its devices."""
        shardings = self.state_shardings(jax.eval_shape(init))
        return self.place(jax.jit(init, out_shardings=shardings)())

    def place(self, replicated: Any) -> Any:
        """This placement's layout of a replicated state (as restored from a checkpoint)."""
        return replicated

    def replicate(self, state: Any) -> Any:
        """The state as global arrays (replicated or split), the form checkpoints take."""
        return state

    def shard(self, local: Any) -> Any:
        """The global batch from each process's own rows (a pytree of numpy arrays)."""
        sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)

    def compile(
        self,
        fn: Callable[..., Any],
        *,
        donate_argnums: int | tuple[int, ...] = (),
        output_layout: Callable[[Any, NamedSharding], Any] | None = None,
    ):
        """``fn`` compiled for this placement; arguments placed, results replicated.

        ``output_layout``: where ``fn``'s results live, given the state's layout (a state of
        shardings) and the replicated sharding; e.g. ``lambda state, replicated: (state,
        replicated)`` for a step that returns ``(state, metrics)``, whose new state keeps the
        state's layout. Only a placement that splits the state reads it: every other one
        replicates all results.

        Every input stays an input of the program, read or not (``keep_unused``): ``jit`` pairs
        donated inputs with outputs of the same shape in order, and a dropped input (the last
        step's AGC statistics) shifted every later same-shaped leaf onto its neighbour's
        buffer, which XLA then copied each step (the EMA's scalar gains of NF-ResNet-50).
        """
        return jax.jit(
            fn,
            donate_argnums=donate_argnums,
            keep_unused=True,
            out_shardings=self.replicated,
        )

    def to_host(self, tree: Any) -> Any:
        """One copy of a placed pytree as host numpy arrays (works on every process)."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree)


class ShardedPlacement(Placement):
    """``jit`` with ``--shard-params``: parameters, optimizer state and EMA split FSDP style.

    Each leaf is split over the ``data`` axis as :func:`fsdp_spec` says, so a device holds about
    ``1/n`` of the state (leaves with no dimension divisible by ``n``, such as the step counter
    and odd-sized biases, stay whole); the batch is split as in :class:`Placement`.
    """

    shard_params = True

    def __init__(self, mesh: Mesh):
        super().__init__(mesh)
        self._state_layout: Any = None

    def state_shardings(self, abstract: Any) -> Any:
        self._state_layout = fsdp_shardings(abstract, self.mesh)
        return self._state_layout

    def compile(
        self,
        fn: Callable[..., Any],
        *,
        donate_argnums: int | tuple[int, ...] = (),
        output_layout: Callable[[Any, NamedSharding], Any] | None = None,
    ):
        if output_layout is None:
            return super().compile(fn, donate_argnums=donate_argnums)
        if self._state_layout is None:
            raise RuntimeError("create or restore the state (`init`, `abstract`) before `compile`")
        return jax.jit(
            fn,
            donate_argnums=donate_argnums,
            keep_unused=True,  # as in Placement.compile
            out_shardings=output_layout(self._state_layout, self.replicated),
        )

    def to_host(self, tree: Any) -> Any:
        """Whole host copies; split leaves are gathered (across processes: every process must
        call this, in the same order, as with any collective)."""

        def host(x: jax.Array) -> np.ndarray:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_shards[0].data)
            if x.is_fully_addressable:
                return np.asarray(x)
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))

        return jax.tree.map(host, tree)


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

    def compile(
        self,
        fn: Callable[..., Any],
        *,
        donate_argnums: int | tuple[int, ...] = (),
        output_layout: Callable[[Any, NamedSharding], Any] | None = None,
    ):
        return jax.pmap(fn, axis_name=DATA_AXIS, donate_argnums=donate_argnums)

    def to_host(self, tree: Any) -> Any:
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)

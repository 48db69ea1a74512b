"""Orbax checkpoints of the train state, with fallback on corruption.

A checkpoint is one orbax step directory holding two items: ``state`` (the :class:`TrainState`
pytree: step, params, batch statistics, optimizer state, EMA) and ``meta`` (JSON: step, the state's
leaf shapes, the config it was written with). The directory is named after the state's own ``step``,
the run's one step counter; the data position follows from it. Orbax finalises a step directory only
after every file is written, so a run killed mid-save leaves an unfinished temporary directory that
is never listed; a finished but damaged step (a truncated or deleted file) fails to restore, and
:meth:`Checkpointer.restore_latest` then warns and falls back to the previous step.

Nothing good is lost: a state holding a NaN or Inf is never written, and old checkpoints are
deleted only once a newer one is known to be committed, so a failed write (a full disk) leaves
every earlier checkpoint in place and is reported as a :class:`CheckpointWriteError`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class CheckpointWarning(UserWarning):
    """A checkpoint could not be restored and an older one is used instead."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that does not fit the run (other model, optimizer or batch size)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, lost permission); earlier ones are intact.

    Attributes:
      step: the checkpoint that failed.
      directory: the checkpoint directory.
      reason: the cause in words, e.g. ``No space left on device``.
    """

    def __init__(self, step: int, directory: str, reason: str, kept: list[int]):
        self.step, self.directory, self.reason = step, directory, reason
        intact = (
            f"the earlier checkpoints (steps {', '.join(map(str, kept))}) are intact"
            if kept
            else "no earlier checkpoint exists"
        )
        super().__init__(f"cannot write checkpoint {step} to `{directory}`: {reason}; {intact}")


class Checkpointer:
    """Saves and restores the train state under one directory.

    Args:
      directory: where step directories go; created if missing.
      max_to_keep: how many recent checkpoints survive (at least 2, so a fallback exists).
        Older ones are deleted here, only after a newer save is committed (orbax would delete
        them when the new save starts, before knowing whether it will succeed).
      async_save: write in a background thread while training continues.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.max_to_keep = max(2, max_to_keep)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )
        self._pending: int | None = None  # a save started but not yet known to be committed
        self._failed = False
        # A failed background write leaves orbax's event-loop callbacks and write coroutines
        # behind; the CheckpointWriteError says what happened, they add only tracebacks.
        _silence_closed_loop_callbacks()

    def steps(self) -> list[int]:
        """The finished checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, state: Any, config: dict[str, Any]) -> bool:
        """Writes a checkpoint of ``state`` at its ``step`` (asynchronously when enabled).

        All processes call it. ``state`` is a :class:`TrainState` of replicated global arrays;
        ``config`` the run's JSON config, checked on restore.

        Returns:
          ``True`` when the save started; ``False`` (with a :class:`CheckpointWarning` naming the
          first bad leaf) when a leaf holds a NaN or Inf: such a state is never written.

        Raises:
          CheckpointWriteError: this save, or the previous asynchronous one, failed.
        """
        step = int(np.asarray(state.step.addressable_shards[0].data))
        bad = nonfinite_leaves(state)
        if bad:
            newest = self.steps()
            warnings.warn(
                f"not writing checkpoint {step}: `{bad[0]}` holds NaN or Inf "
                f"({len(bad)} leaves in all); the newest finite checkpoint is "
                + (f"step {newest[-1]}" if newest else "none"),
                CheckpointWarning,
                stacklevel=2,
            )
            return False
        self._commit_pending()
        meta = {"step": step, "signature": _signature(state), "config": config}
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        except Exception as e:  # the synchronous part: directories, metadata, host copies
            self._fail(step, e)
        self._pending = step
        return True

    def _commit_pending(self) -> None:
        """Waits for the pending save; then deletes what falls out of ``max_to_keep``."""
        step, self._pending = self._pending, None
        if step is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._fail(step, e)
        self._manager.reload()
        committed = self.steps()
        if step not in committed:
            self._fail(step, RuntimeError("the write did not complete"))
        for old in committed[: -self.max_to_keep]:
            self._manager.delete(old)

    def _fail(self, step: int, error: BaseException) -> None:
        self._failed = True
        self._manager.reload()
        kept = [s for s in self.steps() if s != step]
        raise CheckpointWriteError(step, self.directory, _reason(error), kept) from error

    def restore_latest(self, target: Any, *, require: Mapping[str, Any] | None = None) -> Any:
        """Restores the newest checkpoint that reads back whole.

        Args:
          target: a state pytree (arrays or ``jax.ShapeDtypeStruct`` with shardings) giving the
            structure, shapes, dtypes and placement to restore into.
          require: config fields the checkpoint must have been written with, e.g. the batch
            size, on which the data order at a given step depends.

        Returns:
          The state (its ``step`` says where the run stands), or ``None`` when there is no usable
          checkpoint. Each damaged checkpoint skipped on the way emits a
          :class:`CheckpointWarning`.

        Raises:
          CheckpointMismatchError: the newest readable checkpoint holds another model or
            optimizer state, or differs from ``require``.
        """
        abstract = jax.tree.map(_abstract, target)
        signature = _signature(target)
        # Before the first read: a damaged step's stray callbacks can fire on tensorstore's
        # threads before the failed restore returns here (a traceback seen once in CI).
        _silence_closed_loop_callbacks()
        for step in reversed(self.steps()):
            try:
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                ).meta
                if meta is None or int(meta["step"]) != step:
                    raise ValueError("metadata missing or for another step")
                # A run without EMA may resume from one that kept it: read the EMA, drop it.
                into, drop_ema = abstract, _holds_ema(meta) and _without_ema(abstract)
                if drop_ema:
                    into = abstract._replace(ema_params=abstract.params)
                wanted = _signature(into) if drop_ema else signature
                problem = _mismatch(meta, wanted, require or {})
                if problem and _holds_ema(_signature(abstract)) and not _holds_ema(meta):
                    problem = "was written without an EMA of the weights (`--ema 0`)"
                if problem:  # readable but not this run's: falling back would hide the mistake
                    raise CheckpointMismatchError(
                        f"checkpoint {step} in `{self.directory}` {problem}; resume with the "
                        "flags it was written with, or use a new `--run-dir`"
                    )
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(into))
                )
            except CheckpointMismatchError:
                raise
            except Exception as e:  # any failure to read means this step is unusable
                warnings.warn(
                    f"checkpoint {step} in `{self.directory}` is unreadable "
                    f"({type(e).__name__}: {_first_line(e)}); falling back to an earlier one",
                    CheckpointWarning,
                    stacklevel=2,
                )
                self._set_aside(step)
                continue
            return restored.state._replace(ema_params=None) if drop_ema else restored.state
        return None

    def _set_aside(self, step: int) -> None:
        """Renames an unreadable step out of the way (kept for inspection, never listed again).

        Without this the resumed run could not save that step number again.
        """
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst = f"{src}.unreadable"
            suffix = 1
            while os.path.exists(dst):
                dst, suffix = f"{src}.unreadable{suffix}", suffix + 1
            os.rename(src, dst)
        _sync("agc_optax_checkpoint_set_aside")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed.

        Raises:
          CheckpointWriteError: the pending save failed.
        """
        self._commit_pending()

    def close(self) -> None:
        """Waits for pending saves and releases the manager.

        Raises:
          CheckpointWriteError: the pending save failed (the manager is released anyway).
        """
        try:
            if not self._failed:
                self._commit_pending()
        finally:
            try:
                self._manager.close()
            except Exception:
                if not self._failed:  # after a reported failure orbax repeats the same error
                    raise


def _silence_closed_loop_callbacks() -> None:
    """Drops the errors a failed orbax restore leaves behind, once the warning has been given.

    When one array of a damaged checkpoint fails to read, orbax closes its event loop while
    tensorstore still completes reads of the other arrays: each completion reports
    ``RuntimeError('Event loop is closed')`` through ``sys.unraisablehook`` (as does a failed
    write, whose pending write coroutines are reported again at exit), and the read tasks
    that failed are logged by asyncio ("Task exception was never retrieved") whenever the garbage
    collector meets them, one traceback per array. They carry no information beyond the warning
    already given, so only they are dropped.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_agc_optax_filter", False):
        return

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        # Write coroutines of a failed save, collected when the interpreter shuts down.
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    hook._agc_optax_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_drop_orphaned_orbax_reads)


def _drop_orphaned_orbax_reads(record: logging.LogRecord) -> bool:
    """False for asyncio's report of an orbax read or write task whose failure nobody awaited."""
    if "exception was never retrieved" not in str(record.msg).partition("\n")[0]:
        return True
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return False
        tb = tb.tb_next
    return True


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_checkpoint(directory: str, step: int | None = None) -> tuple[dict[str, Any], int]:
    """Reads a checkpoint's state as host numpy arrays without knowing its structure.

    For inspection and tests; training resumes through :meth:`Checkpointer.restore_latest`.

    Args:
      directory: the checkpoint directory (relative or absolute).
      step: which step; the newest when ``None``.

    Returns:
      ``(state, step)``, on the host whatever topology wrote it, where ``state`` is a nested
      dict with keys ``step``, ``params``, ``batch_stats``, ``opt_state`` and ``ema_params``
      (``None`` when the run kept no EMA).
    """
    directory = os.path.abspath(directory)  # orbax reads absolute paths only
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    if not steps:
        raise FileNotFoundError(f"no checkpoints in `{directory}`")
    step = steps[-1] if step is None else step
    path = os.path.join(directory, str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # "Metadata file does not exist" of the item: expected
    try:
        saved = checkpointer.metadata(path).item_metadata
    finally:
        absl_logger.setLevel(level)
    # Onto one local device, whatever the topology that wrote it (several processes, pmap).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    state = jax.tree.map(np.asarray, checkpointer.restore(path, target))
    return state, step


def _signature(tree: Any) -> dict[str, list[Any]]:
    """Leaf path -> [shape..., dtype]: enough to tell whether a checkpoint fits a state."""
    return {
        jax.tree_util.keystr(path): [*map(int, leaf.shape), str(leaf.dtype)]
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _holds_ema(meta_or_signature: dict[str, Any]) -> bool:
    """Whether a checkpoint's metadata (or a state's signature) has EMA leaves."""
    signature = meta_or_signature.get("signature", meta_or_signature)
    return any(path.startswith(".ema_params") for path in signature or {})


def _without_ema(target: Any) -> bool:
    """Whether ``target`` is a train state that keeps no EMA (``ema_params`` is ``None``)."""
    return hasattr(target, "_replace") and getattr(target, "ema_params", False) is None


def _mismatch(meta: dict[str, Any], signature: dict[str, Any], require: Mapping[str, Any]) -> str:
    """Why a checkpoint's metadata does not fit this run; empty when it does."""
    if meta.get("signature") != signature:
        diff = _diff(meta.get("signature") or {}, signature)
        return (
            f"holds a different model or optimizer state ({diff}), or was written by an "
            "agc_optax version whose state had another layout"
        )
    saved = meta.get("config") or {}
    for name, value in require.items():
        if saved.get(name) != value:
            return f"was written with `--{name.replace('_', '-')}` {saved.get(name)}, not {value}"
    return ""


def _diff(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    changed = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    for what, keys in (("missing", missing), ("unexpected", extra), ("other shape", changed)):
        if keys:
            return f"{len(keys)} {what} leaves, first `{keys[0]}`"
    return "no difference"


def _abstract(x: Any) -> Any:
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths (``jax.tree_util.keystr``) of the floating-point leaves holding a NaN or Inf.

    One jitted reduction per leaf, one small transfer to the host; every process of a
    multi-process run computes the same answer from the replicated state.

    >>> nonfinite_leaves({"w": np.array([1.0, np.nan]), "b": np.zeros(2), "n": np.arange(2)})
    ["['w']"]
    """
    leaves = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    if not leaves:
        return []
    finite = _leaves_finite([leaf for _, leaf in leaves])
    finite = np.asarray(finite.addressable_shards[0].data)
    return [
        jax.tree_util.keystr(path) for (path, _), ok in zip(leaves, finite, strict=True) if not ok
    ]


@jax.jit
def _leaves_finite(leaves: list[Any]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def _reason(error: BaseException) -> str:
    """A failed write's cause in words: the OS error where there is one (``No space left``)."""
    chain = []
    while error is not None and len(chain) < 8:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno:
            return f"{os.strerror(e.errno)} (errno {e.errno})"
        # tensorstore reports the OS error inside its message: [os_error_code='28']
        found = re.search(r"os_error_code='(\d+)'", str(e))
        if found:
            code = int(found.group(1))
            return f"{os.strerror(code)} (errno {code})"
    return f"{type(chain[0]).__name__}: {_first_line(chain[0])}"


def _first_line(e: BaseException) -> str:
    """The first meaningful line of ``e`` and of its cause.

    Tensorstore's read errors end in a repr of a bound method (``See full TensorStore details:
    <bound method pybind11_...``) and keep the actual reason (``OUT_OF_RANGE: ... size 64``) in
    the exception's cause; that tail is cut and the cause's first line appended.
    """
    parts: list[str] = []
    while e is not None and len(parts) < 2:
        text = re.split(r"See full TensorStore details|<bound method", str(e))[0]
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        if lines and lines[0] not in parts:
            parts.append(lines[0])
        e = e.__cause__
    return "; ".join(parts)[:300]

"""Orbax checkpoints of the train state and the data position, with fallback on corruption.

A checkpoint is one orbax step directory holding two items: ``state`` (the :class:`TrainState`
pytree: step, params, batch statistics, optimizer state, EMA) and ``meta`` (JSON: step, data
position, the config it was written with). Orbax finalises a step directory only after every
file is written, so a run killed mid-save leaves an unfinished temporary directory that is never
listed; a finished but damaged step (a truncated or deleted file) fails to restore, and
:meth:`Checkpointer.restore_latest` then warns and falls back to the previous step.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from agc_optax.training.data import DataPosition


class CheckpointWarning(UserWarning):
    """A checkpoint could not be restored and an older one is used instead."""


class Checkpointer:
    """Saves and restores the train state under one directory.

    Args:
      directory: where step directories go; created if missing.
      max_to_keep: how many recent checkpoints survive (at least 2, so a fallback exists).
      async_save: write in a background thread while training continues.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(2, max_to_keep),
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def steps(self) -> list[int]:
        """The finished checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, position: DataPosition, config: dict[str, Any]) -> None:
        """Writes a checkpoint for ``step`` (asynchronously when enabled); all processes call it."""
        meta = {"step": step, "epoch": position.epoch, "index": position.index, "config": config}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore_latest(self, target: Any) -> tuple[Any, DataPosition, int] | None:
        """Restores the newest checkpoint that reads back whole.

        Args:
          target: a state pytree (arrays or ``jax.ShapeDtypeStruct`` with shardings) giving the
            structure, shapes, dtypes and placement to restore into.

        Returns:
          ``(state, data_position, step)``, or ``None`` when there is no usable checkpoint.
          Each damaged checkpoint skipped on the way emits a :class:`CheckpointWarning`.
        """
        abstract = jax.tree.map(_abstract, target)
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
                meta = restored.meta
                if meta is None or int(meta["step"]) != step:
                    raise ValueError("metadata missing or for another step")
                position = DataPosition(int(meta["epoch"]), int(meta["index"]))
            except Exception as e:  # any failure to read means this step is unusable
                warnings.warn(
                    f"checkpoint {step} in `{self.directory}` is unreadable "
                    f"({type(e).__name__}: {_first_line(e)}); falling back to an earlier one",
                    CheckpointWarning,
                    stacklevel=2,
                )
                continue
            return restored.state, position, step
        return None

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract(x: Any) -> Any:
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""

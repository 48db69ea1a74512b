"""Checkpoints are named by the state's own step, and refuse a run with another batch size."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from agc_optax.training import Checkpointer, TrainState
from agc_optax.training.checkpoint import CheckpointMismatchError


def _state(step: int) -> TrainState:
    params = {"head": {"kernel": jnp.full((2, 3), float(step))}}
    return TrainState(jnp.asarray(step, jnp.int32), params, {}, (), params)


def test_step_comes_from_the_state_and_batch_size_must_match(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    for step in (3, 7):
        checkpointer.save(_state(step), {"batch_size": 32})
    assert checkpointer.steps() == [3, 7]
    restored = checkpointer.restore_latest(_state(0), require={"batch_size": 32})
    assert int(restored.step) == 7
    np.testing.assert_array_equal(restored.params["head"]["kernel"], np.full((2, 3), 7.0))
    with pytest.raises(CheckpointMismatchError, match="written with `--batch-size` 32, not 64"):
        checkpointer.restore_latest(_state(0), require={"batch_size": 64})
    checkpointer.close()


def test_orphaned_orbax_read_reports_are_dropped_others_kept():
    """After a failed restore, asyncio's "Task exception was never retrieved" reports of orbax's
    own read tasks are noise (the fallback warning said it); any other report still shows."""
    import logging
    import os
    import sys

    from agc_optax.training.checkpoint import _drop_orphaned_orbax_reads

    def raised_in(filename: str):
        namespace = {}
        exec(compile("def read():\n    raise ValueError('bad')\n", filename, "exec"), namespace)
        try:
            namespace["read"]()
        except ValueError:
            return sys.exc_info()

    def record(msg, exc_info):
        return logging.LogRecord("asyncio", logging.ERROR, "", 0, msg, None, exc_info)

    orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "serialization.py")
    orphan = "Task exception was never retrieved\nfuture: <Task finished>"
    assert not _drop_orphaned_orbax_reads(record(orphan, raised_in(orbax_file)))
    assert _drop_orphaned_orbax_reads(record(orphan, raised_in("my_code.py")))
    assert _drop_orphaned_orbax_reads(record("Unclosed client session", None))

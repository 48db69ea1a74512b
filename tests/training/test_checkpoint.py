"""Checkpoints are named by the state's own step, and refuse a run with another batch size."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from agc_optax.training import Checkpointer, CheckpointWarning, TrainState
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


def test_a_run_without_ema_resumes_from_one_with_it_and_not_the_reverse(tmp_path):
    with_ema = Checkpointer(str(tmp_path / "ema"), async_save=False)
    saved = _state(5)._replace(ema_params={"head": {"kernel": jnp.full((2, 3), -1.0)}})
    with_ema.save(saved, {})
    restored = with_ema.restore_latest(_state(0)._replace(ema_params=None))
    assert restored.ema_params is None and int(restored.step) == 5
    np.testing.assert_array_equal(restored.params["head"]["kernel"], np.full((2, 3), 5.0))
    with_ema.close()
    without = Checkpointer(str(tmp_path / "plain"), async_save=False)
    without.save(_state(5)._replace(ema_params=None), {})
    with pytest.raises(CheckpointMismatchError, match=r"without an EMA of the weights \(`--ema 0`"):
        without.restore_latest(_state(0))
    without.close()


def test_a_state_of_another_layout_is_refused_with_its_first_difference(tmp_path):
    # As a checkpoint written before the optimizer state gained a field reads to a newer run.
    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(_state(5), {})
    newer = _state(0)._replace(opt_state=(jnp.zeros((), jnp.int32),))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"different model or optimizer state \(1 missing leaves, first `\.opt_state\[0\]`\)"
        r", or was written by an agc_optax version whose state had another layout",
    ):
        checkpointer.restore_latest(newer)
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


def test_a_nonfinite_state_is_never_written_and_old_ones_go_only_after_a_commit(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), max_to_keep=2)  # asynchronous, as in training
    assert checkpointer.save(_state(1), {})
    bad = _state(2)
    bad.params["head"]["kernel"] = bad.params["head"]["kernel"].at[1, 2].set(jnp.nan)
    with pytest.warns(CheckpointWarning, match=r"not writing checkpoint 2: `\.params\['head'\]"):
        assert not checkpointer.save(bad, {})
    for step in (3, 4):
        assert checkpointer.save(_state(step), {})
    checkpointer.wait()
    assert checkpointer.steps() == [3, 4]  # 1 deleted once 4 was committed, 2 never written
    checkpointer.close()


def test_unreadable_checkpoint_reason_is_the_first_meaningful_line():
    """Tensorstore's read error (orbax 0.12) ends in a bound method's repr; its cause says why."""
    from agc_optax.training.checkpoint import _first_line

    cause = ValueError(
        'OUT_OF_RANGE: Error reading "params.head.kernel/0.0" in OCDBT database at local file '
        '"/ckpt/7/state/": Requested byte range [0, 4395) is not valid for value of size 64'
    )
    error = Exception(
        "Encountered error while reading array index: (slice(0, 7, 1),). See full TensorStore "
        "details: <bound method pybind11_detail_function_record_v1_system_libstdcpp_gxx_abi_1"
        ".spec of TensorStore({\n  'base': {\n    'driver': 'zarr',\n  },\n})>"
    )
    error.__cause__ = cause
    line = _first_line(error)
    assert "bound method" not in line and "pybind11" not in line and "\n" not in line
    assert line.startswith("Encountered error while reading array index: (slice(0, 7, 1),).")
    assert line.endswith("is not valid for value of size 64")  # the cause, with the leaf's name
    assert "params.head.kernel" in line

"""TensorBoard event files beside metrics.jsonl: the same numbers, read back from the bytes."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
from tensorboard_events import read_events, read_scalars

from agc_optax.training.metrics import MetricsWriter, read_metrics

RECORDS = [
    {"split": "train", "step": 5, "loss": 2.25, "accuracy": 0.125, "clip_fraction": 0.5,
     "images_per_s": 1234.5, "skipped_steps": 0, "grad_norm": float("nan")},
    {"split": "train", "step": 10, "loss": 1.0 / 3.0, "accuracy": 0.75, "clip_fraction": 0.0,
     "images_per_s": 999.0, "skipped_steps": 2, "grad_norm": 7.5},
    {"split": "eval", "step": 10, "accuracy": 0.6, "top5_accuracy": 0.9, "loss": 1.5,
     "count": 359.0},
    {"split": "eval_ema", "step": 10, "accuracy": 0.625, "loss": 1.25, "count": 359.0},
]  # fmt: skip


def _expected_scalars(records) -> dict[str, list[tuple[int, float]]]:
    """``split/key -> [(step, value)]`` of every finite number, as float32 (TensorBoard's scalar
    type); a NaN is ``null`` in the JSON and absent from TensorBoard."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key not in ("split", "step") and math.isfinite(value):
                out.setdefault(f"{r['split']}/{key}", []).append(
                    (r["step"], float(np.float32(value)))
                )
    return out


def test_every_number_of_metrics_jsonl_is_a_tensorboard_scalar(tmp_path):
    writer = MetricsWriter(str(tmp_path / "metrics.jsonl"))
    for record in RECORDS:
        writer.write(record)
    writer.close()
    expected = _expected_scalars(RECORDS)
    scalars = read_scalars(tmp_path)
    assert sorted(scalars) == sorted(expected)
    assert scalars == expected
    assert scalars["train/grad_norm"] == [(10, 7.5)]  # step 5's NaN: null, and no scalar
    assert read_metrics(str(tmp_path / "metrics.jsonl"))[0]["grad_norm"] is None


def test_a_resumed_writer_tells_tensorboard_to_hide_the_replayed_steps(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    first = MetricsWriter(path)
    for record in RECORDS:
        first.write(record)
    first.close()
    resumed = MetricsWriter(path, keep_until_step=5)  # checkpoint at 5; step 10 comes again
    resumed.write({**RECORDS[1], "loss": 0.5})
    resumed.close()
    # TensorBoard drops earlier events at and after a SessionLog START's step (its purge).
    starts = [e.step for e in read_events(tmp_path) if e.session_log.status == 1]
    assert starts == [6]
    assert [r["step"] for r in read_metrics(path)] == [5, 10]


def test_without_tensorboardx_only_the_json_lines_are_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # importing it raises ImportError
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silently: no warning either
        writer = MetricsWriter(str(tmp_path / "metrics.jsonl"))
        writer.write(RECORDS[0])
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert read_metrics(str(tmp_path / "metrics.jsonl"))[0]["loss"] == 2.25

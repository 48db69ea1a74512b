"""Metrics as JSON lines (and TensorBoard scalars), and the loss / accuracy / clip-fraction plot.

With the optional ``logging`` extra (``pip install 'agc_optax[logging]'``, which brings
tensorboardX, not TensorFlow) every number written to ``metrics.jsonl`` also goes to a
TensorBoard event file in the same directory, as the scalar ``<split>/<name>`` (e.g.
``train/loss``, ``eval_ema/accuracy``) at the record's step: ``tensorboard --logdir runs``.
A NaN or Inf (``null`` in the JSON) is left out there too. Without the package only
``metrics.jsonl`` is written, silently.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


class MetricsWriter:
    """Appends one JSON object per line; a no-op on processes other than 0.

    Appending (rather than truncating) keeps the history of a resumed run in one file. When
    tensorboardX is installed the same numbers also go to a TensorBoard event file beside it.

    Args:
      path: the ``.jsonl`` file.
      enabled: write at all (``jax.process_index() == 0``).
      keep_until_step: a run resumed at this step first drops the records of later steps
        (written after the checkpoint it resumes from, and about to be written again), so
        every step appears once (TensorBoard is told the same: its events from later steps
        are hidden). ``None`` keeps everything.
      tensorboard: also write TensorBoard scalars when tensorboardX is installed.
    """

    def __init__(
        self,
        path: str,
        *,
        enabled: bool = True,
        keep_until_step: int | None = None,
        tensorboard: bool = True,
    ):
        self.path = path
        self.enabled = enabled
        if enabled and keep_until_step is not None and os.path.exists(path):
            _drop_records_after(path, keep_until_step)
        self._file = open(path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self._tensorboard = (
            _tensorboard_writer(os.path.dirname(os.path.abspath(path)), keep_until_step)
            if enabled and tensorboard
            else None
        )

    def write(self, record: dict[str, Any]) -> None:
        """Writes ``record`` (numbers are converted to plain floats/ints)."""
        if self._file is None:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            split, step = record.get("split", "train"), int(record.get("step", 0))
            for key, value in clean.items():  # non-finite numbers, null in the JSON, left out
                if key in ("split", "step") or value is None or isinstance(value, str):
                    continue
                self._tensorboard.add_scalar(f"{split}/{key}", value, step)
            self._tensorboard.flush()  # as durable as the JSON line

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _tensorboard_writer(directory: str, keep_until_step: int | None) -> Any:
    """A tensorboardX ``SummaryWriter`` on ``directory``, or ``None`` without the package."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional (the `logging` extra): metrics.jsonl alone is complete
        return None
    # A resumed run writes its steps after `keep_until_step` again: TensorBoard then hides the
    # earlier events from those steps (its "purge" marker), as the JSON file drops them.
    purge = None if keep_until_step is None else keep_until_step + 1
    return SummaryWriter(logdir=directory, purge_step=purge)


def _plain(v: Any) -> Any:
    if isinstance(v, str | int | bool) or v is None:
        return v
    f = float(v)
    return f if math.isfinite(f) else None


def _drop_records_after(path: str, step: int) -> None:
    """Rewrites ``path`` without the records of steps after ``step`` (atomically)."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record_step = json.loads(line).get("step", 0)
        except ValueError:  # a line cut short when the run was killed mid-write
            continue
        if record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a metrics file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(path: str, out_png: str) -> str:
    """Plots training/eval loss, accuracy and the AGC clip fraction against the step.

    Args:
      path: the metrics ``.jsonl`` file (records with ``split`` ``"train"`` or ``"eval"``).
      out_png: where the figure goes.

    Returns:
      ``out_png``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and in CI
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'agc_optax[train]'") from None

    records = read_metrics(path)

    def series(split: str, key: str) -> tuple[list[float], list[float]]:
        pts = [
            (r["step"], r[key])
            for r in records
            if r.get("split") == split and r.get(key) is not None
        ]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(
        axes,
        ("loss", "accuracy", "clip_fraction"),
        ("loss", "accuracy", "AGC clip fraction"),
        strict=True,
    ):
        for split, style in (("train", "-"), ("eval", "o-"), ("eval_ema", "s--")):
            xs, ys = series(split, key)
            if xs:
                ax.plot(xs, ys, style, label=split, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not recorded (no AGC)", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png

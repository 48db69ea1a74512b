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


def plot_metrics(
    path: str, out_png: str, *, title: str | None = None, label_smoothing: float | None = None
) -> str:
    """Plots training/eval loss, accuracy and the AGC clip fraction against the step.

    Args:
      path: the metrics ``.jsonl`` file (records with ``split`` ``"train"`` or ``"eval"``).
      out_png: where the figure goes.
      title: the figure's title, e.g. the model, the dataset and the run directory.
      label_smoothing: the run's label smoothing; when non-zero the loss panel notes that the
        train loss includes it (so the train curve sits above the eval loss, which does not).

    Returns:
      ``out_png``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and in CI
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'agc_optax[train]'") from None

    fig = metrics_figure(read_metrics(path), title=title, label_smoothing=label_smoothing)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def metrics_figure(
    records: list[dict[str, Any]], *, title: str | None = None, label_smoothing: float | None = None
) -> Any:
    """The figure of :func:`plot_metrics` for ``records`` (a matplotlib ``Figure``; close it).

    A record whose loss is not finite (written as ``null``) is drawn as a red x at the bottom
    of the loss panel, at its step, instead of leaving a gap or an empty panel.
    """
    import matplotlib.pyplot as plt

    def finite(value: Any) -> bool:
        return isinstance(value, int | float) and math.isfinite(value)

    def series(split: str, key: str) -> tuple[list[float], list[float]]:
        pts = [
            (r["step"], r[key]) for r in records if r.get("split") == split and finite(r.get(key))
        ]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    loss_title = "loss"
    if label_smoothing:
        loss_title += (
            f"\ntrain loss includes label smoothing {label_smoothing:g} (eval's does not),"
            "\nso it sits above the eval loss"
        )
    for ax, key, panel_title in zip(
        axes,
        ("loss", "accuracy", "clip_fraction"),
        (loss_title, "accuracy", "AGC clip fraction"),
        strict=True,
    ):
        for split, style in (("train", "-"), ("eval", "o-"), ("eval_ema", "s--")):
            xs, ys = series(split, key)
            if xs:
                ax.plot(xs, ys, style, label=split, markersize=4)
        ax.set_title(panel_title, fontsize=10 if "\n" in panel_title else None)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "loss":
            _mark_nonfinite(ax, records, key)
        if ax.has_data():
            ax.legend()
        else:
            missing = "not recorded (no AGC)" if key == "clip_fraction" else "not recorded"
            ax.text(0.5, 0.5, missing, ha="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _mark_nonfinite(ax: Any, records: list[dict[str, Any]], key: str) -> None:
    """Red x at the foot of ``ax`` for each record whose ``key`` is present but not finite."""
    steps = [
        r["step"]
        for r in records
        if key in r and not (isinstance(r[key], int | float) and math.isfinite(r[key]))
    ]
    if not steps:
        return
    foot = ax.get_xaxis_transform()  # x in steps, y in axes fractions
    ax.plot(
        steps,
        [0.03] * len(steps),
        "x",
        color="red",
        transform=foot,
        clip_on=False,
        label=f"{key} not finite ({len(steps)})",
    )
    ax.text(
        0.5,
        0.1,
        f"{key} not finite at step{'s' if len(steps) > 1 else ''} "
        + ", ".join(str(s) for s in steps[:8])
        + (", ..." if len(steps) > 8 else ""),
        color="red",
        ha="center",
        transform=ax.transAxes,
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
    )

"""What a newcomer meets first (issue 15): compile notices and the progress bar's clock, model
keyword mistakes as one-line usage errors, the run directory's name, the plot's labels, and the
missing `dill` as one line naming the extra."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

import pytest
from tiny_model import tiny_model

from agc_optax.training import PRESETS, recipe, train
from agc_optax.training import data as data_lib
from agc_optax.training import metrics as metrics_lib
from agc_optax.training import trainer as trainer_lib


@pytest.mark.parametrize(
    "args, cause",
    [
        (["--model-arg", "widths=oops"], "(read as text: widths='oops')"),
        (["--model-arg", "depths=(1,1)"], "`depths`: expected 4 entries"),
        (["--model-arg", "foo=1"], "unexpected keyword argument 'foo'; NFResNet takes width, "),
        (
            ["--model", "resnet50", "--model-arg", "scan_blocks=True"],
            "unexpected keyword argument 'scan_blocks'; ResNet takes ",
        ),
        (["--model", "nfnet_f0", "--model-arg", "width=0.01"], "below `group_size` 128"),
    ],
)
def test_model_arg_mistakes_are_one_line_usage_errors(tmp_path, capsys, args, cause):
    from agc_optax.train import main

    status = main([*args, "--run-dir", str(tmp_path / "run"), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1, lines
    model = args[1] if args[0] == "--model" else "nf_resnet26"
    given = " ".join(args[i + 1] for i, a in enumerate(args) if a == "--model-arg")
    assert lines[0].startswith(f"agc-train: error: --model-arg {given} (model `{model}`): ")
    assert cause in lines[0], lines[0]


def test_only_the_overrides_are_blamed(monkeypatch):
    """A model that fails to build without any override is a bug, not a usage error."""
    config = PRESETS["smoke"]
    with pytest.raises(recipe.ModelArgError) as refused:
        recipe.model_builder(config.replace(model_overrides={"depths": (1, 1)}), 10)
    assert refused.value.model == "nf_resnet26" and refused.value.overrides == {"depths": (1, 1)}

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(recipe.models, "create_model", broken)
    for overrides in ({}, {"depths": (1, 1, 1, 1)}):
        with pytest.raises(ValueError, match="an internal bug") as bug:
            recipe.model_builder(config.replace(model_overrides=overrides), 10)
        assert not isinstance(bug.value, recipe.ModelArgError)


def test_run_dir_is_named_as_help_says():
    name = os.path.basename(trainer_lib.run_dir_of(PRESETS["digits"]))
    assert re.fullmatch(r"nf_resnet26-digits-\d{8}-\d{6}", name), name


def test_bar_starts_after_compilation_and_plot_is_labelled(tmp_path, monkeypatch):
    """With the progress bar: compilation is announced and timed first, the bar's clock starts
    after it (so its first rate and ETA are the steps'), eval's compilation goes through the bar;
    the plot gets the run's title and label smoothing."""
    events: list[tuple[str, str, float]] = []
    real_progress, real_plot = trainer_lib._progress, metrics_lib.plot_metrics
    bars = []

    def progress(*args, **kwargs):
        bar = real_progress(*args, **kwargs)
        events.append(("bar", "", time.time()))
        bar.write = lambda line: events.append(("bar.write", line, time.time()))
        bars.append(bar)
        return bar

    plots = []

    def plot(*args, **kwargs):
        plots.append(kwargs)
        return real_plot(*args, **kwargs)

    slow_first = data_lib.TrainBatches._batch

    def first_batch_slow(self, step):  # e.g. streaming workers starting up
        if step == 0:
            time.sleep(0.5)
        return slow_first(self, step)

    monkeypatch.setattr(data_lib.TrainBatches, "_batch", first_batch_slow)
    monkeypatch.setattr(trainer_lib, "_progress", progress)
    monkeypatch.setattr(metrics_lib, "plot_metrics", plot)
    config = PRESETS["smoke"].replace(
        steps=4, eval_every=2, checkpoint_every=4, log_every=2, run_dir=str(tmp_path / "run")
    )
    train(config, model_fn=tiny_model, log=lambda line: events.append(("log", line, time.time())))

    kinds_and_lines = [(kind, line) for kind, line, _ in events]
    assert kinds_and_lines[0][1].startswith("training a custom model on digits ")
    assert kinds_and_lines[1][1] == "compiling the initializer of weights and optimizer state..."
    assert re.fullmatch(r"compiled the initializer in \d+\.\d s", kinds_and_lines[2][1])
    compiling = kinds_and_lines.index(("log", "compiling the train step..."))
    compiled = compiling + 1
    assert events[compiled][0] == "log"
    assert re.fullmatch(r"compiled the train step in \d+\.\d s", events[compiled][1])
    assert events[compiled + 1][0] == "bar" and bars[0].shows_progress
    assert bars[0].start_t >= events[compiled][2]  # the bar's clock leaves compilation out
    writes = [line for kind, line, _ in events if kind == "bar.write"]
    assert writes[0] == "compiling the eval step..."
    assert re.fullmatch(r"compiled the eval step in \d+\.\d s", writes[1])
    assert writes[2].startswith("step 2: eval accuracy ") and writes[-1].startswith("step 4: ")
    # The bar shows the train metrics; no plain lines duplicate them.
    assert not any(re.match(r"step \d+/4: ", line) for _, line in kinds_and_lines)

    # The first record's rates leave compilation out, but not the wait for the first batch.
    first = metrics_lib.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))[0]
    assert first["step"] == 2 and 0.0 < first["input_wait_fraction"] <= 1.0, first
    assert first["images_per_s"] <= 2 * 32 / 0.5  # the first batch's 0.5 s wait is counted

    assert plots == [
        {"title": f"custom model on digits: {tmp_path / 'run'}", "label_smoothing": 0.1}
    ]


def test_plot_titles_notes_smoothing_and_marks_nonfinite_losses(tmp_path):
    import matplotlib.pyplot as plt

    records = []
    for step in range(5, 55, 5):
        loss = None if step in (30, 35) else 2.0 / math.sqrt(step)
        records.append(
            {
                "split": "train",
                "step": step,
                "loss": loss,
                "accuracy": step / 60,
                "clip_fraction": 0.2,
            }
        )
    records.append({"split": "eval", "step": 50, "loss": 0.2, "accuracy": 0.9})
    records.append({"split": "train", "step": 55, "loss": float("nan"), "accuracy": 0.9})
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))

    out = metrics_lib.plot_metrics(
        str(path), str(tmp_path / "metrics.png"), title="nf_resnet26 on digits: runs/x"
    )
    assert os.path.getsize(out) > 0

    fig = metrics_lib.metrics_figure(
        metrics_lib.read_metrics(str(path)),
        title="nf_resnet26 on digits: runs/x",
        label_smoothing=0.1,
    )
    try:
        loss_ax = fig.axes[0]
        assert fig._suptitle.get_text() == "nf_resnet26 on digits: runs/x"
        assert "train loss includes label smoothing 0.1" in loss_ax.get_title()
        assert "above the eval loss" in loss_ax.get_title()
        marks = [line for line in loss_ax.lines if line.get_marker() == "x"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [30, 35, 55]
        assert marks[0].get_color() == "red"
        texts = [t.get_text() for t in loss_ax.texts]
        assert texts == ["loss not finite at steps 30, 35, 55"]
        train_line = next(line for line in loss_ax.lines if line.get_label() == "train")
        assert 30 not in list(train_line.get_xdata())  # no made-up value at a non-finite step
    finally:
        plt.close(fig)

    # Every loss non-finite: the panel shows the marks and says why, instead of being empty.
    nan_only = [{"split": "train", "step": s, "loss": None, "accuracy": 0.1} for s in (1, 2)]
    fig = metrics_lib.metrics_figure(nan_only)
    try:
        assert [t.get_text() for t in fig.axes[0].texts] == ["loss not finite at steps 1, 2"]
        assert fig.axes[0].get_title() == "loss" and fig._suptitle is None
        assert [t.get_text() for t in fig.axes[2].texts] == ["not recorded (no AGC)"]
    finally:
        plt.close(fig)


def test_haiku_pickle_without_dill_is_one_error_naming_the_extra(tmp_path, monkeypatch):
    """A DeepMind `*_haiku.npz` (a dill pickle) where `dill` is not installed."""
    from flax import nnx

    from agc_optax.models import NFNet, load_haiku_params

    weights = tmp_path / "F0_haiku.npz"
    weights.write_bytes(b"\x80\x04not a zip: a pickle")
    monkeypatch.setitem(sys.modules, "dill", None)  # `import dill` raises ImportError
    model = nnx.eval_shape(lambda: NFNet(10, widths=[256] * 4, depths=[1] * 4, rngs=nnx.Rngs(0)))
    with pytest.raises(ImportError) as missing:
        load_haiku_params(model, weights, allow_pickle=True)
    message = str(missing.value)
    assert len(message.splitlines()) == 1 and repr(str(weights)) in message
    assert message.endswith(
        'needs `dill`, which the `weights` extra installs: pip install "agc_optax[weights]"'
    )
    assert missing.value.__cause__ is None and missing.value.__suppress_context__  # no chain

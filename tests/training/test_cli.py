"""The CLI: a smoke run end to end, and bad input as one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import re

import pytest
from cli_util import cli_env, run_cli
from tensorboard_events import read_scalars


@pytest.mark.parametrize(
    "args, devices, message",
    [
        (["--model", "nf_resnet_9000"], None, "unknown model `nf_resnet_9000`; valid: "),
        (["--dataset", "imagenet"], None, "unknown dataset `imagenet`; valid: digits, cifar10"),
        (["--batch-size", "12"], 8, "`--batch-size` 12 is not divisible by the 8 devices"),
        (["--dataset", "cifar10", "--data-dir", "{tmp}"], None, "missing CIFAR-10 file"),
        (["--dataset", "cifar10"], None, "needs `--data-dir`"),
        (["--run-dir", "{tmp}/file/run"], None, "is not writable"),
        (["--resume"], None, "`--resume` needs the `--run-dir`"),
        (["--lr", "-1"], None, "`--lr` must be > 0"),
        (["--model-arg", "widths"], None, "expected KEY=VALUE"),
        (["--epochs", "inf"], None, "`--epochs` must be a finite number, got inf"),
        (["--lr", "inf"], None, "`--lr` must be a finite number, got inf"),
        (["--max-bad-steps", "0"], None, "`--max-bad-steps` must be > 0, got 0"),
        (["--checkpoint-dir", "{tmp}/file"], None, "is a file, not a directory"),
        (["--compile-cache", "{tmp}/file"], None, "compile cache directory `"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, devices, message):
    (tmp_path / "file").write_text("a file, not a directory")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--run-dir" not in args and "--resume" not in args:
        args += ["--run-dir", str(tmp_path / "run")]
    proc = run_cli(*args, "--no-progress", env=cli_env(devices=devices))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("agc-train: error: ") and message in lines[0], lines[0]


def test_shard_params_with_pmap_is_a_usage_error(tmp_path, capsys):
    from agc_optax.train import main

    status = main(["--shard-params", "--parallel", "pmap", "--run-dir", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("agc-train: error: `--shard-params`")
    assert "cannot be combined with `--parallel pmap`" in lines[0]
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_unknown_model_lists_valid_names(tmp_path):
    proc = run_cli("--model", "nope", "--run-dir", str(tmp_path))
    assert "nf_resnet26" in proc.stderr and "nfnet_f0" in proc.stderr


def test_help_explains_every_flag():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for flag in (
        "--model",
        "--dataset",
        "--data-dir",
        "--batch-size",
        "--lr",
        "--clipping",
        "--no-agc",
        "--global-clip",
        "--epochs",
        "--steps",
        "--ema",
        "--label-smoothing",
        "--dtype",
        "--parallel",
        "--shard-params",
        "--checkpoint-dir",
        "--resume",
        "--max-bad-steps",
        "--seed",
        "--coordinator",
        "--num-processes",
        "--process-id",
        "--update-norm",
        "--compile-cache",
    ):
        assert flag in proc.stdout


def test_smoke_run_writes_everything(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "xla_cache"
    env = cli_env() | {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # cache every program
    proc = run_cli(
        *("--preset", "smoke", "--run-dir", str(run_dir), "--no-progress", "--update-norm"),
        *("--compile-cache", str(cache)),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The compiled train step (`with_stop_vote`'s wrapper) went into the cache, for a rerun or
    # --resume to load.
    assert any(name.startswith("jit_voting_step-") for name in os.listdir(cache)), os.listdir(cache)
    for name in ("metrics.jsonl", "metrics.png", "config.json", "summary.json"):
        assert (run_dir / name).is_file(), name
        assert str(run_dir / name) in proc.stdout  # says where everything went
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["10", "20"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert {
        "loss",
        "accuracy",
        "clip_fraction",
        "grad_norm",
        "param_norm",
        "update_norm",
        "images_per_s",
    } <= set(train[-1])
    assert 0.0 <= train[-1]["clip_fraction"] <= 1.0
    assert any(r["split"] == "eval_ema" for r in records)
    # TensorBoard (the `logging` extra, in the test extra) gets the same numbers beside them.
    loss = [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]
    assert read_scalars(run_dir)["train/loss"] == loss
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 20 and 0.0 <= summary["test_accuracy"] <= 1.0
    _check_log_lines(proc.stdout.splitlines(), train, [r for r in records if r["split"] == "eval"])
    # The same directory again without --resume would overwrite a run: refused.
    again = run_cli("--preset", "smoke", "--run-dir", str(run_dir), "--no-progress")
    assert again.returncode != 0 and "already holds checkpoints" in again.stderr


def _check_log_lines(lines: list[str], train: list[dict], evals: list[dict]) -> None:
    """--no-progress: compilation is announced and timed, then one line per train record (the
    values of metrics.jsonl) and per evaluation, so a batch job's log tells how the run goes."""
    assert lines[0].startswith("training nf_resnet26 on digits ")
    assert lines[1] == "compiling the initializer of weights and optimizer state..."
    assert re.fullmatch(r"compiled the initializer in \d+\.\d s", lines[2])
    assert lines.index("compiling the train step...") + 1 == lines.index(
        next(line for line in lines if line.startswith("compiled the train step in "))
    )
    compiled = next(i for i, line in enumerate(lines) if line.startswith("compiled the train"))
    assert re.fullmatch(r"compiled the train step in \d+\.\d s", lines[compiled])
    step_lines = [line for line in lines if re.match(r"step \d+/20: ", line)]
    assert [int(line.split("/")[0].split()[1]) for line in step_lines] == [5, 10, 15, 20]
    assert lines.index(step_lines[0]) > compiled
    for line, record in zip(step_lines, train, strict=True):
        assert f"step {record['step']}/20: loss {record['loss']:.4f}, " in line, line
        assert f"accuracy {record['accuracy']:.4f}, " in line
        assert f"{record['images_per_s']:.0f} images/s, lr {record['learning_rate']:.4g}" in line
        assert line.endswith(f"clip fraction {record['clip_fraction']:.3f}"), line
    eval_lines = [line for line in lines if re.fullmatch(r"step \d+: eval accuracy .*", line)]
    assert [f"step {r['step']}: eval accuracy {r['accuracy']:.4f}" for r in evals] == [
        line.split(",")[0] for line in eval_lines
    ]
    assert lines.count("compiling the eval step...") == 1
    assert lines.index("compiling the eval step...") < lines.index(eval_lines[0])


@pytest.mark.slow  # ~70 s on 2 cores; the recipe itself is tested in test_step/test_experiments
def test_no_agc_and_global_clip_runs(tmp_path):
    for flag in (["--no-agc"], ["--global-clip", "1.0"]):
        run_dir = tmp_path / flag[0].strip("-")
        proc = run_cli(
            "--preset", "smoke", "--steps", "4", "--run-dir", str(run_dir), "--no-progress", *flag
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-3])
        assert "clip_fraction" not in last


@pytest.mark.slow
def test_default_run_reaches_stated_accuracy(tmp_path):
    """The README's first command, no flags but where to write.

    Measured: ~96% test accuracy (EMA weights).
    """
    run_dir = tmp_path / "default"
    proc = run_cli("--run-dir", str(run_dir), "--no-progress", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.90, summary


def test_help_states_each_default_once():
    # The flags default to None so that presets can fill them; help must show the real defaults.
    proc = run_cli("--help")
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: [])" not in text
    assert "(default nf_resnet26)" in text and "(default digits)" in text
    # Where a run goes, as run_dir_of names it.
    assert "(default runs/<model>-<dataset>-<time>)" in text


def test_compile_cache_leaves_a_cache_set_elsewhere_with_a_warning(tmp_path):
    """JAX opens its cache once per process, so `--compile-cache` only fills an empty setting;
    a directory set before (JAX_COMPILATION_CACHE_DIR, jax.config) stays, and a warning says so.
    Nothing compiles in between, so JAX's own cache is never opened here."""
    import jax

    from agc_optax.training.trainer import _use_compile_cache

    previous = jax.config.jax_compilation_cache_dir
    mine, elsewhere = str(tmp_path / "mine"), str(tmp_path / "elsewhere")
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        _use_compile_cache(mine)
        assert jax.config.jax_compilation_cache_dir == mine
        _use_compile_cache(mine)  # the same directory again: silent
        jax.config.update("jax_compilation_cache_dir", elsewhere)
        with pytest.warns(UserWarning, match=rf"--compile-cache `{mine}` ignored: .*`{elsewhere}`"):
            _use_compile_cache(mine)
        assert jax.config.jax_compilation_cache_dir == elsewhere
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)

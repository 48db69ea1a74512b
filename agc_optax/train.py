"""Command line: train a normalizer-free network with AGC (``python -m agc_optax.train``).

With no flags it trains a small NF-ResNet-26 with ``agc_optax.sgd_agc`` on scikit-learn's bundled
digits, offline, on a CPU; the first step waits for XLA to compile the train step (a line says so,
and how long it took). Flags override the chosen ``--preset``.

Examples::

    python -m agc_optax.train
    python -m agc_optax.train --preset cifar10 --data-dir ~/data/cifar-10-batches-py
    python -m agc_optax.train --steps 200 --no-agc --run-dir runs/no_agc
    python -m agc_optax.train --run-dir runs/no_agc --resume
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Any

from agc_optax.training.config import (
    DEFAULT_PRESET,
    DTYPES,
    PRESETS,
    Config,
    ConfigError,
    add_model_arg_flag,
    parse_model_args,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agc-train",
        description="Train a normalizer-free network with Adaptive Gradient Clipping (AGC). "
        "Defaults shown are the default preset's; a --preset brings its own.",
    )
    d = PRESETS[DEFAULT_PRESET]
    add = p.add_argument
    add(
        "--preset",
        default=DEFAULT_PRESET,
        choices=sorted(PRESETS),
        help=f"named configuration the other flags override (default {DEFAULT_PRESET})",
    )
    add("--model", help=f"a create_model name, e.g. nf_resnet26, nfnet_f0 (default {d.model})")
    add_model_arg_flag(p)
    add(
        "--dataset",
        help="digits (offline, bundled with scikit-learn), cifar10, tfds:<name>, or streamed: "
        "imagefolder (DIR/train/<class>/*, DIR/val/<class>/*), arrayrecord (agc-prepare's "
        f"shards) (default {d.dataset})",
    )
    add(
        "--data-dir",
        help="directory of the cifar10 python batches, prepared TFDS data, the ImageFolder "
        "tree or the ArrayRecord shards",
    )
    add("--image-size", type=int, help="train resolution of streamed data (digits: upsampling)")
    add("--test-image-size", type=int, help="eval resolution of streamed data")
    add(
        "--augment",
        help="streamed data's augmentation on top of crop+flip: none, or e.g. "
        "cutmix_mixup_randaugment_405 (DeepMind's names; the nfnet presets set the paper's)",
    )
    add("--workers", type=int, help="decoding processes for streamed data (default CPUs - 1)")
    add("--batch-size", type=int, help=f"global batch size (default {d.batch_size})")
    add(
        "--lr",
        type=float,
        help=f"peak learning rate per 256 examples, scaled by batch/256 (default {d.lr})",
    )
    add("--clipping", type=float, help=f"AGC threshold lambda (default {d.clipping})")
    add("--no-agc", action="store_true", help="plain SGD + weight decay, no gradient clipping")
    add(
        "--global-clip",
        type=float,
        metavar="MAX_NORM",
        help="clip by global gradient norm instead of AGC",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help=f"training epochs (default {d.epochs})")
    length.add_argument("--steps", type=int, help="training steps (instead of --epochs)")
    add("--ema", type=float, help=f"EMA decay of the weights, 0 disables (default {d.ema})")
    add("--label-smoothing", type=float, help=f"(default {d.label_smoothing})")
    add("--dtype", choices=DTYPES, help="compute dtype; parameters stay float32 (default float32)")
    add(
        "--parallel",
        choices=("jit", "pmap"),
        help="jit: mesh with a `data` axis; pmap: per-device program (default jit)",
    )
    add(
        "--shard-params",
        action="store_true",
        help="split parameters, optimizer state and EMA over the devices (FSDP; --parallel jit) "
        "for models too large for one device",
    )
    add(
        "--run-dir",
        help="metrics, plots, config and checkpoints (default runs/<model>-<dataset>-<time>)",
    )
    add("--checkpoint-dir", help="checkpoints (default <run-dir>/checkpoints)")
    add("--checkpoint-every", type=int, help="steps between checkpoints (default: each epoch)")
    add("--resume", action="store_true", help="continue from the newest readable checkpoint")
    add(
        "--compile-cache",
        metavar="DIR",
        help="JAX's persistent compilation cache: a rerun or --resume of the same configuration "
        "loads its compiled steps instead of compiling them (as JAX_COMPILATION_CACHE_DIR)",
    )
    add(
        "--max-bad-steps",
        type=int,
        help="steps with a non-finite loss or gradient norm are skipped; stop (exit code 3) "
        f"after this many in a row (default {d.max_bad_steps})",
    )
    add("--eval-every", type=int, help="steps between evaluations (default: each epoch)")
    add("--log-every", type=int, help=f"steps between metric records (default {d.log_every})")
    add("--seed", type=int, help="seeds init, data order, augmentation and dropout (default 0)")
    add(
        "--update-norm",
        action="store_true",
        help="also record update_norm, the norm of each logged step's change to the weights "
        "(costs a copy of every weight on every step)",
    )
    add(
        "--step-programs",
        type=int,
        choices=(1, 2),
        help="2: compile the train step as two XLA programs, gradients and update, side by "
        "side (faster to compile); 1: as one program (default 2)",
    )
    add("--no-progress", action="store_true", help="no progress bar")
    add("--coordinator", metavar="HOST:PORT", help="multi-process: address of process 0")
    add("--num-processes", type=int, help="multi-process: number of processes")
    add("--process-id", type=int, help="multi-process: index of this process")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """The preset with every given flag applied."""
    config = PRESETS[args.preset]
    changes: dict[str, Any] = {}
    simple = (
        "model",
        "dataset",
        "data_dir",
        "image_size",
        "test_image_size",
        "augment",
        "workers",
        "batch_size",
        "lr",
        "clipping",
        "epochs",
        "steps",
        "label_smoothing",
        "dtype",
        "parallel",
        "run_dir",
        "checkpoint_dir",
        "checkpoint_every",
        "compile_cache",
        "max_bad_steps",
        "eval_every",
        "log_every",
        "seed",
        "step_programs",
        "coordinator",
        "num_processes",
        "process_id",
    )
    for name in simple:
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.epochs is not None:
        changes["steps"] = None
    if args.model is not None and args.model != config.model:
        changes["model_overrides"] = {}  # the preset's overrides belong to the preset's model
    if args.model_arg:
        changes["model_overrides"] = {
            **changes.get("model_overrides", config.model_overrides),
            **parse_model_args(args.model_arg),
        }
    if args.ema is not None:
        changes["ema"] = args.ema or None
    if args.no_agc or args.global_clip is not None:
        changes["agc"] = False
    if args.global_clip is not None:
        changes["global_clip"] = args.global_clip
    changes["resume"] = args.resume
    if args.no_progress:
        changes["progress"] = False
    if args.shard_params:
        changes["shard_params"] = True
    if args.update_norm:
        changes["update_norm"] = True
    return config.replace(**changes)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # One line per warning, without the source line Python would echo.
    print(f"agc-train: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``agc-train``; returns the exit status.

    0: trained; 2: usage error (before training); 3: diverged (``--max-bad-steps``);
    128 + the signal's number (143 SIGTERM, 130 SIGINT): preempted, with a checkpoint to
    ``--resume`` from; 1: the run could not write its files (full disk).
    """
    args = _parser().parse_args(argv)
    # Library chatter (orbax, absl) is not for the user of a CLI; warnings we raise still show.
    # Orbax also logs a failed background write at ERROR, with tracebacks, before re-raising it
    # in the main thread, where it becomes the one line below.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.showwarning = _show_warning
    from agc_optax.training.checkpoint import CheckpointWriteError
    from agc_optax.training.data import DataError
    from agc_optax.training.recipe import ModelArgError
    from agc_optax.training.trainer import Preempted, TrainingDiverged, train

    try:
        config = config_from_args(args)
        train(config)
    except ModelArgError as e:
        message = str(e)
        if args.model_arg:  # the flags as typed, not the preset's overrides merged with them
            message = f"--model-arg {' '.join(args.model_arg)} (model `{e.model}`): {e.cause}"
            as_text = [f"{k}={v!r}" for k, v in e.overrides.items() if isinstance(v, str)]
            if as_text:  # a bare word that is not a Python literal falls back to a string
                message += f" (read as text: {', '.join(as_text)})"
        print(f"agc-train: error: {message}", file=sys.stderr)
        return 2
    except (ConfigError, DataError) as e:
        print(f"agc-train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"agc-train: error: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        print(f"agc-train: {e}", file=sys.stderr)
        return 128 + e.signal_number
    except CheckpointWriteError as e:
        print(f"agc-train: error: {e}; free space and rerun with --resume", file=sys.stderr)
        return 1
    except OSError as e:  # metrics, plots, summary: the same full disk, outside orbax
        where = f" `{e.filename}`" if e.filename else ""
        print(f"agc-train: error: cannot write{where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("agc-train: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

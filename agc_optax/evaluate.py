"""Command line: a model's top-1/top-5 on an image dataset (``python -m agc_optax.evaluate``).

Each image gets the model's own test preprocessing (`agc_optax.models.default_config`: the test
resolution, the center crop, the resize filter, the mean/std), the batches are split over every
device on the same ``data`` mesh training uses, and one JSON object reports the accuracy, the
throughput and what was measured (stdout, and ``--output FILE``).

Examples::

    agc-eval --model nfnet_f0 --pretrained --trust-download \\
        --dataset imagefolder --data-dir ~/imagenet          # reads ~/imagenet/val/<class>/*
    agc-eval --model eca_nfnet_l0 --weights eca_nfnet_l0.safetensors \\
        --dataset arrayrecord --data-dir ~/imagenet_records
    agc-eval --run-dir runs/my_run --dataset imagefolder --data-dir ~/data   # a trained run

Exit status: 0 evaluated; 2 usage error (one line ``agc-eval: error: ...``).

One process drives every local device (multi-host evaluation is not supported yet): each global
batch is padded to a multiple of the device count, and padded rows are never counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

_FILTERS = ("bicubic", "bilinear", "nearest")


class UsageError(ValueError):
    """A bad flag or input; reported as one line with exit status 2."""


def preprocess(
    data: bytes,
    resolution: int,
    *,
    crop_fraction: float,
    crop_mode: str = "center",
    interpolation: str = "bicubic",
) -> np.ndarray:
    """Decodes an image and applies a model's test transform: ``(resolution, resolution, 3)``
    uint8 RGB.

    ``"center"`` keeps a centered square of ``crop_fraction`` of the short side; ``"squash"`` a
    centered box of ``crop_fraction`` of each side (the image's aspect ratio, squashed to a square
    by the resize). The box is resized to ``resolution`` with ``interpolation`` in one step.

    Example:
      >>> import io
      >>> from PIL import Image
      >>> buffer = io.BytesIO()
      >>> Image.new("RGB", (40, 20), (10, 200, 30)).save(buffer, "PNG")
      >>> out = preprocess(buffer.getvalue(), 16, crop_fraction=0.5)
      >>> out.shape, out.dtype, out[8, 8].tolist()
      ((16, 16, 3), dtype('uint8'), [10, 200, 30])
    """
    from PIL import Image

    from agc_optax.training.data.sources import decode_image

    image = decode_image(data)
    box = crop_box(*image.size, crop_fraction, crop_mode)
    resample = getattr(Image.Resampling, interpolation.upper())
    return np.asarray(image.resize((resolution, resolution), resample, box=box), np.uint8)


def crop_box(
    width: int, height: int, crop_fraction: float, crop_mode: str = "center"
) -> tuple[float, float, float, float]:
    """The ``(left, top, right, bottom)`` box the test transform resizes.

    >>> crop_box(500, 375, 0.875)
    (85.9375, 23.4375, 414.0625, 351.5625)
    >>> crop_box(500, 375, 0.9, "squash")
    (25.0, 18.75, 475.0, 356.25)
    """
    if crop_mode == "center":
        side = min(width, height) * crop_fraction
        crop_w = crop_h = side
    else:
        crop_w, crop_h = width * crop_fraction, height * crop_fraction
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return left, top, left + crop_w, top + crop_h


def _parser() -> argparse.ArgumentParser:
    from agc_optax.training.config import add_model_arg_flag

    p = argparse.ArgumentParser(
        prog="agc-eval",
        description="Top-1/top-5 accuracy and images/s of a model on an image dataset, with the "
        "model's own test preprocessing; prints a JSON result.",
    )
    add = p.add_argument
    add("--model", help="a create_model name (default: the --run-dir's model)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument(
        "--pretrained", action="store_true", help="download the official weights (network)"
    )
    weights.add_argument("--weights", metavar="PATH", help="a local weights file or directory")
    weights.add_argument("--run-dir", metavar="DIR", help="a training run (its newest checkpoint)")
    add("--sha256", help="with --pretrained: the expected SHA-256 of the download")
    add(
        "--trust-download",
        action="store_true",
        help="with --pretrained: accept a download no known SHA-256 verifies",
    )
    add("--cache-dir", help="where --pretrained keeps downloads (default ~/.cache/agc_optax)")
    add("--allow-pickle", action="store_true", help="read a local pickled Haiku --weights file")
    add("--no-ema", action="store_true", help="with --run-dir: the raw weights, not the EMA")
    add("--dataset", required=True, choices=("imagefolder", "arrayrecord"))
    add("--data-dir", required=True, help="the ImageFolder tree or agc-prepare's shards")
    add("--split", default="val", choices=("train", "val"), help="which split (default val)")
    add("--batch-size", type=int, default=64, help="global batch size (default 64)")
    add("--workers", type=int, default=0, help="decoding threads (default 0: the main thread)")
    add("--limit", type=int, help="evaluate only the first N images")
    add_model_arg_flag(p)
    add("--resolution", type=int, help="override the model's test resolution")
    add("--crop-fraction", type=float, help="override the model's test crop fraction")
    add("--interpolation", choices=_FILTERS, help="override the model's resize filter")
    add("--output", metavar="FILE", help="also write the JSON result here")
    return p


def _parse_model_args(items: list[str]) -> dict[str, Any]:
    from agc_optax.training.config import ConfigError, parse_model_args

    try:
        return parse_model_args(items)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def _check_args(args: argparse.Namespace) -> None:
    if not (args.pretrained or args.weights or args.run_dir):
        raise UsageError("give the weights: --pretrained, --weights PATH or --run-dir DIR")
    if args.model is None and not args.run_dir:
        raise UsageError("`--model` is required (except with --run-dir)")
    if (args.sha256 or args.trust_download) and not args.pretrained:
        raise UsageError("`--sha256` and `--trust-download` apply to --pretrained only")
    for flag in ("batch_size", "resolution", "limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"`--{flag.replace('_', '-')}`: expected >= 1, got {value}")
    if args.workers < 0:
        raise UsageError(f"`--workers`: expected >= 0, got {args.workers}")
    if args.crop_fraction is not None and not 0 < args.crop_fraction <= 1:
        raise UsageError(
            f"`--crop-fraction`: expected a fraction in (0, 1], got {args.crop_fraction}"
        )
    if args.weights and not os.path.exists(args.weights):
        raise UsageError(f"`--weights`: no such file or directory `{args.weights}`")
    if args.run_dir and not os.path.isfile(os.path.join(args.run_dir, "config.json")):
        raise UsageError(f"`--run-dir`: `{args.run_dir}` holds no config.json of a training run")


def _model_from_run(args: argparse.Namespace, overrides: dict[str, Any]):
    """The run's model with its newest checkpoint's (EMA) weights; returns (model, name, note)."""
    from flax import nnx

    from agc_optax.models import create_model
    from agc_optax.training.checkpoint import read_checkpoint

    with open(os.path.join(args.run_dir, "config.json")) as f:
        run = json.load(f)
    name = args.model or run["model"]
    overrides = {**(run.get("model_overrides") or {}), **overrides}
    directory = run.get("checkpoint_dir") or os.path.join(args.run_dir, "checkpoints")
    try:
        state, step = read_checkpoint(directory)
    except FileNotFoundError as e:
        raise UsageError(f"`--run-dir`: {e}") from None
    use_ema = state.get("ema_params") is not None and not args.no_ema
    params = state["ema_params"] if use_ema else state["params"]
    head = params.get("head") if isinstance(params, dict) else None
    num_classes = int(np.shape(head["kernel"])[-1]) if head else 0
    model = create_model(name, num_classes, rngs=nnx.Rngs(0), **overrides)
    stored = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(stored, params)
    nnx.update(model, stored)
    if state.get("batch_stats"):
        stats = nnx.state(model, nnx.BatchStat)
        nnx.replace_by_pure_dict(stats, state["batch_stats"])
        nnx.update(model, stats)
    weights = f"{directory} step {step} ({'EMA' if use_ema else 'raw'} weights)"
    return model, name, weights


def _build_model(args: argparse.Namespace):
    from flax import nnx

    from agc_optax.models import create_model

    overrides = _parse_model_args(args.model_arg)
    if args.run_dir:
        return _model_from_run(args, overrides)
    model = create_model(
        args.model,
        None,
        rngs=nnx.Rngs(0),
        pretrained=True if args.pretrained else args.weights,
        weights_sha256=args.sha256,
        trust_download=args.trust_download,
        cache_dir=args.cache_dir,
        allow_pickle=args.allow_pickle,
        **overrides,
    )
    weights = "official (pretrained=True)" if args.pretrained else os.path.abspath(args.weights)
    return model, args.model, weights


def _setup(args: argparse.Namespace):
    """Checks the flags, opens the data source and builds the model with its weights."""
    from agc_optax.training.data.sources import open_source

    _check_args(args)
    class_names = None
    if args.dataset == "imagefolder" and not os.path.isdir(os.path.join(args.data_dir, "train")):
        # A validation tree alone (ImageNet's val/): its own sub-directories are the classes.
        from agc_optax.training.data.sources import list_image_folder

        class_names = list_image_folder(args.data_dir, args.split)[1]
    source = open_source(args.dataset, args.data_dir, args.split, class_names)
    model, name, weights = _build_model(args)
    return source, model, name, weights


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the evaluation the parsed flags describe; returns the JSON-able result."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from agc_optax.models import default_config
    from agc_optax.training import parallel

    try:  # a wrong flag, file or weights: a usage error; failures after this are bugs
        source, model, name, weights = _setup(args)
    except (ValueError, TypeError, OSError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(str(e)) from e
    defaults = default_config(name)
    classes = len(source.class_names)
    if model.num_classes != classes:
        raise UsageError(
            f"the weights' classifier has {model.num_classes} classes but `{args.data_dir}` has "
            f"{classes}; evaluate on a dataset with the same classes (in the same order)"
        )
    resolution = args.resolution or defaults.test_resolution
    crop_fraction = args.crop_fraction or defaults.crop_fraction
    interpolation = args.interpolation or defaults.interpolation
    count = len(source) if args.limit is None else min(args.limit, len(source))

    placement = parallel.make_placement("jit")
    devices = placement.mesh.size
    batch_size = math.ceil(args.batch_size / devices) * devices  # whole rows per device
    model.eval()
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, placement.replicated)
    mean = jnp.asarray(defaults.mean, jnp.float32) * 255
    std = jnp.asarray(defaults.std, jnp.float32) * 255
    k = min(5, classes)

    def correct(state, images, labels):
        x = (images.astype(jnp.float32) - mean) / std
        logits = nnx.merge(graphdef, state)(x)
        _, top = jax.lax.top_k(logits, k)
        hits = top == labels[:, None]
        return hits[:, 0], jnp.any(hits, axis=1)

    step = placement.compile(correct)
    rows = NamedSharding(placement.mesh, PartitionSpec(parallel.DATA_AXIS))  # as shard() puts them
    images_spec = jax.ShapeDtypeStruct(
        (batch_size, resolution, resolution, 3), jnp.uint8, sharding=rows
    )
    labels_spec = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rows)
    step = step.lower(state, images_spec, labels_spec).compile()  # compile before timing

    def load(index: int) -> tuple[np.ndarray | None, int]:
        record = source[index]
        try:
            image = preprocess(
                record.data,
                resolution,
                crop_fraction=crop_fraction,
                crop_mode=defaults.crop_mode if args.crop_fraction is None else "center",
                interpolation=interpolation,
            )
        except Exception as e:  # a corrupt file: counted and reported, not fatal
            warnings.warn(f"skipping `{record.name}`: {type(e).__name__}: {e}", stacklevel=1)
            return None, record.label
        return image, record.label

    pool = ThreadPoolExecutor(args.workers) if args.workers else None
    mapper = pool.map if pool else map
    top1 = top5 = seen = skipped = 0
    start = time.perf_counter()
    try:
        for first in range(0, count, batch_size):
            indices = range(first, min(first + batch_size, count))
            loaded = [(x, y) for x, y in mapper(load, indices)]
            kept = [(x, y) for x, y in loaded if x is not None]
            skipped += len(loaded) - len(kept)
            if not kept:
                continue
            images = np.zeros((batch_size, resolution, resolution, 3), np.uint8)
            labels = np.full((batch_size,), -1, np.int32)  # padding rows never count
            images[: len(kept)] = np.stack([x for x, _ in kept])
            labels[: len(kept)] = [y for _, y in kept]
            hit1, hit5 = step(state, *placement.shard((images, labels)))
            top1 += int(np.asarray(hit1)[: len(kept)].sum())
            top5 += int(np.asarray(hit5)[: len(kept)].sum())
            seen += len(kept)
    finally:
        if pool:
            pool.shutdown()
    seconds = time.perf_counter() - start
    if seen == 0:
        raise UsageError(f"no readable images in `{args.data_dir}` ({args.split} split)")
    return {
        "model": name,
        "weights": weights,
        "dataset": args.dataset,
        "data_dir": os.path.abspath(args.data_dir),
        "split": args.split,
        "images": seen,
        "skipped": skipped,
        "top1": 100.0 * top1 / seen,
        "top5": 100.0 * top5 / seen,
        "correct_top1": top1,
        "correct_top5": top5,
        "reference_top1": defaults.top1,
        "images_per_second": seen / seconds if seconds > 0 else None,
        "seconds": seconds,
        "resolution": resolution,
        "crop_fraction": crop_fraction,
        "crop_mode": defaults.crop_mode if args.crop_fraction is None else "center",
        "interpolation": interpolation,
        "mean": list(defaults.mean),
        "std": list(defaults.std),
        "batch_size": batch_size,
        "devices": devices,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``agc-eval``; returns the exit status (0 evaluated, 2 usage error)."""
    args = _parser().parse_args(argv)
    warnings.showwarning = lambda message, *a, **k: print(
        f"agc-eval: warning: {message}", file=sys.stderr
    )
    from agc_optax.training.data import DataError

    try:
        result = evaluate(args)
    except (UsageError, DataError, ImportError) as e:
        # One line: a weights report's lines (every mismatched key) joined, cut at 2000 chars.
        message = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"agc-eval: error: {message[:2000]}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

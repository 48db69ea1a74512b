"""Benchmark 6: images/s of the streaming train pipeline against a bare decode + resize loop.

On generated ImageNet-like JPEGs (about 500x375, quality 90, smooth content plus grain so they
compress to roughly ImageNet's bytes per pixel), in one run: a bare loop (read, full decode,
bicubic resize to the F0 train resolution) and the whole train pipeline (Inception crop with
draft-mode decoding, flip, bicubic resize, RandAugment 4 x 5, batching) with 0, 1 and 2 worker
processes, each with one reader thread, so that "workers" is the number of cores decoding.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from agc_optax.training.data import AugmentPolicy, ImageFolderSource, train_iterator
from benchmarks import common


def _write_jpegs(root: str, count: int, seed: int = 0) -> int:
    """``count`` JPEGs of about 500x375 in ``root/train/<class>``; returns their total bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        d = os.path.join(root, "train", f"class{i % 4}")
        os.makedirs(d, exist_ok=True)
        w, h = (500, 375) if i % 3 else (375, 500)
        coarse = rng.uniform(0, 255, (h // 25 + 1, w // 25 + 1, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
        image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
        path = os.path.join(d, f"{i:05d}.jpg")
        Image.fromarray(image).save(path, quality=90)
        total += os.path.getsize(path)
    return total


def _bare_rate(paths: list[str], size: int) -> float:
    from PIL import Image

    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            image = Image.open(f)
            image = image.convert("RGB")
            np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))
    return len(paths) / (time.perf_counter() - start)


def _pipeline_rate(source, size, policy, workers, batch, batches) -> float:
    it = train_iterator(
        source,
        batch_size=batch,
        image_size=size,
        seed=0,
        policy=policy,
        workers=workers,
        threads=1,
    )
    next(it)  # start-up (worker processes, first batch) is not counted
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - start)
    it.close()  # stops the worker processes now, not at garbage collection
    return rate


def run(repeats: int = 1, small: bool = False) -> str:
    del repeats  # one pass each: the rates are averages over hundreds of images already
    count, size, batch = (24, 64, 4) if small else (480, 192, 32)
    batches = 3 if small else 12
    worker_counts = (0,) if small else (0, 1, 2)
    policy = AugmentPolicy.parse("randaugment_405")
    with tempfile.TemporaryDirectory() as root:
        total_bytes = _write_jpegs(root, count)
        source = ImageFolderSource(root, "train")
        paths = [os.path.join(root, source[i].name) for i in range(len(source))]
        bare = _bare_rate(paths, size)
        rows = [("bare decode + resize loop", "1", f"{bare:.0f}", "1.00")]
        plain = _pipeline_rate(source, size, AugmentPolicy(), 0, batch, batches)
        rows.append(
            ("pipeline, crop+flip only, 0 workers", "1", f"{plain:.0f}", f"{plain / bare:.2f}")
        )
        for workers in worker_counts:
            rate = _pipeline_rate(source, size, policy, workers, batch, batches)
            cores = str(max(workers, 1))
            rows.append(
                (
                    f"pipeline + RandAugment 405, {workers} workers",
                    cores,
                    f"{rate:.0f}",
                    f"{rate / bare:.2f}",
                )
            )
    title = (
        f"### Input pipeline ({count} JPEGs ~500x375 q90, {total_bytes / count / 1024:.0f} KiB "
        f"each, to {size}px; images/s)"
    )
    return f"{title}\n\n" + common.markdown_table(
        ("contender", "decoding cores", "images/s", "vs bare loop"), rows
    )


if __name__ == "__main__":
    print(run())

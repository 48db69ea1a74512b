"""Streaming datasets for the trainer: the grain pipeline behind the in-memory datasets' interface.

:class:`StreamingDataset` answers what the trainer asks of a dataset (class count, split sizes,
evaluation batches) and :class:`StreamingBatches` what it asks of the batch order
(``steps_per_epoch``, ``batch(step)``), so ``--dataset imagefolder|arrayrecord`` runs through the
same loop as ``digits``.

Where each part runs, and why:

- host, worker processes: read, decode, crop, flip, resize, RandAugment (per image, different
  control flow per image; Pillow's C code), batching. Batches leave the host as uint8.
- device, inside the jitted step (:meth:`StreamingDataset.device_preprocess`): normalisation
  (4x fewer bytes cross to the device than float32) and MixUp / CutMix (whole-batch elementwise
  work, nearly free on an accelerator).

The data position is the step: batch ``b`` of the stream is the same however it is reached (see
:func:`~agc_optax.training.data.pipeline.train_iterator`), so the checkpoint's step counter *is*
the iterator's state, and ``--resume`` continues with exactly the batches an uninterrupted run
would have seen, whatever ``--workers`` was before or is now.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import numpy as np

from agc_optax.training.data.in_memory import DataError
from agc_optax.training.data.pipeline import AugmentPolicy, eval_iterator, train_iterator
from agc_optax.training.data.sources import open_source

STREAMING_DATASETS = ("imagefolder", "arrayrecord")


def is_streaming(name: str) -> bool:
    """Whether ``--dataset name`` is read by the streaming pipeline."""
    return name in STREAMING_DATASETS


def default_workers() -> int:
    """Decoding worker processes when ``--workers`` is not given: all CPUs but one, up to 32."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(cpus - 1, 32))


class _Sized:
    def __init__(self, n: int):
        self._n = n

    def __len__(self) -> int:
        return self._n


class StreamingDataset:
    """An ImageFolder or ArrayRecord dataset read by the grain pipeline.

    Args:
      name: ``"imagefolder"`` or ``"arrayrecord"``.
      data_dir: the directory (``train/`` and ``val/`` trees, or ``agc-prepare``'s output).
      image_size: train resolution.
      test_image_size: eval resolution (default: ``image_size``).
      augment: a policy name for :meth:`AugmentPolicy.parse` (``"none"``, or e.g.
        ``"cutmix_mixup_randaugment_405"``).
      workers: decoding processes (``None``: :func:`default_workers`).
    """

    augment = True  # crops and flips always; for the trainer's in-memory-compatible summary

    def __init__(
        self,
        name: str,
        data_dir: str | None,
        *,
        image_size: int,
        test_image_size: int | None = None,
        augment: str = "none",
        workers: int | None = None,
    ):
        self.name = name
        self.policy = AugmentPolicy.parse(augment)
        self.image_size = image_size
        self.test_image_size = test_image_size or image_size
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise DataError(f"`--workers` must be >= 0, got {self.workers}")
        self.train_source = open_source(name, data_dir, "train")
        self.class_names = self.train_source.class_names
        self.test_source = open_source(name, data_dir, "val", self.class_names)
        self.num_classes = len(self.class_names)
        self.train, self.test = _Sized(len(self.train_source)), _Sized(len(self.test_source))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def train_batches(
        self, global_batch_size: int, seed: int, *, process_index: int = 0, process_count: int = 1
    ) -> StreamingBatches:
        """This process's training batches (see :class:`StreamingBatches`)."""
        return StreamingBatches(self, global_batch_size, seed, process_index, process_count)

    def eval_batches(
        self, global_batch_size: int, *, process_index: int = 0, process_count: int = 1
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(images uint8, labels, mask)`` of this process's share of the validation split."""
        if global_batch_size % process_count:
            raise DataError(
                f"`--batch-size` {global_batch_size} is not divisible by {process_count} processes"
            )
        batches = eval_iterator(
            self.test_source,
            batch_size=global_batch_size // process_count,
            image_size=self.test_image_size,
            shard_index=process_index,
            shard_count=process_count,
            workers=self.workers,
        )
        try:
            for b in batches:
                yield b["image"], b["label"], b["mask"]
        finally:
            if hasattr(batches, "close"):
                batches.close()

    def device_preprocess(self) -> Callable:
        """``(key, images uint8, labels) -> (images, targets)`` for the jitted train step.

        Normalises with the ImageNet mean and std; with MixUp or CutMix in the policy the
        targets are soft ``(B, classes)`` rows, else the integer labels.
        """
        from agc_optax.training.data import mixing

        policy, num_classes = self.policy, self.num_classes

        def preprocess(key, images, labels):
            images = mixing.normalize(images)
            if not policy.mixes:
                return images, labels
            soft = mixing.one_hot(labels, num_classes)
            return mixing.mix_batch(
                key, images, soft, mixup_alpha=policy.mixup_alpha, use_cutmix=policy.cutmix
            )

        return preprocess

    def device_eval_preprocess(self) -> Callable:
        """``images uint8 -> normalised images`` for the eval step."""
        from agc_optax.training.data import mixing

        return mixing.normalize


class StreamingBatches:
    """Per-process training batches from the grain pipeline, addressed by step.

    ``batch(step)`` returns ``(images uint8, labels int32)`` for the step; consecutive steps read
    the running iterator, any other step (a resume) starts the pipeline at that batch.
    ``take_input_stats`` reports the share of wall time ``batch`` spent waiting for input.
    """

    def __init__(self, dataset, global_batch_size, seed, process_index, process_count):
        if global_batch_size % process_count:
            raise DataError(
                f"`--batch-size` {global_batch_size} is not divisible by {process_count} processes"
            )
        n = len(dataset.train_source)
        if global_batch_size > n:
            raise DataError(f"`--batch-size` {global_batch_size} exceeds the {n} training images")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.steps_per_epoch = n // global_batch_size
        self._iterator = None
        self._next_step = None
        self._wait = 0.0
        self._skipped = 0

    def _open(self, step: int) -> None:
        self.close()
        d = self.dataset
        self._iterator = train_iterator(
            d.train_source,
            batch_size=self.local_batch_size,
            image_size=d.image_size,
            seed=self.seed,
            policy=d.policy,
            shard_index=self.process_index,
            shard_count=self.process_count,
            workers=d.workers,
            start_batch=step,
        )
        self._next_step = step

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's batch for ``step``: ``(images uint8 NHWC, labels int32)``."""
        if self._iterator is None or step != self._next_step:
            self._open(step)
        start = time.perf_counter()
        b = next(self._iterator)
        self._wait += time.perf_counter() - start
        self._next_step = step + 1
        self._skipped += int(b["skipped"].sum())
        return b["image"], b["label"]

    def take_input_stats(self, elapsed: float) -> dict[str, float]:
        """``input_wait_fraction`` of ``elapsed`` seconds and undecodable ``skipped_images``
        since the last call."""
        stats = {
            "input_wait_fraction": self._wait / max(elapsed, 1e-9),
            "skipped_images": float(self._skipped),
        }
        self._wait, self._skipped = 0.0, 0
        return stats

    def close(self) -> None:
        """Stops the worker processes."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None

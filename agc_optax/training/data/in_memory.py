"""In-memory datasets: an offline default, CIFAR-10 from a directory, TFDS from a directory.

Every dataset is loaded into host memory as NHWC ``float32`` images (already normalised) and
``int32`` labels. Batches are cut from a per-epoch permutation that depends only on
``(seed, epoch)``, so the position in the data order is just the global step: a resumed run sees
exactly the batches the uninterrupted run would have seen. Each process materialises only its own
slice of every global batch (multi-host data parallelism).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
from collections.abc import Iterator

import numpy as np

DATASETS = ("digits", "cifar10", "tfds:<name>")
"""Accepted values of ``--dataset``: any TFDS name is given as ``tfds:<name>``."""

_CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
_CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


class DataError(ValueError):
    """A dataset is unknown or its files are missing or malformed."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset held in memory.

    Attributes:
      images: ``(N, H, W, C)`` float32, normalised.
      labels: ``(N,)`` int32.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train and a test split plus what the model needs to know about them."""

    name: str
    train: Split
    test: Split
    num_classes: int
    augment: bool  # random crop + flip; only for natural images (digits are not flip-invariant)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def eval_batches(
        self, global_batch_size: int, *, process_index: int = 0, process_count: int = 1
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:func:`eval_batches` of the test split."""
        return eval_batches(
            self.test, global_batch_size, process_index=process_index, process_count=process_count
        )

    def device_preprocess(self) -> None:
        """None: in-memory images are normalised on the host already (see the streaming
        datasets' counterpart)."""
        return None

    def device_eval_preprocess(self) -> None:
        return None


def load_dataset(name: str, data_dir: str | None = None, *, image_size: int = 16) -> Dataset:
    """Loads a dataset by name.

    Args:
      name: ``"digits"`` (scikit-learn's bundled 8x8 handwritten digits, offline),
        ``"cifar10"`` (official python-pickle batches in ``data_dir``) or ``"tfds:<name>"``
        (a prepared TFDS dataset in ``data_dir``; nothing is downloaded).
      data_dir: directory holding the files, for ``cifar10`` and ``tfds:`` datasets.
      image_size: side length the 8x8 digits are upsampled to (nearest neighbour, a multiple of 8).

    Returns:
      The :class:`Dataset`.

    Raises:
      DataError: unknown name, missing directory or files, malformed files.
    """
    if name == "digits":
        return load_digits(image_size)
    if name == "cifar10":
        if not data_dir:
            raise DataError(
                "`--dataset cifar10` needs `--data-dir` pointing at cifar-10-batches-py"
            )
        return load_cifar10(data_dir)
    if name.startswith("tfds:"):
        if not data_dir:
            raise DataError(f"`--dataset {name}` needs `--data-dir` with the prepared TFDS data")
        return load_tfds(name.removeprefix("tfds:"), data_dir)
    raise DataError(f"unknown dataset `{name}`; valid: {', '.join(DATASETS)}")


def load_digits(image_size: int = 16, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's digits (1,797 real 8x8 scans, shipped inside the wheel), split 80/20.

    Args:
      image_size: output side length, a multiple of 8 (nearest-neighbour upsampling, so the
        network's stride-32 trunk still has spatial extent to work with).
      test_fraction: share of images held out, chosen by a fixed permutation.

    Returns:
      The :class:`Dataset`, images ``(N, image_size, image_size, 3)``.
    """
    if image_size % 8:
        raise DataError(f"`image_size` must be a multiple of 8 for digits, got {image_size}")
    from sklearn.datasets import load_digits as _load  # optional dependency: the `train` extra

    bunch = _load()
    images = bunch.images.astype(np.float32) / 16.0
    factor = image_size // 8
    # Three identical channels: every model family in the zoo takes RGB input.
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)[..., None].repeat(3, axis=-1)
    labels = bunch.target.astype(np.int32)
    # A fixed split, independent of the training seed, so test accuracy is comparable across runs.
    order = np.random.default_rng(0).permutation(len(labels))
    num_test = int(round(len(labels) * test_fraction))
    test_idx, train_idx = order[:num_test], order[num_test:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return Dataset(
        name="digits",
        train=Split(images[train_idx], labels[train_idx]),
        test=Split(images[test_idx], labels[test_idx]),
        num_classes=10,
        augment=False,
    )


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], np.uint8)
        labels = np.asarray(entry.get(b"labels", entry.get(b"fine_labels")), np.int32)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except FileNotFoundError:
        raise DataError(f"missing CIFAR-10 file `{path}`") from None
    except Exception as e:  # a truncated or foreign file: say which one
        raise DataError(
            f"`{path}` is not a CIFAR-10 python batch ({type(e).__name__}: {e})"
        ) from None
    if len(images) != len(labels):
        raise DataError(f"`{path}`: {len(images)} images but {len(labels)} labels")
    return images, labels


def load_cifar10(data_dir: str) -> Dataset:
    """CIFAR-10 from the official python version (``data_batch_1..5``, ``test_batch``).

    Args:
      data_dir: the extracted ``cifar-10-batches-py`` directory, or its parent.

    Returns:
      The :class:`Dataset`, normalised with the usual CIFAR-10 channel statistics.
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"`--data-dir` `{data_dir}` does not exist")
    if os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py")):
        data_dir = os.path.join(data_dir, "cifar-10-batches-py")
    parts = [_read_cifar_batch(os.path.join(data_dir, f"data_batch_{i}")) for i in range(1, 6)]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_cifar_batch(os.path.join(data_dir, "test_batch"))

    def norm(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float32) / 255.0 - _CIFAR_MEAN) / _CIFAR_STD

    return Dataset(
        name="cifar10",
        train=Split(norm(train_x), train_y),
        test=Split(norm(test_x), test_y),
        num_classes=10,
        augment=True,
    )


def load_tfds(name: str, data_dir: str) -> Dataset:
    """A prepared TFDS image-classification dataset from ``data_dir``; nothing is downloaded.

    The whole dataset is read into memory, so this suits small datasets (MNIST, CIFAR-100, ...).

    Args:
      name: TFDS name, e.g. ``"cifar100"`` or ``"mnist:3.0.1"``.
      data_dir: the TFDS data directory holding ``<name>/<version>/``.

    Returns:
      The :class:`Dataset`, images scaled to [0, 1] and standardised per channel.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "`tfds:` datasets need tensorflow-datasets: pip install tensorflow-datasets tensorflow"
        ) from None
    if not os.path.isdir(data_dir):
        raise DataError(f"`--data-dir` `{data_dir}` does not exist")
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
        info = builder.info
        splits = {}
        for split in ("train", "test"):
            ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
            x, y = tfds.as_numpy(ds)
            splits[split] = (np.asarray(x), np.asarray(y, np.int32))
    except Exception as e:  # tfds raises many types for "not prepared here"
        raise DataError(
            f"cannot read TFDS `{name}` from `{data_dir}` ({type(e).__name__})"
        ) from None
    train_x = splits["train"][0].astype(np.float32) / 255.0
    mean = train_x.mean(axis=(0, 1, 2))
    std = train_x.std(axis=(0, 1, 2)) + 1e-6
    test_x = splits["test"][0].astype(np.float32) / 255.0
    return Dataset(
        name=f"tfds:{name}",
        train=Split((train_x - mean) / std, splits["train"][1]),
        test=Split((test_x - mean) / std, splits["test"][1]),
        num_classes=int(info.features["label"].num_classes),
        augment=True,
    )


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where in the data order a run stands: the next batch is batch ``index`` of ``epoch``."""

    epoch: int
    index: int


class TrainBatches:
    """Deterministic, resumable, per-process training batches.

    The permutation for ``epoch`` comes from ``np.random.default_rng([seed, epoch])``; global batch
    ``index`` of that epoch is a contiguous slice of it, and process ``p`` takes rows
    ``[p * B_local, (p + 1) * B_local)`` of the global batch. Incomplete final batches are dropped.

    Args:
      split: the training split.
      global_batch_size: examples per step summed over all processes.
      seed: the data-order seed.
      process_index: this process, in ``[0, process_count)``.
      process_count: number of processes sharing the global batch.
      augment: random crop (4-pixel padding) and horizontal flip, keyed on ``(seed, step)``.
    """

    def __init__(
        self,
        split: Split,
        global_batch_size: int,
        seed: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
        augment: bool = False,
    ):
        if global_batch_size % process_count:
            raise DataError(
                f"`--batch-size` {global_batch_size} is not divisible by {process_count} processes"
            )
        if global_batch_size > len(split):
            raise DataError(
                f"`--batch-size` {global_batch_size} exceeds the {len(split)} training examples"
            )
        self.split = split
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed = seed
        self.process_index = process_index
        self.augment = augment
        self.steps_per_epoch = len(split) // global_batch_size
        self._wait = 0.0

    def position(self, step: int) -> DataPosition:
        """The data position before training step ``step`` (0-based)."""
        return DataPosition(*divmod(step, self.steps_per_epoch))

    def step_of(self, position: DataPosition) -> int:
        """Inverse of :meth:`position`."""
        return position.epoch * self.steps_per_epoch + position.index

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.split))

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's slice of the global batch for ``step``: ``(images, labels)``."""
        start = time.perf_counter()
        try:
            return self._batch(step)
        finally:
            self._wait += time.perf_counter() - start

    def take_input_stats(self, elapsed: float) -> dict[str, float]:
        """The share of ``elapsed`` seconds spent making batches since the last call."""
        stats = {"input_wait_fraction": self._wait / max(elapsed, 1e-9)}
        self._wait = 0.0
        return stats

    def _batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        pos = self.position(step)
        perm = self._permutation(pos.epoch)
        start = pos.index * self.global_batch_size + self.process_index * self.local_batch_size
        idx = perm[start : start + self.local_batch_size]
        images, labels = self.split.images[idx], self.split.labels[idx]
        if self.augment:
            images = _crop_flip(
                images, np.random.default_rng([self.seed, step, 1, self.process_index])
            )
        return images, labels

    def iterate(self, start_step: int, num_steps: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches for steps ``start_step .. num_steps - 1``."""
        for step in range(start_step, num_steps):
            yield self.batch(step)


def _crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    out = np.empty_like(images)
    for i in range(n):
        crop = padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def eval_batches(
    split: Split, global_batch_size: int, *, process_index: int = 0, process_count: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This process's slices of fixed-size evaluation batches, padded, with a validity mask.

    Every example is seen exactly once across processes; padding rows have mask 0, so every
    batch has the same shape and the eval step compiles once.

    Yields:
      ``(images, labels, mask)`` with leading dimension ``global_batch_size // process_count``.
    """
    local = global_batch_size // process_count
    n = len(split)
    for start in range(0, n, global_batch_size):
        idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
        mask = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        yield split.images[idx], split.labels[idx], mask

"""Data loaders and the deterministic, resumable, per-process batch order."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from agc_optax.training import data


def _write_cifar(directory, num_per_batch: int = 6, seed: int = 0) -> dict[str, tuple]:
    """Writes files in the official python-pickle format (bytes keys, CHW-flattened uint8 rows)."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (num_per_batch, 3 * 32 * 32), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, num_per_batch)]
        with open(os.path.join(directory, name), "wb") as f:
            pickle.dump(
                {
                    b"batch_label": name.encode(),
                    b"labels": y,
                    b"data": x,
                    b"filenames": [b"x.png"] * num_per_batch,
                },
                f,
            )
        written[name] = (x, y)
    return written


def test_cifar10_loader_reads_official_format(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    written = _write_cifar(root)
    for where in (root, tmp_path):  # the batches directory or its parent
        ds = data.load_dataset("cifar10", str(where))
        assert ds.train.images.shape == (30, 32, 32, 3) and ds.test.images.shape == (6, 32, 32, 3)
        assert ds.train.images.dtype == np.float32 and ds.train.labels.dtype == np.int32
        assert ds.num_classes == 10 and ds.augment
    x, y = written["data_batch_2"]
    np.testing.assert_array_equal(ds.train.labels[6:12], y)
    # Row layout: 1024 red, then green, then blue values, each row-major over 32x32 pixels.
    pixel = x[0].reshape(3, 32, 32)[:, 5, 7].astype(np.float32) / 255.0
    expected = (pixel - data.in_memory._CIFAR_MEAN) / data.in_memory._CIFAR_STD
    np.testing.assert_allclose(ds.train.images[6, 5, 7], expected, rtol=1e-6)


def test_cifar10_missing_or_malformed_files(tmp_path):
    with pytest.raises(data.DataError, match="needs `--data-dir`"):
        data.load_dataset("cifar10")
    root = tmp_path / "c"
    _write_cifar(root)
    os.remove(root / "data_batch_3")
    with pytest.raises(data.DataError, match="missing CIFAR-10 file .*data_batch_3"):
        data.load_cifar10(str(root))
    (root / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="data_batch_3` is not a CIFAR-10 python batch"):
        data.load_cifar10(str(root))


def test_unknown_dataset_lists_valid_ones():
    with pytest.raises(data.DataError, match="unknown dataset `mnist`; valid: digits, cifar10"):
        data.load_dataset("mnist")


def test_tfds_without_package_or_dir_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="tfds"):
        data.load_dataset("tfds:mnist", str(tmp_path / "absent"))


def test_digits_shapes_split_and_normalisation():
    ds = data.load_digits(16)
    assert ds.train.images.shape == (1438, 16, 16, 3) and ds.test.images.shape == (359, 16, 16, 3)
    assert set(np.unique(ds.train.labels)) == set(range(10))
    assert abs(float(ds.train.images.mean())) < 1e-4
    again = data.load_digits(16)
    np.testing.assert_array_equal(ds.test.labels, again.test.labels)  # fixed split
    assert data.load_digits(8).train.images.shape[1:] == (8, 8, 3)


def test_batches_are_deterministic_and_resumable():
    split = data.load_digits(8).train
    a = data.TrainBatches(split, 64, seed=3)
    b = data.TrainBatches(split, 64, seed=3)
    steps = a.steps_per_epoch
    # A "resumed" reader jumping straight to a step sees exactly what the first one saw.
    for step in (0, 5, steps - 1, steps, 3 * steps + 2):
        np.testing.assert_array_equal(a.batch(step)[1], b.batch(step)[1])
        np.testing.assert_array_equal(a.batch(step)[0], b.batch(step)[0])
        assert a.step_of(a.position(step)) == step
    assert a.position(steps + 2) == data.DataPosition(1, 2)
    # Every example once per epoch (minus the dropped remainder), and epochs differ in order.
    epoch0 = np.concatenate([a.batch(s)[1] for s in range(steps)])
    assert len(epoch0) == steps * 64
    assert not np.array_equal(a.batch(0)[1], a.batch(steps)[1])
    other_seed = data.TrainBatches(split, 64, seed=4)
    assert not np.array_equal(a.batch(0)[0], other_seed.batch(0)[0])


def test_processes_take_disjoint_slices_of_the_global_batch():
    split = data.Split(np.arange(40, dtype=np.float32).reshape(40, 1, 1, 1), np.arange(40))
    whole = data.TrainBatches(split, 8, seed=0)
    parts = [
        data.TrainBatches(split, 8, seed=0, process_index=i, process_count=2) for i in range(2)
    ]
    for step in range(7):
        joined = np.concatenate([p.batch(step)[1] for p in parts])
        np.testing.assert_array_equal(joined, whole.batch(step)[1])
    with pytest.raises(data.DataError, match="not divisible by 3 processes"):
        data.TrainBatches(split, 8, seed=0, process_count=3)


def test_cifar_augmentation_is_keyed_on_step():
    rng = np.random.default_rng(0)
    split = data.Split(rng.normal(size=(16, 8, 8, 3)).astype(np.float32), np.arange(16))
    a = data.TrainBatches(split, 4, seed=1, augment=True)
    np.testing.assert_array_equal(a.batch(2)[0], a.batch(2)[0])
    assert a.batch(2)[0].shape == (4, 8, 8, 3)


def test_eval_batches_pad_and_mask_every_example_once():
    split = data.Split(np.zeros((10, 1, 1, 1), np.float32), np.arange(10))
    seen = []
    for pid in range(2):
        for _, labels, mask in data.eval_batches(split, 4, process_index=pid, process_count=2):
            assert labels.shape == (2,)
            seen += [int(v) for v, m in zip(labels, mask, strict=True) if m]
    assert sorted(seen) == list(range(10))

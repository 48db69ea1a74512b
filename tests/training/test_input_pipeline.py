"""The streaming input pipeline on generated ImageFolders: sources, agc-prepare's ArrayRecord
shards, per-epoch shuffling, process sharding, corrupt files, resumable state, worker counts."""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest

from agc_optax import prepare
from agc_optax.training import data
from tests.training.image_folder import CLASS_COLOURS, colour_of, make_image_folder

SIZE = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    info = make_image_folder(root)
    return root, info


def _check_labels_follow_pixels(images: np.ndarray, labels: np.ndarray) -> int:
    """Each coloured image's mean colour is nearest its own class colour; returns how many."""
    checked = 0
    colours = np.stack([colour_of(k) for k in range(len(CLASS_COLOURS))])
    for image, label in zip(images, labels, strict=True):
        mean = image.reshape(-1, 3).mean(0)
        if np.ptp(mean) < 20:  # the grayscale JPEG has lost its class colour
            continue
        assert np.argmin(((colours - mean) ** 2).sum(1)) == label
        checked += 1
    return checked


def test_image_folder_source_lists_sorted_classes_and_only_images(folder):
    root, info = folder
    src = data.ImageFolderSource(str(root), "train")
    assert src.class_names == sorted(CLASS_COLOURS)
    assert len(src) == info["train"] + 1  # the corrupt file is listed; decoding skips it
    names = [src[i].name for i in range(len(src))]
    assert "train/ant/notes.txt" not in names
    assert {"train/cat/really_png.JPEG", "train/cat/upper.PNG", "train/bee/cmyk.jpg"} <= set(names)
    assert names == sorted(names, key=lambda n: (n.split("/")[1], n.split("/")[2]))
    record = src[names.index("train/bee/cmyk.jpg")]
    assert record.label == 1 and record.data == (root / "train/bee/cmyk.jpg").read_bytes()
    np.testing.assert_array_equal(src.labels, [src[i].label for i in range(len(src))])
    val = data.ImageFolderSource(str(root), "val")
    assert len(val) == info["val"] and val.class_names == src.class_names


def test_odd_files_decode_to_rgb_and_the_corrupt_one_raises(folder):
    root, _ = folder
    for name, label in [
        ("ant/gray.jpeg", None),
        ("bee/cmyk.jpg", 1),
        ("cat/really_png.JPEG", 2),
        ("cat/upper.PNG", 2),
    ]:
        image = np.asarray(data.decode_image((root / "train" / name).read_bytes()))
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, name
        mean = image.reshape(-1, 3).mean(0)
        if label is None:
            assert np.ptp(mean) < 3  # gray stays gray in RGB
        else:  # CMYK and PNG keep their class colour through the conversion
            assert np.abs(mean - colour_of(label)).max() < 12, (name, mean)
    with pytest.raises(OSError):
        data.decode_image((root / "train/cat/broken.jpg").read_bytes())


def test_missing_directories_and_foreign_classes_are_clear_errors(tmp_path, folder):
    with pytest.raises(data.DataError, match="needs `--data-dir`"):
        data.open_source("imagefolder", None, "train")
    with pytest.raises(data.DataError, match="`--data-dir` `.*absent` does not exist"):
        data.open_source("imagefolder", str(tmp_path / "absent"), "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(data.DataError, match="no class sub-directories"):
        data.ImageFolderSource(str(tmp_path), "train")
    (tmp_path / "train" / "a").mkdir()
    (tmp_path / "train" / "a" / "x.txt").write_text("no images")
    with pytest.raises(data.DataError, match="holds no .jpg/.jpeg/.png files"):
        data.ImageFolderSource(str(tmp_path), "train")
    root, _ = folder
    with pytest.raises(data.DataError, match="classes not in the train split: ant"):
        data.ImageFolderSource(str(root), "val", class_names=["bee", "cat"])
    with pytest.raises(data.DataError, match="no `train-\\*.array_record` shards"):
        data.ArrayRecordSource(str(root), "train")


def test_epochs_are_reshuffled_and_two_processes_read_disjoint_shards_covering_the_data():
    n, seed = 23, 5
    first = data.epoch_order(n, seed, 0)
    assert sorted(first) == list(range(n))
    assert not np.array_equal(first, data.epoch_order(n, seed, 1))  # a new order every epoch
    np.testing.assert_array_equal(first, data.epoch_order(n, seed, 0))  # and a fixed one
    assert not np.array_equal(first, data.epoch_order(n, seed + 1, 0))
    for epoch in (0, 3):
        a = data.epoch_order(n, seed, epoch, shard_index=0, shard_count=2)
        b = data.epoch_order(n, seed, epoch, shard_index=1, shard_count=2)
        assert not set(a) & set(b)
        assert sorted(np.concatenate([a, b])) == list(range(n))
        assert abs(len(a) - len(b)) <= 1


def test_train_batches_skip_the_corrupt_file_once_per_epoch_and_keep_labels(folder):
    root, info = folder
    src = data.ImageFolderSource(str(root), "train")
    n = len(src)  # 17 records, one corrupt: batches of n cover exactly one epoch each
    it = data.train_iterator(src, batch_size=n, image_size=SIZE, seed=0, workers=0)
    with pytest.warns(data.CorruptImageWarning, match="skipping `train/cat/broken.jpg`"):
        batches = [next(it) for _ in range(2)]
    for batch in batches:
        assert batch["image"].shape == (n, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32
        assert batch["skipped"].sum() == 1  # the corrupt file, replaced by the next record
        assert _check_labels_follow_pixels(batch["image"], batch["label"]) >= n - 2
    # Every class appears as often as it has decodable files (plus the one replacement).
    counts = np.bincount(batches[0]["label"], minlength=3)
    assert counts.sum() == n and counts[0] >= 5 and counts[1] >= 5


def test_resumed_iterator_continues_with_the_same_batches(folder):
    root, _ = folder
    src = data.ImageFolderSource(str(root), "val")
    policy = data.AugmentPolicy.parse("randaugment_405")

    def make(start_batch=0):
        return data.train_iterator(
            src, batch_size=4, image_size=SIZE, seed=3, policy=policy, start_batch=start_batch
        )

    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = make()
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    started_at_3 = make(start_batch=3)  # how the trainer resumes: the step is the position
    for want in expected:
        for got in (next(resumed), next(started_at_3)):
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])


def test_batches_are_the_same_with_0_and_2_workers(folder):
    # (Resuming with workers, through the trainer: test_streaming_train.py.)
    root, _ = folder
    src = data.ImageFolderSource(str(root), "train")
    policy = data.AugmentPolicy.parse("randaugment_415")

    def make(workers):
        return data.train_iterator(
            src, batch_size=5, image_size=SIZE, seed=1, policy=policy, workers=workers
        )

    with pytest.warns(data.CorruptImageWarning):
        serial = [next(it) for it in [make(0)] for _ in range(6)]
    parallel = make(2)
    got = [next(parallel) for _ in range(6)]
    parallel.close()
    for a, b in zip(serial, got, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert sum(int(b["skipped"].sum()) for b in got) == sum(int(b["skipped"].sum()) for b in serial)


def test_eval_batches_count_every_valid_image_once_across_processes(folder):
    root, info = folder
    src = data.ImageFolderSource(str(root), "train")  # holds the corrupt file
    n = len(src)
    seen_labels, total_mask, batch_counts = [], 0.0, []
    with pytest.warns(data.CorruptImageWarning):
        for p in range(2):
            batches = list(
                data.eval_iterator(src, batch_size=4, image_size=SIZE, shard_index=p, shard_count=2)
            )
            batch_counts.append(len(batches))
            for b in batches:
                assert b["image"].shape == (4, SIZE, SIZE, 3)
                total_mask += b["mask"].sum()
                seen_labels += list(b["label"][b["mask"] > 0])
    assert batch_counts[0] == batch_counts[1] == 3  # ceil(9 / 4): equal on every process
    assert total_mask == n - 1 == info["train"]  # padding and the corrupt file never count
    expected = [src[i].label for i in range(n) if src[i].name != info["corrupt"]]
    assert sorted(seen_labels) == sorted(expected)


def test_memory_grows_with_the_batch_not_with_the_dataset(tmp_path):
    peaks = []
    for per_class in (3, 30):
        root = tmp_path / f"n{per_class}"
        make_image_folder(root, per_class=per_class, val_per_class=1, odd_files=False)
        src = data.ImageFolderSource(str(root), "train")
        tracemalloc.start()
        it = data.train_iterator(src, batch_size=4, image_size=SIZE, seed=0, workers=0)
        for _ in range(6):
            next(it)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        del it
    # 10x the images: the peak (file list, buffered batches) grows by far less than the
    # ~10 x 90 images x ~10 KB of pixels that holding the data would cost.
    assert peaks[1] - peaks[0] < 200_000, peaks


def test_prepare_writes_identical_shards_readable_as_the_same_records(tmp_path, folder, capsys):
    root, info = folder
    out1, out2 = tmp_path / "a", tmp_path / "b"
    for out in (out1, out2):
        status = prepare.main(
            ["--input", str(root), "--output", str(out), "--records-per-shard", "7"]
        )
        assert status == 0
    err = capsys.readouterr().err
    assert "agc-prepare: warning: skipping `train/cat/broken.jpg`" in err
    names = sorted(os.listdir(out1))
    assert names == sorted(os.listdir(out2))
    assert (
        "train-00002-of-00003.array_record" in names and "val-00000-of-00001.array_record" in names
    )
    for name in names:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    assert json.loads((out1 / "class_names.json").read_text()) == sorted(CLASS_COLOURS)
    folder_src = data.ImageFolderSource(str(root), "train")
    shard_src = data.open_source("arrayrecord", str(out1), "train")
    good = [folder_src[i] for i in range(len(folder_src)) if folder_src[i].name != info["corrupt"]]
    assert len(shard_src) == len(good) == info["train"]
    for i, want in enumerate(good):
        assert shard_src[i] == want
    assert len(data.open_source("arrayrecord", str(out1), "val")) == info["val"]
    batch = next(data.train_iterator(shard_src, batch_size=8, image_size=SIZE, seed=0))
    assert (
        batch["skipped"].sum() == 0
        and _check_labels_follow_pixels(batch["image"], batch["label"]) >= 7
    )


def test_prepare_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--output", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["agc-prepare: error: the following arguments are required: --input"]
    assert prepare.main(["--input", str(tmp_path / "absent"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agc-prepare: error: `--input`")
    assert "does not exist" in err[0]


def test_augment_policy_names():
    p = data.AugmentPolicy.parse("cutmix_mixup_randaugment_415")
    assert p.randaugment == (4, 15) and p.mixup_alpha == 0.2 and p.cutmix and p.mixes
    assert data.AugmentPolicy.parse("randaugment_9").randaugment == (2, 9)
    assert not data.AugmentPolicy.parse("none").mixes
    with pytest.raises(data.DataError, match="`--augment autoaugment`: cannot read `autoaugment`"):
        data.AugmentPolicy.parse("autoaugment")
    from agc_optax.models import create_model  # noqa: F401  (the registry's variants)
    from agc_optax.models.nfnet import NFNET_VARIANTS

    # The presets' policies agree with the model family's own record of the paper's recipe.
    for name, policy in data.NFNET_AUGMENT.items():
        ra = NFNET_VARIANTS[name.removeprefix("nfnet_").upper()].ra_level
        assert data.AugmentPolicy.parse(policy).randaugment == (int(ra[0]), int(ra[1:]))

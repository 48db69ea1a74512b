"""agc-eval on a generated ImageFolder with weights the test writes (no download, no real data)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from agc_optax import evaluate
from agc_optax.models import create_model, save_params
from tests.multidevice import run_on_cpu_devices

TINY = {"depths": (1, 1, 1, 1), "widths": (8, 8, 8, 8)}
CLASSES = 6


def _image_folder(root, per_class=2, size=16, seed=0):
    """val/<class>/*.png of random pixels, already at the evaluated size."""
    rng = np.random.default_rng(seed)
    files = []
    for label in range(CLASSES):
        d = root / "val" / f"class{label}"
        d.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / f"{i}.png")
            files.append((d / f"{i}.png", label))
    return files


def test_accuracy_on_four_devices_equals_a_numpy_recomputation(tmp_path):
    files = _image_folder(tmp_path / "data")
    model = create_model("nf_resnet26", CLASSES, rngs=nnx.Rngs(3), **TINY)
    save_params(model, tmp_path / "weights")
    output = tmp_path / "result.json"
    args = ["--model", "nf_resnet26", "--weights", str(tmp_path / "weights")]
    args += ["--model-arg", "depths=(1,1,1,1)", "--model-arg", "widths=(8,8,8,8)"]
    args += ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data")]
    args += ["--resolution", "16", "--crop-fraction", "1.0", "--batch-size", "5"]
    args += ["--workers", "2", "--output", str(output)]
    # The same `data` mesh as training, over 4 devices: batch 5 becomes 8 (2 rows per device),
    # 12 images make a full batch and one padded with 4 rows that must not count.
    stdout = run_on_cpu_devices(
        f"from agc_optax import evaluate\nassert evaluate.main({args!r}) == 0\n", num_devices=4
    )
    result = json.loads(stdout)
    assert result == json.loads(output.read_text())
    assert (result["devices"], result["batch_size"]) == (4, 8)

    # Independent recomputation: the PNGs' pixels (a full-image crop at their own size is the
    # identity), ImageNet's mean/std, the written model, top-k by numpy.
    images = np.stack([np.asarray(Image.open(f), np.float64) for f, _ in files])
    labels = np.array([label for _, label in files])
    mean = np.array([0.485, 0.456, 0.406]) * 255
    std = np.array([0.229, 0.224, 0.225]) * 255
    model.eval()
    logits = np.asarray(model(((images - mean) / std).astype(np.float32)), np.float64)
    ranked = np.argsort(-logits, axis=1)
    top1 = int((ranked[:, 0] == labels).sum())
    top5 = int((ranked[:, :5] == labels[:, None]).any(axis=1).sum())
    assert 0 < top5 < len(files)  # neither trivial: 6 classes, a random network
    assert (result["correct_top1"], result["correct_top5"]) == (top1, top5)
    assert result["top1"] == pytest.approx(100 * top1 / len(files))
    assert result["images"] == len(files) and result["skipped"] == 0
    assert result["resolution"] == 16 and result["images_per_second"] > 0
    assert result["reference_top1"] is None  # nf_resnet26 has no released weights


def test_model_defaults_drive_the_preprocessing():
    # A 40x20 image: the 0.5 center crop is the middle 10x10 square.
    left = np.zeros((20, 40, 3), np.uint8)
    left[5:15, 15:25] = (200, 100, 50)
    import io

    buffer = io.BytesIO()
    Image.fromarray(left).save(buffer, "PNG")
    out = evaluate.preprocess(buffer.getvalue(), 10, crop_fraction=0.5, interpolation="nearest")
    np.testing.assert_array_equal(out, np.broadcast_to([200, 100, 50], (10, 10, 3)))
    assert evaluate.crop_box(40, 20, 0.5, "squash") == (10.0, 5.0, 30.0, 15.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "nf_resnet26"], "give the weights"),
        (["--model", "nf_resnet26", "--weights", "/nonexistent"], "`--weights`"),
        (["--weights", "x", "--batch-size", "0"], "`--model` is required"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    _image_folder(tmp_path / "data", per_class=1)
    argv = [*argv, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data")]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("agc-eval: error: ") and message in err and err.count("\n") == 1


def test_class_mismatch_is_a_usage_error(tmp_path, capsys):
    _image_folder(tmp_path / "data", per_class=1)
    model = create_model("nf_resnet26", 3, rngs=nnx.Rngs(0), **TINY)
    save_params(model, tmp_path / "weights")
    argv = ["--model", "nf_resnet26", "--weights", str(tmp_path / "weights")]
    argv += ["--model-arg", "depths=(1,1,1,1)", "--model-arg", "widths=(8,8,8,8)"]
    argv += ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data")]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("agc-eval: error: the weights' classifier has 3 classes")
    assert err.count("\n") == 1


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "agc_optax.evaluate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: agc-eval")

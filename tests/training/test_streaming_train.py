"""Training on streamed data: the nfnet presets on a generated ImageFolder and on agc-prepare's
shards, top-1/top-5 eval with exact counts, input-wait metrics, bit-exact resume with workers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tiny_model import tiny_model

from agc_optax import prepare
from agc_optax.models.nfnet import NFNET_VARIANTS
from agc_optax.train import _parser, config_from_args
from agc_optax.training import PRESETS, ConfigError, train, validate
from tests.training.image_folder import make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    info = make_image_folder(root, per_class=5, val_per_class=3)
    return root, info


def _small(config, run_dir, **changes):
    """The preset's recipe at toy scale: tiny images, batch and length."""
    small = dict(
        run_dir=str(run_dir),
        image_size=24,
        test_image_size=32,
        batch_size=8,
        steps=6,
        log_every=2,
        eval_every=1000,
        progress=False,
    )
    return config.replace(**{**small, **changes})


def _records(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_nfnet_presets_set_the_papers_resolutions_and_augmentation():
    for name, variant in NFNET_VARIANTS.items():
        if name.endswith("+"):
            continue
        preset = PRESETS[f"nfnet_{name.lower()}"]
        assert (preset.image_size, preset.test_image_size) == (
            variant.train_imsize,
            variant.test_imsize,
        )
        assert preset.augment == f"cutmix_mixup_randaugment_{variant.ra_level}"
        assert preset.dataset == "imagefolder" and preset.batch_size == 4096
    assert (PRESETS["nfnet_f0"].image_size, PRESETS["nfnet_f0"].test_image_size) == (192, 256)
    args = _parser().parse_args(
        ["--preset", "nfnet_f1", "--data-dir", "/d", "--image-size", "64", "--workers", "3"]
    )
    config = config_from_args(args)
    assert (config.image_size, config.test_image_size, config.workers) == (64, 320, 3)
    assert config.augment == "cutmix_mixup_randaugment_410" and config.data_dir == "/d"


def test_streaming_flags_are_validated(tmp_path):
    models = ["nfnet_f0"]
    base = PRESETS["nfnet_f0"]
    with pytest.raises(ConfigError, match="`--dataset imagefolder` needs `--data-dir`"):
        validate(base, models)
    ok = base.replace(data_dir=str(tmp_path))
    validate(ok, models)
    with pytest.raises(ConfigError, match="`--augment cutmix_autoaugment`: cannot read"):
        validate(ok.replace(augment="cutmix_autoaugment"), models)
    with pytest.raises(ConfigError, match="`--workers` must be >= 0"):
        validate(ok.replace(workers=-1), models)
    with pytest.raises(ConfigError, match="`--test-image-size` must be > 0"):
        validate(ok.replace(test_image_size=0), models)


def test_nfnet_f0_recipe_trains_on_an_image_folder_with_exact_eval_counts(folder, tmp_path):
    root, info = folder
    config = _small(PRESETS["nfnet_f0"], tmp_path / "run", data_dir=str(root), workers=0)
    result = train(config, model_fn=tiny_model, log=lambda _: None)
    assert result.steps == 6 and np.isfinite(result.test_accuracy)
    records = _records(tmp_path / "run")
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    for r in train_records:
        assert 0.0 <= r["input_wait_fraction"] <= 1.0 and np.isfinite(r["loss"])
    # One corrupt file in an epoch of 20 records: 48 examples read it two or three times.
    assert sum(r["skipped_images"] for r in train_records) in (2.0, 3.0)
    evals = [r for r in records if r["split"].startswith("eval")]
    assert {r["split"] for r in evals} == {"eval", "eval_ema"}  # the preset keeps an EMA
    for r in evals:
        assert r["count"] == info["val"]  # 9 images in batches of 8: padding never counted
        assert r["accuracy"] <= r["top5_accuracy"] == 1.0  # 3 classes: always in the top 5


def test_arrayrecord_with_workers_resumes_bit_for_bit(folder, tmp_path):
    root, _ = folder
    shards = tmp_path / "shards"
    assert prepare.main(["--input", str(root), "--output", str(shards), "--no-progress"]) == 0
    config = _small(
        # RandAugment runs in the workers; MixUp/CutMix (device) are tested above and only cost
        # compile time here.
        PRESETS["nfnet_f0"].replace(dtype="float32", augment="randaugment_405"),
        tmp_path / "full",
        dataset="arrayrecord",
        data_dir=str(shards),
        workers=1,
        steps=8,
        checkpoint_every=4,
    )
    full = train(config, model_fn=tiny_model, log=lambda _: None)
    # The interrupted run: its newest checkpoint is gone, so --resume continues from step 4
    # with a pipeline started at batch 4 (new worker processes).
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "8")
    logs = []
    resumed = train(
        config.replace(run_dir=str(tmp_path / "resumed"), resume=True),
        model_fn=tiny_model,
        log=logs.append,
    )
    assert any("resumed from step 4" in line for line in logs)
    leaves_a = _flatten(full.params)
    leaves_b = _flatten(resumed.params)
    assert leaves_a.keys() == leaves_b.keys()
    for k in leaves_a:
        assert np.array_equal(leaves_a[k], leaves_b[k]), k


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def test_eval_top5_and_soft_label_loss_match_numpy():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from agc_optax.training import make_eval_step, split_model
    from agc_optax.training import step as step_lib

    class Linear(nnx.Module):  # the cheapest classifier to compile
        def __init__(self):
            self.head = nnx.Linear(12, 8, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.head(x.reshape(x.shape[0], -1))

    split, params, stats = split_model(Linear())
    images = jax.random.normal(jax.random.key(1), (12, 2, 2, 3))
    labels = jnp.arange(12) % 8
    mask = jnp.array([1.0] * 10 + [0.0] * 2)
    sums = jax.jit(make_eval_step(split))(params, stats, images, labels, mask)
    logits = np.asarray(split.merge(False, params, stats)(images), np.float64)
    rank = (logits > logits[np.arange(12), labels][:, None]).sum(1)  # logits above the label's
    assert float(sums["correct_top5"]) == float(((rank < 5) * mask).sum())
    assert float(sums["correct"]) == float(((rank == 0) * mask).sum())
    assert 0 < float(sums["correct_top5"]) < 10  # an untrained net: the count can fail both ways
    # Soft targets (MixUp/CutMix rows) with label smoothing: -sum(q log softmax), q smoothed.
    soft = np.random.default_rng(0).dirichlet(np.ones(8), 12)
    q = soft * 0.9 + 0.1 / 8
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(
        np.asarray(step_lib._cross_entropy(jnp.asarray(logits), jnp.asarray(soft), 0.1)),
        -(q * log_p).sum(1),
        rtol=1e-5,
    )

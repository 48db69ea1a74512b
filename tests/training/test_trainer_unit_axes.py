"""Training a scan_blocks NFNet: its own AGC unit rules reach the optimizer, and the step's
reseed accepts the stacks' per-layer stochastic-depth streams."""

from __future__ import annotations

import pytest

from agc_optax.models.nfnet import SCANNED_UNIT_AXES, NFNet
from agc_optax.training import PRESETS, recipe, train


@pytest.mark.slow  # ~57 s on 2 cores: compiles a scanned NFNet train step
def test_scanned_nfnet_trains_with_its_unit_axes(tmp_path, monkeypatch):
    # Before: the step's nnx.reseed refused the stacked (one key per layer) dropout streams, and
    # the default unit rules merged the layer axis into every unit.
    seen = []
    build = recipe.build_optimizer

    def spy(config, schedule, unit_axes=None):
        seen.append(unit_axes)
        return build(config, schedule, unit_axes)

    monkeypatch.setattr(recipe, "build_optimizer", spy)

    def scanned_nfnet(num_classes, *, dtype, rngs):
        # F0's blocks at the smallest width its group size allows; stage 1 holds two identity
        # blocks, which scan_blocks stacks into leaves with a layer axis.
        return NFNet(
            num_classes,
            "F0",
            widths=(256,) * 4,
            depths=(1, 3, 1, 1),
            scan_blocks=True,
            dtype=dtype,
            rngs=rngs,
        )

    config = PRESETS["smoke"].replace(
        steps=2, image_size=16, run_dir=str(tmp_path / "run"), progress=False
    )
    result = train(config, model_fn=scanned_nfnet, log=lambda _: None)
    assert seen == [SCANNED_UNIT_AXES]
    assert result.steps == 2

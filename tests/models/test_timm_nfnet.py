"""timm's NFNets against timm's own outputs (shared/reference/timm) and the timm loader.

The reference cases were produced by timm 1.0.31 in float32 (see the README there): a reduced
``eca_nfnet_l0`` and ``dm_nfnet_f0`` with perturbed weights, their logits and every stage's
output; ``timm_manifest.json`` holds the parameter totals and state-dict shapes of the full
models.
"""

from __future__ import annotations

import functools
import importlib.util
import json

import jax
import numpy as np
import pytest
from flax import nnx

from agc_optax.models import (
    NFNet,
    TimmNFNet,
    TimmNFNetConfig,
    TimmWeightsError,
    create_model,
    get_config,
    list_models,
    load_timm_state_dict,
)
from agc_optax.models.timm_nfnet import TIMM_NFNET_VARIANTS

from .reference import num_params, reference_file

TIMM_NAMES = [f"dm_nfnet_f{i}" for i in range(7)] + [
    "nfnet_l0",
    "eca_nfnet_l0",
    "eca_nfnet_l1",
    "eca_nfnet_l2",
]
# The reference cases: timm.create_model(case, num_classes=10, depths=(3, 1, 1, 1),
# channels=(256, 512, 512, 512), num_features=...).
CASES = {"eca_nfnet_l0": 768, "dm_nfnet_f0": 1024}


def _tolerance(want: np.ndarray) -> float:
    # float32 rounding through ~20 layers: timm's own JAX cross-check reached 1.9e-6 on the
    # logits. The converter mistakes it guards against move the logits by 1.6e-4 (tanh GELU)
    # to 1.3 (padding, gamma placement).
    return 1e-5 * max(1.0, float(np.abs(want).max()))


def _case_model(case: str, num_classes: int = 10) -> TimmNFNet:
    return nnx.eval_shape(
        lambda: create_model(
            case,
            num_classes,
            depths=(3, 1, 1, 1),
            widths=(256, 512, 512, 512),
            num_features=CASES[case],
            rngs=nnx.Rngs(0),
        )
    )


@functools.cache
def _state_dict(case: str) -> dict[str, np.ndarray]:
    with np.load(reference_file(f"timm/{case}_state_dict.npz")) as npz:
        return {k: npz[k] for k in npz.files}


def _input() -> np.ndarray:
    return np.load(reference_file("timm/input_nchw.npy")).transpose(0, 2, 3, 1)  # NHWC


@functools.cache
def _outputs(case: str) -> dict[str, np.ndarray]:
    """One compiled run of the loaded reference model: logits, intermediates, the zoo API."""
    model = load_timm_state_dict(_case_model(case), _state_dict(case))
    model.eval()

    @nnx.jit
    def run(model, x):
        outputs = model.forward_intermediates(x)
        features = model.forward_features(x)
        outputs["logits"] = model(x)
        outputs["features"] = features
        outputs["head(features)"] = model.forward_head(features)
        outputs["pre_logits"] = model.forward_head(features, pre_logits=True)
        return outputs

    # Full float32 convolutions also on GPUs, whose default (TF32) would miss timm's values.
    with jax.default_matmul_precision("float32"):
        return {k: np.asarray(v) for k, v in run(model, _input()).items()}


def _flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_every_intermediate_equal_timms(case):
    got = _outputs(case)
    want_logits = np.load(reference_file(f"timm/{case}_logits.npy"))
    np.testing.assert_allclose(got["logits"], want_logits, rtol=0, atol=_tolerance(want_logits))
    with np.load(reference_file(f"timm/{case}_intermediates.npz")) as npz:
        assert set(npz.files) == {
            "stem", "stages.0", "stages.1", "stages.2", "stages.3",
            "final_conv", "final_act", "head.global_pool",
        }  # fmt: skip
        for name in npz.files:
            want = npz[name]
            mine = got["pool" if name == "head.global_pool" else name]
            if mine.ndim == 4:
                mine = mine.transpose(0, 3, 1, 2)  # NHWC -> timm's NCHW
            assert mine.shape == want.shape, name
            np.testing.assert_allclose(mine, want, rtol=0, atol=_tolerance(want), err_msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_zoo_api_on_the_reference_model(case):
    got = _outputs(case)
    assert got["features"].shape == (2, 2, 2, CASES[case])
    np.testing.assert_array_equal(got["features"], got["final_act"])
    np.testing.assert_allclose(got["head(features)"], got["logits"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["pre_logits"], got["pool"], rtol=0, atol=1e-6)
    model = load_timm_state_dict(_case_model(case), _state_dict(case))
    assert model.num_features == CASES[case]
    facts = json.loads(reference_file(f"timm/{case}_config.json").read_text())
    assert model.feature_info == facts["feature_info"]
    for info in model.feature_info:  # Backbone features: 64x64 input, NHWC.
        size = 64 // info["reduction"]
        assert got[info["module"]].shape == (2, size, size, info["num_chs"]), info
    model.reset_classifier(5, rngs=nnx.Rngs(3))
    assert model.head.kernel.shape == (CASES[case], 5)
    assert float(np.std(np.asarray(model.head.kernel[...]))) == pytest.approx(0.01, rel=0.1)
    model.reset_classifier(0)
    assert model.head is None
    model.eval()
    pooled = nnx.jit(lambda m, f: m.forward_head(f))(model, got["features"])
    np.testing.assert_allclose(pooled, got["pool"], rtol=0, atol=1e-6)


def test_registered_configs_are_timms():
    """The registry entries against the NfCfg timm registered (timm_manifest.json)."""
    manifest = json.loads(reference_file("timm/timm_manifest.json").read_text())
    for name in TIMM_NAMES:
        config = get_config(name)
        assert isinstance(config, TimmNFNetConfig) and config.variant == name
        if name not in manifest:
            continue
        timm = manifest[name]["nf_cfg"]
        assert config.depths == tuple(timm["depths"]) and config.widths == tuple(timm["channels"])
        assert config.num_features == timm["num_features"] == manifest[name]["num_features"]
        assert config.stem_width == timm["stem_chs"] and config.group_size == timm["group_size"]
        assert config.bottleneck_ratio == timm["bottle_ratio"]
        assert config.attention == timm["attn_layer"] and config.activation == timm["act_layer"]
        assert config.se_ratio == timm["attn_kwargs"].get("rd_ratio", config.se_ratio)
        assert config.gamma_in_activation == timm["gamma_in_act"]
        assert config.same_padding == timm["same_padding"] and config.skipinit == timm["skipinit"]
        assert config.ws_epsilon == timm["std_conv_eps"] and config.alpha == timm["alpha"]
        assert (3, config.train_imsize, config.train_imsize) == tuple(
            manifest[name]["pretrained_cfg_input_size"]
        )
        assert (3, config.test_imsize, config.test_imsize) == tuple(
            manifest[name]["pretrained_cfg_test_input_size"]
        )
    # The F-series depths follow DeepMind's, like our NFNet's.
    for i in range(7):
        assert get_config(f"dm_nfnet_f{i}").depths == get_config(f"nfnet_f{i}").depths
    assert set(TIMM_NAMES) <= set(list_models())


@pytest.mark.parametrize(
    "name", ["dm_nfnet_f0", "dm_nfnet_f1", "nfnet_l0", "eca_nfnet_l0", "eca_nfnet_l1",
             "eca_nfnet_l2"],
)  # fmt: skip
def test_full_models_match_timms_parameters_and_state_dict(name):
    """Totals to the unit, and every one of timm's keys and shapes maps onto the model."""
    entry = json.loads(reference_file("timm/timm_manifest.json").read_text())[name]
    model = nnx.eval_shape(lambda: create_model(name, 1000, rngs=nnx.Rngs(0)))
    assert num_params(model) == entry["total"]
    # Zero-stride views stand in for the weights, plus one key that cannot load, so the
    # loader reports the match without filling (or allocating) the model.
    shapes = {k: tuple(s) for k, s in entry["state_dict"].items()}
    views = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    views["sentinel.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(TimmWeightsError) as info:
        load_timm_state_dict(model, views)
    assert "(0 missing, 1 unexpected, 0 shape mismatches, 0 refused values)" in str(info.value)


# ----------------------------------------------------------------------------- loading


def test_safetensors_npz_and_mapping_load_the_same_values(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state_dict = _state_dict("eca_nfnet_l0")
    safetensors_numpy.save_file(state_dict, tmp_path / "model.safetensors")
    np.savez(tmp_path / "model.npz", **state_dict)
    want = _flat_params(load_timm_state_dict(_case_model("eca_nfnet_l0"), state_dict))
    # The layouts, independently of the table: timm's OIHW conv -> HWIO, (O,1,1,1) gain,
    # Linear (out, in) -> (in, out), 1x1 SE convs, ECA (1, 1, k).
    np.testing.assert_array_equal(
        want["stages/1/0/conv2/kernel"],
        state_dict["stages.1.0.conv2.weight"].transpose(2, 3, 1, 0),
    )
    assert want["stages/1/0/conv2/kernel"].shape == (3, 3, 64, 128)  # Two groups.
    np.testing.assert_array_equal(
        want["stem/conv1/gain"], state_dict["stem.conv1.gain"][:, 0, 0, 0]
    )
    np.testing.assert_array_equal(want["head/kernel"], state_dict["head.fc.weight"].T)
    np.testing.assert_array_equal(
        want["stages/3/0/attn_last/kernel"], state_dict["stages.3.0.attn_last.conv.weight"][0, 0]
    )
    assert len(want) == len(state_dict) == 107
    for path in (tmp_path / "model.safetensors", str(tmp_path / "model.npz")):
        got = _flat_params(load_timm_state_dict(_case_model("eca_nfnet_l0"), path))
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{path}: {key}")


def test_se_and_skipinit_layouts():
    state_dict = _state_dict("dm_nfnet_f0")
    got = _flat_params(load_timm_state_dict(_case_model("dm_nfnet_f0"), state_dict))
    np.testing.assert_array_equal(
        got["stages/0/1/attn_last/fc0/kernel"],
        state_dict["stages.0.1.attn_last.fc1.weight"][:, :, 0, 0].T,
    )
    assert got["stages/0/1/attn_last/fc1/kernel"].shape == (128, 256)
    assert got["stages/2/0/skip_gain"] == state_dict["stages.2.0.skipinit_gain"]
    assert len(got) == len(state_dict) == 131


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_torch_pth_loads_like_the_mapping(tmp_path):
    import torch

    state_dict = _state_dict("eca_nfnet_l0")
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state_dict.items()}},
               tmp_path / "model.pth")  # fmt: skip
    got = _flat_params(load_timm_state_dict(_case_model("eca_nfnet_l0"), tmp_path / "model.pth"))
    want = state_dict["final_conv.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(got["final_conv/kernel"], want)


def test_one_error_lists_every_missing_unexpected_and_misshaped_key():
    state_dict = dict(_state_dict("eca_nfnet_l0"))
    del state_dict["stages.0.1.conv2b.gain"]
    state_dict["stages.0.3.conv1.weight"] = np.zeros((64, 256, 1, 1), np.float32)
    state_dict["mystery.weight"] = np.zeros((3,), np.float32)
    state_dict["head.fc.weight"] = np.zeros((11, 768), np.float32)
    state_dict["stem.conv1.weight"] = state_dict["stem.conv1.weight"].transpose(2, 3, 1, 0)
    with pytest.raises(TimmWeightsError) as info:
        load_timm_state_dict(_case_model("eca_nfnet_l0"), state_dict)
    message = str(info.value)
    assert "(1 missing, 2 unexpected, 2 shape mismatches, 0 refused values)" in message
    assert "missing model leaves:\n  stages/0/1/conv2b/gain (64,)" in message
    assert "stages.0.3.conv1.weight (64, 256, 1, 1) -> stages/0/3/conv1/kernel (not in" in message
    assert "mystery.weight (3,) (no NNX name for this key)" in message
    assert (
        "head.fc.weight (11, 768) vs head/kernel (768, 10) (expects (10, 768) in timm)" in message
    )
    assert "stem.conv1.weight (3, 3, 3, 16) vs stem/conv1/kernel (3, 3, 3, 16) (expects " in message


def test_long_reports_are_summarised_and_values_refused():
    state_dict = {f"stages.9.{i}.conv1.weight": np.zeros((1,), np.float32) for i in range(30)}
    with pytest.raises(TimmWeightsError) as info:
        load_timm_state_dict(_case_model("eca_nfnet_l0"), state_dict)
    message = str(info.value)
    assert "(107 missing, 30 unexpected" in message
    assert message.count("(not in the model)") == 20
    assert "  ... and 10 more" in message and "  ... and 87 more" in message

    state_dict = dict(_state_dict("eca_nfnet_l0"))
    state_dict["final_conv.bias"] = state_dict["final_conv.bias"].astype(np.float16)
    state_dict["stages.0.0.skipinit_gain"] = np.zeros((), np.float32)  # Not in eca_nfnet.
    state_dict["stem.conv2.gain"] = np.full((32, 1, 1, 1), np.nan, np.float32)
    with pytest.raises(TimmWeightsError) as info:
        load_timm_state_dict(_case_model("eca_nfnet_l0"), state_dict)
    message = str(info.value)
    assert "0 missing, 1 unexpected, 0 shape mismatches, 2 refused values" in message
    assert "stages.0.0.skipinit_gain () -> stages/0/0/skip_gain (not in the model)" in message
    assert "final_conv.bias: dtype float16" in message and "allow_dtype_cast=True" in message
    assert "stem.conv2.gain: 32 of 32 values are NaN or Inf" in message
    del state_dict["stages.0.0.skipinit_gain"]
    model = load_timm_state_dict(
        _case_model("eca_nfnet_l0"), state_dict, allow_dtype_cast=True, allow_nonfinite=True
    )
    assert np.isnan(np.asarray(model.stem.conv2.gain[...])).all()
    assert model.final_conv.bias[...].dtype == np.float32


def test_unreadable_files_and_wrong_models_name_the_culprit(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    if importlib.util.find_spec("safetensors") is not None:
        with pytest.raises(TimmWeightsError, match=r"broken\.safetensors' cannot be read"):
            load_timm_state_dict(_case_model("eca_nfnet_l0"), bad)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(TimmWeightsError, match=r"broken\.npz' cannot be read as an npz"):
        load_timm_state_dict(_case_model("eca_nfnet_l0"), tmp_path / "broken.npz")
    (tmp_path / "weights.ckpt").write_bytes(b"")
    with pytest.raises(TimmWeightsError, match=r"unknown suffix '\.ckpt'"):
        load_timm_state_dict(_case_model("eca_nfnet_l0"), tmp_path / "weights.ckpt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_timm_state_dict(_case_model("eca_nfnet_l0"), tmp_path / "absent.npz")
    with pytest.raises(TypeError, match="`state_dict`"):
        load_timm_state_dict(_case_model("eca_nfnet_l0"), [1, 2])
    dm_model = nnx.eval_shape(lambda: NFNet(10, widths=[256] * 4, depths=[1] * 4,
                                            rngs=nnx.Rngs(0)))  # fmt: skip
    with pytest.raises(TypeError, match=r"`model`: NFNet has no timm weight names"):
        load_timm_state_dict(dm_model, {})


# ----------------------------------------------------------------------------- building


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_every_timm_name_takes_the_overrides(name):
    model = nnx.eval_shape(
        lambda: create_model(
            name, 7, depths=[2, 1], widths=[256, 512], num_features=320, rngs=nnx.Rngs(0)
        )
    )
    assert isinstance(model, TimmNFNet)
    assert model.config.depths == (2, 1) and model.config.widths == (256, 512)
    assert [len(stage) for stage in model.stages] == [2, 1]
    assert model.final_conv.kernel.shape == (1, 1, 512, 320)
    assert model.head.kernel.shape == (320, 7) and model.num_features == 320
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 64, 64, 3), "float32"))
    assert out.shape == (1, 7)
    # timm keeps num_features when only the widths change (it is baked into its config).
    kept = nnx.eval_shape(
        lambda: create_model(name, 7, depths=[1, 1], widths=[256, 512], rngs=nnx.Rngs(0))
    )
    assert kept.num_features == TIMM_NFNET_VARIANTS[name].num_features


def test_block_structure_follows_timm():
    """beta, strides, groups and the presence of downsample/skip gain, from the config json."""
    for case in CASES:
        facts = json.loads(reference_file(f"timm/{case}_config.json").read_text())
        model = _case_model(case)
        for stage_index, stage in enumerate(model.stages):
            for block_index, block in enumerate(stage):
                fact = facts["blocks"][f"stages.{stage_index}.{block_index}"]
                assert block.beta == pytest.approx(fact["beta"], rel=1e-12)
                assert (block.downsample is not None) == fact["has_downsample"]
                assert (block.skip_gain is not None) == fact["has_skipinit_gain"]
                if fact["eca_kernel"]:
                    assert block.attn_last.kernel.shape == (fact["eca_kernel"],)
                conv = facts["convs"][f"stages.{stage_index}.{block_index}.conv2"]
                assert block.conv2.feature_group_count == conv["groups"]
                assert block.conv2.strides == tuple(conv["stride"])
                assert block.conv2.gamma / np.sqrt(conv["fan_in"]) == pytest.approx(
                    conv["scale"], rel=1e-7
                )


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"TimmNFNetConfig `attention`: expected 'se' or 'eca'"):
        TimmNFNetConfig("x", (1,), widths=(256,), attention="cbam")
    with pytest.raises(ValueError, match=r"TimmNFNetConfig `activation`"):
        TimmNFNetConfig("x", (1,), widths=(256,), activation="tanh")
    with pytest.raises(ValueError, match=r"TimmNFNetConfig `depths`.*like `widths`"):
        TimmNFNet(10, depths=(1, 1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`drop_path_rate`"):
        TimmNFNet(10, drop_path_rate=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`variant`: unknown TimmNFNet variant 'nfnet_l9'"):
        TimmNFNet(10, "nfnet_l9", rngs=nnx.Rngs(0))


def test_drop_path_follows_timm():
    """Rates linspace(0, rate, num_blocks) over all blocks, kept branches rescaled by 1/keep."""
    model = nnx.eval_shape(
        lambda: TimmNFNet(
            10, "eca_nfnet_l0", depths=(2, 1, 1, 1), drop_path_rate=0.3, rngs=nnx.Rngs(0)
        )
    )
    blocks = [block for stage in model.stages for block in stage]
    assert blocks[0].stoch_depth is None  # Rate 0: no module, as timm's Identity.
    np.testing.assert_allclose([b.stoch_depth.rate for b in blocks[1:]], [0.075, 0.15, 0.225, 0.3])
    assert all(b.stoch_depth.scale_by_keep for b in blocks[1:])


@pytest.mark.parametrize("case", sorted(CASES))
def test_odd_input_sizes_give_timms_shapes(case):
    """57x57: the strided convs' output sizes and the shortcut's ceil-mode average pool (a
    floor-mode pool gives 7x7 instead of 8x8 after stage 1)."""
    facts = json.loads(reference_file(f"timm/{case}_config.json").read_text())
    model = _case_model(case)
    x = jax.ShapeDtypeStruct((1, 57, 57, 3), "float32")
    got = nnx.eval_shape(lambda m, x: m.forward_intermediates(x), model, x)
    for name, nchw in facts["odd57_intermediates_shapes"].items():
        shape = got["pool" if name == "head.global_pool" else name].shape
        want = tuple(nchw) if len(nchw) == 2 else (nchw[0], nchw[2], nchw[3], nchw[1])
        assert shape == want, name

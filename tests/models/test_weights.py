"""Loading DeepMind's Haiku parameters, our orbax format, and the download cache."""

from __future__ import annotations

import hashlib
import importlib.util
import pickle

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agc_optax.models import (
    HaikuWeightsError,
    NFNet,
    NFNetConfig,
    download_nfnet_weights,
    load_haiku_params,
    load_params,
    save_params,
)
from agc_optax.models.weights import fetch_cached

from .reference import REFERENCE

SMALL = NFNetConfig(
    "parity_small",
    widths=(256, 512, 512, 512),
    depths=(1, 2, 1, 1),
    train_imsize=64,
    test_imsize=64,
    drop_rate=0.2,
)


def _reference_params() -> dict[str, np.ndarray]:
    path = REFERENCE / "nfnet_small_params.npz"
    if not path.exists():
        pytest.skip(f"reference data nfnet_small_params.npz not found under {REFERENCE}")
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def _abstract_small() -> NFNet:
    return nnx.eval_shape(lambda: NFNet(10, SMALL, rngs=nnx.Rngs(0)))


def _flat(model: nnx.Module) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def test_name_table():
    cases = {
        "NFNet/~/stem_conv0/w": "stem/conv0/kernel",
        "NFNet/~/stem_conv3/gain": "stem/conv3/gain",
        "NFNet/~/nf_block/skip_gain": "blocks/0/skip_gain",
        "NFNet/~/nf_block_1/~/conv1b/bias": "blocks/1/conv1b/bias",
        "NFNet/~/nf_block_10/~/conv_shortcut/w": "blocks/10/conv_shortcut/kernel",
        "NFNet/~/nf_block_2/~/squeeze_excite/~/linear/w": "blocks/2/se/fc0/kernel",
        "NFNet/~/nf_block_2/~/squeeze_excite/~/linear_1/b": "blocks/2/se/fc1/bias",
        "NFNet/~/final_conv/w": "final_conv/kernel",
        "NFNet/~/linear/w": "head/kernel",
        "NFNet/~/linear/b": "head/bias",
    }
    for key, want in cases.items():
        assert NFNet.haiku_names.nnx_path(key) == want, key
    for key in (
        "NFNet/~/nf_block_x/~/conv0/w",
        "NFNet/~/linear/gain",
        "NFNet/~/stem_conv1/b",
        "Other/~/linear/w",
        "NF_ResNet/~/linear/w",  # Another family's checkpoint.
    ):
        assert NFNet.haiku_names.nnx_path(key) is None, key


def test_every_format_loads_the_same_values(tmp_path):
    flat = _reference_params()
    nested: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        module, _, param = key.rpartition("/")
        nested.setdefault(module, {})[param] = value
    np.savez(tmp_path / "p.npz", **flat)
    sources = {
        "flat": flat,
        "nested": nested,
        "path": tmp_path / "p.npz",
        "str path": str(tmp_path / "p.npz"),
    }
    want = None
    for name, source in sources.items():
        model = load_haiku_params(_abstract_small(), source)
        got = _flat(model)
        if want is None:
            want = got
            np.testing.assert_array_equal(
                got["blocks/3/se/fc1/kernel"],
                flat["NFNet/~/nf_block_3/~/squeeze_excite/~/linear_1/w"],
            )
            assert len(got) == len(flat) == 114
        else:
            assert set(got) == set(want), name
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")
    with np.load(tmp_path / "p.npz") as npz:
        got = _flat(load_haiku_params(_abstract_small(), npz))
    np.testing.assert_array_equal(got["head/kernel"], want["head/kernel"])


def test_loaded_abstract_model_runs_in_train_mode():
    model = load_haiku_params(_abstract_small(), _reference_params(), seed=3)
    assert model.dropout.rngs.key[...].shape == ()
    model.train()
    out = nnx.jit(lambda m, v: m(v))(model, jnp.ones((2, 32, 32, 3)))
    assert np.all(np.isfinite(np.asarray(out)))


def test_missing_unexpected_and_mismatched_in_one_error():
    params = _reference_params()
    del params["NFNet/~/nf_block_2/~/conv1/gain"]
    params["NFNet/~/nf_block_7/~/conv0/w"] = np.zeros((1, 1, 512, 256), np.float32)
    params["NFNet/~/mystery/w"] = np.zeros((3,), np.float32)
    params["NFNet/~/linear/w"] = np.zeros((1024, 11), np.float32)
    with pytest.raises(HaikuWeightsError) as info:
        load_haiku_params(_abstract_small(), params)
    message = str(info.value)
    assert "1 missing, 2 unexpected, 1 shape mismatches" in message
    assert "blocks/2/conv1/gain (256,)" in message
    assert "NFNet/~/nf_block_7/~/conv0/w (1, 1, 512, 256) -> blocks/7/conv0/kernel" in message
    assert "NFNet/~/mystery/w (3,) (no NNX name" in message
    assert "NFNet/~/linear/w (1024, 11) vs head/kernel (1024, 10)" in message


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda p: p.pop("NFNet/~/stem_conv1/bias"), r"missing model leaves:\n  stem/conv1/bias"),
        (
            lambda p: p.__setitem__("NFNet/~/nf_block_5/skip_gain", np.zeros(())),
            r"unexpected checkpoint keys:\n  NFNet/~/nf_block_5/skip_gain \(\) -> blocks/5",
        ),
        (
            lambda p: p.__setitem__("NFNet/~/nf_block/~/conv0/w", np.zeros((1, 1, 128, 64))),
            r"NFNet/~/nf_block/~/conv0/w \(1, 1, 128, 64\) vs blocks/0/conv0/kernel "
            r"\(1, 1, 128, 128\)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_each_problem_names_both_sides(edit, pattern):
    params = _reference_params()
    edit(params)
    with pytest.raises(ValueError, match=pattern):
        load_haiku_params(_abstract_small(), params)


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="params"):
        load_haiku_params(_abstract_small(), [1, 2])
    pickled = tmp_path / "F0_haiku.npz"  # DeepMind's release: a pickle named .npz.
    with open(pickled, "wb") as f:
        pickle.dump({"NFNet/~/linear": {"w": np.zeros((2, 2))}}, f)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_haiku_params(_abstract_small(), pickled)
    if importlib.util.find_spec("dill") is None:
        with pytest.raises(ImportError, match="dill"):
            load_haiku_params(_abstract_small(), pickled, allow_pickle=True)
    else:
        with pytest.raises(HaikuWeightsError, match="missing"):
            load_haiku_params(_abstract_small(), pickled, allow_pickle=True)


def test_orbax_round_trip_and_mismatch(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    model = load_haiku_params(_abstract_small(), _reference_params())
    save_params(model, tmp_path / "ckpt")
    fresh = load_params(_abstract_small(), tmp_path / "ckpt")
    want, got = _flat(model), _flat(fresh)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    other = nnx.eval_shape(lambda: NFNet(7, SMALL, rngs=nnx.Rngs(0)))
    pattern = r"head/kernel checkpoint \(1024, 10\) vs model \(1024, 7\)"
    with pytest.raises(ValueError, match=pattern):
        load_params(other, tmp_path / "ckpt")


def test_download_cache_and_checksum(tmp_path):
    """Exercises the cache logic with a file:// URL; never touches the network."""
    source = tmp_path / "remote.bin"
    source.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    target = tmp_path / "cache" / "F0_haiku.npz"
    assert fetch_cached(source.as_uri(), target, digest) == target
    assert target.read_bytes() == source.read_bytes()
    assert (tmp_path / "cache" / "F0_haiku.npz.sha256").read_text().strip() == digest
    source.unlink()  # A cache hit must not download again.
    assert fetch_cached(source.as_uri(), target) == target
    target.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="does not match"):
        fetch_cached(source.as_uri(), target)
    other = tmp_path / "other.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="does not match the expected"):
        fetch_cached(other.as_uri(), tmp_path / "cache2" / "f", "0" * 64)
    assert not (tmp_path / "cache2" / "f").exists()
    with pytest.raises(ValueError, match="variant"):
        download_nfnet_weights("F7", tmp_path)


def test_garbage_npz_names_the_file_and_why(tmp_path):
    zip_like = tmp_path / "zip_like.npz"
    zip_like.write_bytes(b"PK\x03\x04" + b"\x00garbage" * 50)
    with pytest.raises(HaikuWeightsError, match=r"zip_like\.npz' cannot be read as an npz"):
        load_haiku_params(_abstract_small(), zip_like)
    truncated = tmp_path / "truncated.npz"
    np.savez(tmp_path / "whole.npz", w=np.ones((64, 64), np.float32))
    truncated.write_bytes((tmp_path / "whole.npz").read_bytes()[:200])
    with pytest.raises(HaikuWeightsError, match=r"truncated\.npz' .*corrupt or truncated"):
        load_haiku_params(_abstract_small(), truncated)
    if importlib.util.find_spec("dill") is not None:
        noise = tmp_path / "noise.npz"
        noise.write_bytes(b"\x80\x05 not a pickle at all")
        with pytest.raises(HaikuWeightsError, match=r"noise\.npz' is neither an npz"):
            load_haiku_params(_abstract_small(), noise, allow_pickle=True)


@pytest.mark.parametrize(
    "dtype, key",
    [
        (np.int32, "NFNet/~/stem_conv1/bias"),
        (np.float16, "NFNet/~/nf_block_2/~/conv1/w"),
        (np.bool_, "NFNet/~/linear/b"),
    ],
)
def test_non_float32_arrays_are_refused_unless_cast_is_allowed(dtype, key):
    params = _reference_params()
    params[key] = params[key].astype(dtype)
    name = np.dtype(dtype).name
    with pytest.raises(HaikuWeightsError, match=rf"{key}: dtype {name}.*allow_dtype_cast=True"):
        load_haiku_params(_abstract_small(), params)
    model = load_haiku_params(_abstract_small(), params, allow_dtype_cast=True)
    path = NFNet.haiku_names.nnx_path(key)
    got = _flat(model)[path]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, params[key].astype(np.float32))


def test_nonfinite_weights_are_refused_unless_allowed():
    params = _reference_params()
    params["NFNet/~/final_conv/w"] = params["NFNet/~/final_conv/w"].copy()
    params["NFNet/~/final_conv/w"][0, 0, :3, 0] = [np.nan, np.inf, -np.inf]
    params["NFNet/~/nf_block/skip_gain"] = np.asarray(np.nan, np.float32)
    with pytest.raises(HaikuWeightsError) as info:
        load_haiku_params(_abstract_small(), params)
    message = str(info.value)
    assert "2 refused values" in message
    assert "NFNet/~/final_conv/w: 3 of 524288 values are NaN or Inf" in message
    assert "NFNet/~/nf_block/skip_gain: 1 of 1 values" in message
    assert "allow_nonfinite=True" in message
    model = load_haiku_params(_abstract_small(), params, allow_nonfinite=True)
    assert np.isnan(_flat(model)["blocks/0/skip_gain"])


def test_long_reports_are_summarised_after_twenty_items():
    params = {f"NFNet/~/mystery_{i}/w": np.zeros((1,), np.float32) for i in range(25)}
    with pytest.raises(HaikuWeightsError) as info:
        load_haiku_params(_abstract_small(), params)
    message = str(info.value)
    assert "114 missing, 25 unexpected" in message
    assert message.count("(no NNX name for this key)") == 20
    assert "  ... and 5 more" in message and "  ... and 94 more" in message

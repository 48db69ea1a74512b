"""create_model(pretrained=...), the defaults table and export: local files only, no network.

Downloads are exercised by serving a file the test wrote through a patched ``urlopen``.
"""

from __future__ import annotations

import hashlib
import io
import json
import urllib.request

import jax
import numpy as np
import pytest
from flax import nnx

from agc_optax.models import (
    PretrainedWeightsError,
    WeightsError,
    create_model,
    default_config,
    export,
    fetch_pretrained,
    list_models,
    load_exported,
    load_haiku_params,
    model_info,
)
from agc_optax.models import pretrained as pretrained_lib
from tests.models.reference import reference_file

# The reduced eca_nfnet_l0 whose timm state dict and logits are in shared/reference/timm.
ECA_SMALL = dict(depths=(3, 1, 1, 1), widths=(256, 512, 512, 512), num_features=768)


@pytest.fixture(scope="module")
def eca_reference():
    state_dict = dict(np.load(reference_file("timm/eca_nfnet_l0_state_dict.npz")))
    x = np.load(reference_file("timm/input_nchw.npy")).transpose(0, 2, 3, 1)
    logits = np.load(reference_file("timm/eca_nfnet_l0_logits.npy"))
    return state_dict, x, logits


def _safetensors(state_dict, path):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
    return path


_forward = nnx.jit(lambda m, x: m(x))


def test_every_name_has_defaults_and_the_official_numbers():
    for name in list_models():
        cfg = default_config(name)
        assert cfg.name == name and 0 < cfg.crop_fraction <= 1
        assert cfg.test_resolution >= cfg.train_resolution
    # DeepMind's README and the paper: F0..F6 top-1 and resolutions; eval crop size/(size+32).
    top1s = (83.6, 84.7, 85.1, 85.7, 85.9, 86.0, 86.5)
    tests = (256, 320, 352, 416, 512, 544, 576)
    for i, (top1, test) in enumerate(zip(top1s, tests, strict=True)):
        cfg = model_info(f"nfnet_f{i}")
        assert (cfg.top1, cfg.test_resolution) == (top1, test)
        assert cfg.crop_fraction == pytest.approx(test / (test + 32))
        assert cfg.url == f"https://storage.googleapis.com/dm-nfnets/F{i}_haiku.npz"
        assert cfg.weights.format == "haiku" and "Apache-2.0" in cfg.license
        timm = default_config(f"dm_nfnet_f{i}")
        assert timm.top1 == top1 and timm.crop_mode == "squash"
        assert timm.url.startswith(f"https://huggingface.co/timm/dm_nfnet_f{i}.dm_in1k/")
    assert default_config("nfnet_f7").weights is None and default_config("nfnet_f7").top1 is None
    l2 = default_config("eca_nfnet_l2")
    assert (l2.train_resolution, l2.test_resolution, l2.crop_fraction) == (320, 384, 1.0)
    assert l2.weights.filename == "eca_nfnet_l2.ra3_in1k.safetensors"
    with pytest.raises(ValueError, match="unknown model"):
        default_config("nfnet_f9")


def _params(model):
    return {
        "/".join(map(str, path)): np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def _assert_same_params(got, want, skip=()):
    got, want = _params(got), _params(want)
    assert {k for k in got if not k.startswith(skip)} == {k for k in want if not k.startswith(skip)}
    for key in got:
        if not key.startswith(skip):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_timm_file_loads_and_a_new_num_classes_replaces_only_the_head(tmp_path, eca_reference):
    state_dict, x, want = eca_reference
    path = _safetensors(state_dict, tmp_path / "eca.safetensors")
    model = create_model("eca_nfnet_l0", None, rngs=nnx.Rngs(0), pretrained=path, **ECA_SMALL)
    model.eval()
    assert model.num_classes == 10  # the checkpoint's
    np.testing.assert_allclose(np.asarray(_forward(model, x)), want, rtol=0, atol=2e-5)

    tuned = create_model("eca_nfnet_l0", 4, rngs=nnx.Rngs(1), pretrained=path, **ECA_SMALL)
    assert tuned.num_classes == 4 and tuned.head.kernel.shape == (768, 4)
    _assert_same_params(tuned, model, skip=("head",))
    # The same state dict as an npz file loads the same values.
    np.savez(tmp_path / "eca.npz", **state_dict)
    again = create_model(
        "eca_nfnet_l0", None, rngs=nnx.Rngs(0), pretrained=tmp_path / "eca.npz", **ECA_SMALL
    )
    _assert_same_params(again, model)


def test_haiku_file_loads():
    config = json.loads(reference_file("nfnet_small_config.json").read_text())
    kwargs = dict(config["constructor"]["kwargs"])
    variant = config["constructor"]["custom_variant_added_to_base.nfnet_params"][kwargs["variant"]]
    for key in ("name", "variant", "num_classes"):
        kwargs.pop(key)
    kwargs.update(widths=variant["width"], depths=variant["depth"])
    params = reference_file("nfnet_small_params.npz")
    model = create_model("nfnet_f0", None, rngs=nnx.Rngs(0), pretrained=params, **kwargs)
    assert model.num_classes == 10  # the checkpoint's head, NFNet/~/linear/w (in, 10)
    # The values are those of the Haiku loader (whose logits test_nfnet checks against DeepMind).
    abstract = nnx.eval_shape(lambda: create_model("nfnet_f0", 10, rngs=nnx.Rngs(3), **kwargs))
    reference = load_haiku_params(abstract, params)
    _assert_same_params(model, reference)


def test_bad_pretrained_arguments_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="`pretrained`: no such file"):
        create_model("eca_nfnet_l0", rngs=nnx.Rngs(0), pretrained=tmp_path / "missing.npz")
    with pytest.raises(TypeError, match="`pretrained`"):
        create_model("eca_nfnet_l0", rngs=nnx.Rngs(0), pretrained=3)
    with pytest.raises(TypeError, match="`num_classes`"):
        create_model("eca_nfnet_l0", None, rngs=nnx.Rngs(0))  # None needs weights
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{"head.fc.weight": np.zeros((10, 7), np.float32)})
    with pytest.raises(WeightsError, match="missing"):
        create_model("eca_nfnet_l0", None, rngs=nnx.Rngs(0), pretrained=wrong, **ECA_SMALL)
    with pytest.raises(PretrainedWeightsError, match="no official weights"):
        fetch_pretrained("nf_resnet50", cache_dir=tmp_path)


class _Server:
    """Stands in for ``urllib.request.urlopen``: serves ``body`` and records the URLs."""

    def __init__(self, body: bytes):
        self.body, self.urls = body, []

    def __call__(self, url, *args, **kwargs):
        self.urls.append(url)
        return io.BytesIO(self.body)


def test_pretrained_true_downloads_verifies_and_caches(tmp_path, monkeypatch, eca_reference):
    state_dict, x, want = eca_reference
    body = _safetensors(state_dict, tmp_path / "served.safetensors").read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    server = _Server(body)
    monkeypatch.setattr(urllib.request, "urlopen", server)
    cache = tmp_path / "cache"
    options = dict(rngs=nnx.Rngs(0), cache_dir=cache, **ECA_SMALL)

    # No verified digest in the table: refused before anything is downloaded.
    assert default_config("eca_nfnet_l0").weights.sha256 is None
    with pytest.raises(PretrainedWeightsError, match="trust_download"):
        create_model("eca_nfnet_l0", None, pretrained=True, **options)
    assert server.urls == []
    # A wrong digest: refused, nothing lands in the cache under the final name.
    with pytest.raises(PretrainedWeightsError, match="does not match"):
        create_model("eca_nfnet_l0", None, pretrained=True, weights_sha256="0" * 64, **options)
    assert not (cache / "eca_nfnet_l0.ra2_in1k.safetensors").exists()
    # The right digest: downloaded from the table's URL, loaded, identical logits.
    model = create_model("eca_nfnet_l0", None, pretrained=True, weights_sha256=digest, **options)
    model.eval()
    np.testing.assert_allclose(np.asarray(_forward(model, x)), want, rtol=0, atol=2e-5)
    assert server.urls[-1] == default_config("eca_nfnet_l0").url
    # Cached: no second download; a corrupted cache is caught by the recorded digest.
    calls = len(server.urls)
    create_model("eca_nfnet_l0", None, pretrained=True, trust_download=True, **options)
    assert len(server.urls) == calls
    cached = cache / "eca_nfnet_l0.ra2_in1k.safetensors"
    cached.write_bytes(body[:-10] + b"corrupted!")
    with pytest.raises(PretrainedWeightsError, match="does not match"):
        create_model("eca_nfnet_l0", None, pretrained=True, trust_download=True, **options)


def test_published_md5_is_checked_even_when_trusting(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _Server(b"not DeepMind's file"))
    with pytest.raises(PretrainedWeightsError, match="md5"):
        fetch_pretrained("nfnet_f0", cache_dir=tmp_path, trust_download=True)
    # The table's md5 is what the check compares with (here: the served bytes' md5).
    served = hashlib.md5(b"not DeepMind's file").hexdigest()
    entry = default_config("nfnet_f0")
    patched = type(entry.weights)(**{**entry.weights.__dict__, "md5": served})
    monkeypatch.setitem(
        pretrained_lib._DEFAULTS, "nfnet_f0", type(entry)(**{**entry.__dict__, "weights": patched})
    )
    assert fetch_pretrained("nfnet_f0", cache_dir=tmp_path, trust_download=True).exists()


def test_export_round_trips_with_a_symbolic_batch(tmp_path):
    model = create_model(
        "nf_resnet26", 5, depths=(1, 1, 1, 1), widths=(8, 8, 8, 8), rngs=nnx.Rngs(0)
    )
    path = tmp_path / "model.jax"
    export(model, path, resolution=16)
    restored = jax.export.deserialize(bytearray(path.read_bytes()))  # no model code involved
    model.eval()
    x = np.random.default_rng(0).standard_normal((3, 16, 16, 3)).astype(np.float32)
    want = np.asarray(_forward(model, x))
    for batch in (1, 3):  # one file, two batch sizes (rows are independent in eval mode)
        got = np.asarray(restored.call(x[:batch]))
        np.testing.assert_allclose(got, want[:batch], rtol=1e-5, atol=1e-5)
    fixed = export(model, tmp_path / "fixed.jax", batch_size=2, resolution=16)
    assert fixed.in_avals[0].shape == (2, 16, 16, 3)
    assert load_exported(tmp_path / "fixed.jax").in_avals[0].shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="`batch_size`"):
        export(model, tmp_path / "bad.jax", batch_size=0, resolution=16)

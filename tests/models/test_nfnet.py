"""NFNet: DeepMind parity, parameter counts, registry, jit/grad, dtypes, modes, scan."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agc_optax.models import (
    NFNet,
    NFNetConfig,
    create_model,
    list_models,
    load_haiku_params,
)
from agc_optax.models.layers import GAMMAS, BlockStack, avg_pool_same
from agc_optax.models.nfnet import NFNET_VARIANTS, SCANNED_UNIT_AXES
from agc_optax.models.weights import materialize_abstract_state

from .reference import num_params, param_shapes, reference_file

# ----------------------------------------------------------------------------- parity


def _small_model(**kw) -> NFNet:
    config = json.loads(reference_file("nfnet_small_config.json").read_text())
    kwargs = dict(config["constructor"]["kwargs"])
    variant = config["constructor"]["custom_variant_added_to_base.nfnet_params"][kwargs["variant"]]
    kwargs.pop("name")
    kwargs.pop("variant")
    return nnx.eval_shape(
        lambda: NFNet(
            **kwargs, widths=variant["width"], depths=variant["depth"], rngs=nnx.Rngs(0), **kw
        )
    )


@pytest.fixture(scope="module")
def parity():
    model = _small_model()
    load_haiku_params(model, reference_file("nfnet_small_params.npz"))
    model.eval()
    x = np.load(reference_file("input.npy"))
    acts = dict(np.load(reference_file("nfnet_small_activations.npz")))
    return model, x, acts


# One compiled program per module is much cheaper than op-by-op dispatch on CPU.
_call = nnx.jit(lambda m, *args: m(*args))


def _close(got, want, what):
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-5, err_msg=what
    )


def test_parity_logits_jitted(parity):
    model, x, _ = parity
    want = np.load(reference_file("nfnet_small_logits.npy"))
    got = nnx.jit(lambda m, v: m(v))(model, jnp.asarray(x))
    assert got.shape == (2, 10) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)


def test_parity_forward_features_and_metrics(parity):
    model, x, acts = parity
    features = nnx.jit(lambda m, v: m.forward_outputs(v, return_metrics=True))
    out = features(model, jnp.asarray(x))
    ref = {k.split(":", 1)[1]: v for k, v in acts.items() if k.startswith("NFNet:")}
    assert set(out) == set(ref)  # pool, logits, avg_sq_mean_0..5, avg_var_0..5, res_avg_var_0..4
    for key, want in ref.items():
        _close(out[key], want, key)
        _close(out[key], acts[f"return_metrics_outputs:{key}"], key)
    assert set(nnx.eval_shape(lambda m, v: m.forward_outputs(v), model, x)) == {"pool", "logits"}


def test_parity_stem_modules(parity):
    model, x, acts = parity
    act = model.activation
    stem = model.stem
    _close(_call(stem, jnp.asarray(x)), acts["NFNet/~/sequential"], "stem")
    prev = jnp.asarray(x)
    for i, conv in enumerate([stem.conv0, stem.conv1, stem.conv2, stem.conv3]):
        want = acts[f"NFNet/~/stem_conv{i}"]
        _close(_call(conv, prev), want, f"stem_conv{i}")
        prev = act(jnp.asarray(want))


def test_parity_every_block_module(parity):
    """Feeds each module DeepMind's own input, so an error is pinned to one module."""
    model, _, acts = parity
    act = model.activation
    blocks = list(model.blocks)
    assert len(blocks) == 5
    x = jnp.asarray(acts["NFNet/~/sequential"])
    betas = [1.0, 0.9805806756909201, 0.9805806756909201, 0.9622504486493761, 0.9805806756909201]
    for i, block in enumerate(blocks):
        name = "NFNet/~/nf_block" + (f"_{i}" if i else "")

        def ref(module, name=name):
            return jnp.asarray(acts[f"{name}/~/{module}"])

        assert block.beta == pytest.approx(betas[i])
        out, res_avg_var = _call(block, x)
        _close(out, acts[f"{name}:0"], f"{name}:0")
        _close(res_avg_var, acts[f"{name}:1"], f"{name}:1")
        pre = act(x) * block.beta
        _close(_call(block.conv0, pre), ref("conv0"), f"{name} conv0")
        _close(_call(block.conv1, act(ref("conv0"))), ref("conv1"), f"{name} conv1")
        _close(_call(block.conv1b, act(ref("conv1"))), ref("conv1b"), f"{name} conv1b")
        _close(_call(block.conv2, act(ref("conv1b"))), ref("conv2"), f"{name} conv2")
        _close(_call(block.se, ref("conv2")), ref("squeeze_excite"), f"{name} se")
        pooled = jnp.mean(ref("conv2"), axis=(1, 2))
        _close(_call(block.se.fc0, pooled), ref("squeeze_excite/~/linear"), f"{name} se/fc0")
        _close(
            _call(block.se.fc1, jax.nn.relu(ref("squeeze_excite/~/linear"))),
            ref("squeeze_excite/~/linear_1"),
            f"{name} se/fc1",
        )
        if block.conv_shortcut is not None:
            short_in = avg_pool_same(pre) if block.stride > 1 else pre
            _close(_call(block.conv_shortcut, short_in), ref("conv_shortcut"), f"{name} shortcut")
        else:
            assert f"{name}/~/conv_shortcut" not in acts
        if f"{name}/~/stoch_depth" in acts:  # Identity in eval mode.
            _close(ref("stoch_depth"), 2 * ref("squeeze_excite") * ref("conv2"), "stoch_depth")
            assert block.stoch_depth is not None and block.stoch_depth.deterministic
        x = jnp.asarray(acts[f"{name}:0"])
    final = _call(model.final_conv, x)
    _close(final, acts["NFNet/~/final_conv"], "final_conv")
    _close(_call(model.head, jnp.asarray(acts["NFNet:pool"])), acts["NFNet/~/linear"], "head")


def test_parity_block_schedule_matches_reference():
    config = json.loads(reference_file("nfnet_small_config.json").read_text())
    model = _small_model()
    for i, block in enumerate(model.blocks):
        want = config["blocks"]["NFNet/~/nf_block" + (f"_{i}" if i else "")]
        assert block.beta == pytest.approx(want["beta"], abs=1e-12)
        assert block.stride == want["stride"]
        assert block.groups == want["groups"]
        assert block.width == want["bottleneck_width"]
        assert (block.conv_shortcut is not None) == want["use_projection"]
        assert (block.stoch_depth is not None) == want["has_stochdepth"]
        if block.stoch_depth is not None:
            assert block.stoch_depth.rate == pytest.approx(want["stochdepth_rate"])
        assert block.se.hidden_features == want["se_hidden_ch"]
    assert num_params(model) == config["num_params"]


# ----------------------------------------------------------------------------- counts


def _manifest() -> dict:
    return json.loads(reference_file("param_manifest.json").read_text())


@pytest.mark.parametrize("variant", list(NFNET_VARIANTS))
def test_param_count_equals_deepmind(variant):
    # Scanned blocks build fast under eval_shape; the unrolled count is checked
    # against the scanned one below for the shallow variants.
    want = _manifest()[f"NFNet-{variant}"]["total"]
    model = nnx.eval_shape(lambda: NFNet(1000, variant, scan_blocks=True, rngs=nnx.Rngs(0)))
    assert num_params(model) == want


@pytest.mark.parametrize("variant", ["F0", "F1", "F0+"])
def test_unrolled_param_count_equals_deepmind(variant):
    want = _manifest()[f"NFNet-{variant}"]["total"]
    model = nnx.eval_shape(lambda: NFNet(1000, variant, rngs=nnx.Rngs(0)))
    assert num_params(model) == want


@pytest.mark.parametrize("scan", [False, True])
def test_manifest_shapes_load_one_to_one(scan):
    """A zero checkpoint with DeepMind's F0 names and shapes fills F0 exactly."""
    entry = _manifest()["NFNet-F0"]
    zeros = {
        module: {
            name: np.broadcast_to(np.zeros((), np.float32), tuple(shape))
            for name, shape in params.items()
        }
        for module, params in entry["params"].items()
    }
    model = nnx.eval_shape(lambda: NFNet(1000, "F0", scan_blocks=scan, rngs=nnx.Rngs(0)))
    load_haiku_params(model, zeros)  # Raises on any missing/unexpected/mismatched key.
    assert float(jnp.abs(model.head.kernel[...]).max()) == 0.0


def test_head_and_leaf_names():
    model = nnx.eval_shape(lambda: NFNet(1000, "F0", rngs=nnx.Rngs(0)))
    flat = param_shapes(model)
    assert flat["head/kernel"] == (3072, 1000)
    assert flat["head/bias"] == (1000,)
    assert flat["blocks/0/conv0/kernel"] == (1, 1, 128, 128)
    assert flat["blocks/1/skip_gain"] == ()
    assert flat["blocks/1/se/fc0/kernel"] == (512, 256)
    assert flat["stem/conv3/gain"] == (128,)
    for path in flat:
        assert re.fullmatch(
            r"(stem/conv[0-3]|final_conv|blocks/\d+/(conv0|conv1|conv1b|conv2|conv_shortcut))"
            r"/(kernel|gain|bias)|blocks/\d+/se/fc[01]/(kernel|bias)|blocks/\d+/skip_gain"
            r"|head/(kernel|bias)",
            path,
        ), path


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_create():
    names = list_models()
    for i in range(8):
        assert f"nfnet_f{i}" in names and f"nfnet_f{i}_plus" in names
    model = nnx.eval_shape(
        lambda: create_model("nfnet_f1_plus", 10, rngs=nnx.Rngs(0), scan_blocks=True)
    )
    assert isinstance(model, NFNet)
    assert model.config.variant == "F1+" and model.head.kernel.shape == (4096, 10)
    assert model.drop_rate == 0.3 and model.test_imsize == 320


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'nfnet_g0'.*nfnet_f0"):
        create_model("nfnet_g0", rngs=nnx.Rngs(0))


def test_constructor_errors():
    with pytest.raises(ValueError, match="variant"):
        NFNet(10, "F9", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="group_size"):
        nnx.eval_shape(
            lambda: NFNet(10, widths=[128, 128, 128, 128], depths=[1] * 4, rngs=nnx.Rngs(0))
        )
    with pytest.raises(ValueError, match="activation"):
        NFNet(10, activation="swish", rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- tiny model

# Stage 1 has a run of two identity blocks, so `scan_blocks` stacks them.
TINY = NFNetConfig(
    "tiny",
    widths=(32, 64, 64, 64),
    depths=(1, 3, 1, 1),
    train_imsize=32,
    test_imsize=32,
    drop_rate=0.3,
    group_widths=(8, 8, 8, 8),
)


def _tiny(seed=0, **kw) -> NFNet:
    """A tiny NFNet with random NumPy weights (non-zero skip gains, so every branch
    matters). Built under eval_shape and filled from NumPy: running the random
    initializers eagerly would compile dozens of small XLA programs."""
    model = nnx.eval_shape(lambda: NFNet(10, TINY, stochdepth_rate=0.5, rngs=nnx.Rngs(0), **kw))
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        if path[-1] == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif path[-1] == "gain":
            value = 1 + 0.1 * rng.standard_normal(shape)
        else:  # bias, skip_gain
            value = 0.5 * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, jnp.float32))
    nnx.update(model, state)
    return materialize_abstract_state(model, seed)


_fwd = nnx.jit(lambda m, v: m(v))


def _images(n=4, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def test_jit_and_grad_tiny():
    model = _tiny()
    x = _images()
    labels = jnp.arange(4) % 10

    def loss_fn(m, v):
        logits = m(v)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    model.train()
    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model, x)
    assert np.isfinite(float(loss))
    flat = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    assert set(flat) == set(param_shapes(model))
    assert all(np.all(np.isfinite(g)) for g in flat.values())
    assert np.abs(flat["head/kernel"]).max() > 0
    assert np.abs(flat["blocks/0/skip_gain"]).max() > 0  # Zero-init gain still learns.


def test_odd_resolution_runs():
    model = _tiny()
    model.eval()
    assert _fwd(model, _images(2, 37)).shape == (2, 10)


def test_bf16_forward_close_to_f32():
    model = _tiny()
    model.eval()
    low = _tiny(seed=7, dtype=jnp.bfloat16)
    nnx.update(low, nnx.state(model, nnx.Param))
    low.eval()
    x = _images()
    want = np.asarray(_fwd(model, x))
    got = _fwd(low, x)
    assert got.dtype == jnp.bfloat16
    assert low.head.kernel.dtype == jnp.float32  # Params stay float32.
    err = np.abs(np.asarray(got, np.float32) - want).max()
    assert err < 0.03 * np.abs(want).max() + 0.02, err


def test_train_and_eval_modes():
    model = _tiny()
    x = _images(16)
    sds = [b.stoch_depth for b in model.blocks if getattr(b, "stoch_depth", None) is not None]
    assert sds and all(not sd.deterministic for sd in sds)
    model.eval()
    assert model.dropout.deterministic and all(sd.deterministic for sd in sds)
    first = np.asarray(_fwd(model, x))
    np.testing.assert_array_equal(np.asarray(_fwd(model, x)), first)
    model.train()
    assert not model.dropout.deterministic and all(not sd.deterministic for sd in sds)
    a, b = np.asarray(_fwd(model, x)), np.asarray(_fwd(model, x))
    assert not np.allclose(a, first) and not np.allclose(a, b)
    # Stochastic depth alone (no dropout) also changes the output in training.
    no_dropout = _tiny(drop_rate=0.0)
    no_dropout.train()
    assert not np.allclose(np.asarray(_fwd(no_dropout, x)), np.asarray(_fwd(no_dropout, x)))
    model.eval()
    np.testing.assert_array_equal(np.asarray(_fwd(model, x)), first)


def _dm_key(path: str) -> str:
    """DeepMind's name of an unrolled model's leaf (the naming rule, restated)."""
    leaf = {"kernel": "w", "gain": "gain", "bias": "bias", "skip_gain": "skip_gain"}
    parts = path.split("/")
    if parts[0] == "stem":
        return f"NFNet/~/stem_{parts[1]}/{leaf[parts[2]]}"
    if parts[0] in ("final_conv", "head"):
        module = "final_conv" if parts[0] == "final_conv" else "linear"
        name = "b" if parts[0] == "head" and parts[1] == "bias" else leaf[parts[1]]
        return f"NFNet/~/{module}/{name}"
    block = "nf_block" + (f"_{parts[1]}" if parts[1] != "0" else "")
    if parts[2] == "skip_gain":
        return f"NFNet/~/{block}/skip_gain"
    if parts[2] == "se":
        fc = {"fc0": "linear", "fc1": "linear_1"}[parts[3]]
        return f"NFNet/~/{block}/~/squeeze_excite/~/{fc}/{'w' if parts[4] == 'kernel' else 'b'}"
    return f"NFNet/~/{block}/~/{parts[2]}/{leaf[parts[3]]}"


def test_scan_blocks_same_numbers_as_unrolled():
    unrolled = _tiny()
    checkpoint = {
        _dm_key("/".join(map(str, p))): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(unrolled, nnx.Param))
    }
    scanned = _tiny(seed=5, scan_blocks=True)
    assert any(isinstance(b, BlockStack) for b in scanned.blocks)
    assert len(scanned.blocks) == 5 and len(unrolled.blocks) == 6
    assert num_params(scanned) == num_params(unrolled)
    load_haiku_params(scanned, checkpoint)
    stacked = param_shapes(scanned)
    assert stacked["blocks/2/block/conv0/kernel"][0] == 2  # Two layers stacked.
    unrolled.eval()
    scanned.eval()
    x = _images()
    features = nnx.jit(lambda m, v: m.forward_outputs(v, return_metrics=True))
    want = features(unrolled, x)
    got = features(scanned, x)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(
            np.asarray(got[key]), np.asarray(want[key]), atol=2e-5, rtol=1e-5, err_msg=key
        )
    # Training mode runs through the scan: per-layer stochastic depth draws fresh masks.
    scanned.train()
    stream = scanned.blocks[2].block.stoch_depth.rngs
    counts = np.asarray(stream.count[...]).copy()
    first, second = np.asarray(_fwd(scanned, x)), np.asarray(_fwd(scanned, x))
    assert np.all(np.isfinite(first)) and not np.allclose(first, second)
    assert counts.shape == (2,)  # One stream per stacked layer...
    np.testing.assert_array_equal(np.asarray(stream.count[...]), counts + 2)  # ...advancing.


def test_activation_choice_is_used():
    model = nnx.eval_shape(lambda: NFNet(10, TINY, activation="silu", rngs=nnx.Rngs(0)))
    x = jnp.linspace(-2, 2, 5)
    np.testing.assert_allclose(
        np.asarray(model.activation(x)), np.asarray(jax.nn.silu(x)) * GAMMAS["silu"], rtol=1e-6
    )


def test_scanned_unit_axes_rules_give_the_same_units():
    """With `SCANNED_UNIT_AXES`, AGC sees exactly the unrolled model's units."""
    import agc_optax

    def unit_norms(model, rules):
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        plan = agc_optax.describe(params, rules)
        norms = []
        for row, leaf in zip(plan, jax.tree.leaves(params), strict=True):
            leaf = np.asarray(leaf, np.float64)
            reduce = tuple(a for a in range(leaf.ndim) if a not in row.unit_axes)
            norms.append(np.sqrt(np.sum(leaf**2, axis=reduce)).ravel())
        return np.sort(np.concatenate(norms)), {row.path: row.unit_axes for row in plan}

    unrolled = _tiny()
    checkpoint = {
        _dm_key("/".join(map(str, p))): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(unrolled, nnx.Param))
    }
    scanned = load_haiku_params(_tiny(seed=5, scan_blocks=True), checkpoint)
    want, _ = unit_norms(unrolled, None)
    assert scanned.agc_unit_axes is SCANNED_UNIT_AXES and unrolled.agc_unit_axes is None
    got, axes = unit_norms(scanned, scanned.agc_unit_axes)
    assert axes["blocks/2/block/conv1/kernel"] == (0, 4)
    assert axes["blocks/2/block/se/fc0/kernel"] == (0, 2)
    assert axes["blocks/2/block/conv1/gain"] == (0,)
    assert axes["blocks/2/block/skip_gain"] == (0,)
    assert axes["blocks/1/conv1/kernel"] == (3,)  # Unstacked leaves keep the defaults.
    np.testing.assert_allclose(got, want, rtol=1e-12)

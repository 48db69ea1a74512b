"""Unit-axis rules: defaults, rule forms, paths and describe()."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import agc_optax

from .agc_reference import unit_norms


def resolve_unit_axes(params, rule):
    """(path, unit axes) of every leaf, as the unit plan resolves them."""
    return [(row.path, row.unit_axes) for row in agc_optax.describe(params, rule)]


@pytest.mark.parametrize(
    "path, shape, expected",
    [
        ("w", (), ()),
        ("layer/kernel", (7,), ()),
        ("dense/bias", (7,), ()),
        ("attn/query/bias", (4, 8), ()),  # 2-D attention bias: one unit, by name
        ("norm/scale", (7,), ()),
        ("blocks/0/skip_gain", (), ()),
        ("conv/gain", (16,), ()),
        ("ln/offset", (16,), ()),
        ("linear/b", (16,), ()),
        ("embed/embedding", (100, 16), (0,)),
        ("attn/query/kernel", (16, 4, 8), (-2, -1)),
        ("attn/key/kernel", (16, 4, 8), (-2, -1)),
        ("attn/value/kernel", (16, 4, 8), (-2, -1)),
        ("attn/out/kernel", (4, 8, 16), (-1,)),
        ("dense/kernel", (16, 32), (-1,)),
        ("dense/kernel", (1, 32), (-1,)),
        ("conv1d/kernel", (3, 16, 32), (-1,)),
        ("conv/kernel", (3, 3, 16, 32), (-1,)),
        ("conv3d/kernel", (3, 3, 3, 16, 32), (-1,)),
        ("haiku/linear/w", (16, 32), (-1,)),
    ],
)
def test_infer_unit_axes_table(path, shape, expected):
    assert agc_optax.infer_unit_axes(path, shape) == expected


def test_size_one_dims_do_not_change_units():
    table = agc_optax.describe({"head": {"kernel": jnp.zeros((1, 5))}})
    assert table["head/kernel"].num_units == 5


class _Zoo(nnx.Module):
    """One of every common Flax layer."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(6, 5, rngs=rngs)
        self.conv1d = nnx.Conv(3, 4, (3,), rngs=rngs)
        self.conv2d = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.conv3d = nnx.Conv(3, 4, (3, 3, 3), rngs=rngs)
        self.deconv = nnx.ConvTranspose(3, 4, (3, 3), rngs=rngs)
        self.embed = nnx.Embed(11, 6, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=6, qkv_features=8, out_features=6, decode=False, rngs=rngs
        )
        self.norm = nnx.LayerNorm(6, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(5, 5, rngs=rngs) for _ in range(2)])


EXPECTED_ZOO_UNITS = {
    "dense/kernel": ((1,), 5),
    "dense/bias": ((), 1),
    "conv1d/kernel": ((2,), 4),
    "conv2d/kernel": ((3,), 4),
    "conv3d/kernel": ((4,), 4),
    "deconv/kernel": ((3,), 4),
    "conv1d/bias": ((), 1),
    "embed/embedding": ((0,), 11),
    "attn/query/kernel": ((1, 2), 8),
    "attn/key/kernel": ((1, 2), 8),
    "attn/value/kernel": ((1, 2), 8),
    "attn/query/bias": ((), 1),
    "attn/out/kernel": ((2,), 6),
    "attn/out/bias": ((), 1),
    "norm/scale": ((), 1),
    "norm/bias": ((), 1),
    "blocks/0/kernel": ((1,), 5),
    "blocks/1/bias": ((), 1),
}


@pytest.mark.parametrize("form", ["optimizer", "split"])
def test_real_nnx_model_gets_documented_units(form):
    model = _Zoo(nnx.Rngs(0))
    if form == "split":  # leaves are reached through Variable.value: paths end in /value
        _, params = nnx.split(model, nnx.Param)
    else:  # what nnx.Optimizer hands to the transform: plain arrays
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    table = agc_optax.describe(params)
    for path, (axes, units) in EXPECTED_ZOO_UNITS.items():
        assert table[path].unit_axes == axes, path
        assert table[path].num_units == units, path
    # Every leaf is covered and none is excluded by default.
    assert len(table) == len(jax.tree.leaves(params))
    assert not any(r.excluded for r in table)
    text = str(table)
    assert "attn/query/kernel" in text and "(1, 2)" in text


def test_rule_forms_agree():
    params = {"a": {"kernel": jnp.zeros((3, 4))}, "b": {"kernel": jnp.zeros((2, 3, 4))}}
    want = [("a/kernel", (0,)), ("b/kernel", None)]
    as_pairs = [(r"^a/", (0,)), (r"^b/", None)]
    as_callable = lambda path, leaf: (0,) if path.startswith("a") else None
    as_pytree = {"a": {"kernel": (0,)}, "b": {"kernel": None}}
    as_prefix_pytree = {"a": (-2,), "b": None}
    for rule in (as_pairs, as_callable, as_pytree, as_prefix_pytree):
        assert resolve_unit_axes(params, rule) == want


def test_pattern_rules_first_match_wins_and_rest_inferred():
    params = {"enc": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}, "x": jnp.zeros((2, 5))}
    rules = [("kernel", (0,)), ("enc", ())]
    assert dict(resolve_unit_axes(params, rules)) == {
        "enc/bias": (),
        "enc/kernel": (0,),
        "x": (1,),
    }


def test_exclude_forms():
    params = {"head": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}, "body": jnp.zeros(3)}
    for exclude in (r"head/kernel", [r"head/kernel", r"nomatch"], lambda p, _: p == "head/kernel"):
        table = agc_optax.describe(params, exclude=exclude)
        assert table["head/kernel"].excluded and table["head/kernel"].unit_axes is None
        assert not table["head/bias"].excluded


def test_negative_axes_normalized():
    assert resolve_unit_axes({"k": jnp.zeros((2, 3, 4))}, [("k", (-1, 0))]) == [("k", (0, 2))]


@pytest.mark.parametrize(
    "rule, err, match",
    [
        ([("kernel", (2,))], ValueError, r"`dense/kernel`: unit axes \(2,\) out of range"),
        (lambda p, x: "bad", TypeError, r"`dense/kernel`: the unit_axes callable gave"),
        ([("kernel", (0, -2))], ValueError, r"`dense/kernel`: unit axes .* repeat"),
        ({"dense": {"kernel": (0,)}, "other": (0,)}, ValueError, r"does not match params"),
    ],
)
def test_bad_rules_name_the_leaf(rule, err, match):
    with pytest.raises(err, match=match):
        resolve_unit_axes({"dense": {"kernel": jnp.zeros((3, 4))}}, rule)


def test_unitwise_norm_matches_numpy():
    x = np.random.default_rng(0).standard_normal((3, 3, 4, 5)).astype(np.float32)
    for axes in [(), (-1,), (0, 3), (1, 2)]:
        got = agc_optax.unitwise_norm(jnp.asarray(x), axes)
        np.testing.assert_allclose(got, unit_norms(x, axes), rtol=1e-6)
        assert got.ndim == x.ndim  # reduced axes kept, so norms broadcast against x


def test_unitwise_norm_accumulates_bf16_in_f32():
    x = jnp.full((4096,), 1.0 + 2**-7, jnp.bfloat16)
    got = agc_optax.unitwise_norm(x, ())
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, unit_norms(np.asarray(x, np.float64), ()), rtol=1e-6)


def _torch_tree():
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    shapes = {
        "conv/weight": (8, 3, 3, 3),
        "bn1/weight": (8,),
        "bn1/bias": (8,),
        "fc/weight": (10, 8),
    }
    params, grads = {}, {}
    for i, (path, shape) in enumerate(shapes.items()):
        layer, name = path.split("/")
        params.setdefault(layer, {})[name] = jax.random.normal(keys[2 * i], shape)
        grads.setdefault(layer, {})[name] = 10 * jax.random.normal(keys[2 * i + 1], shape)
    return params, grads


def test_torch_layout_rule():
    assert "TORCH_LAYOUT" in agc_optax.__all__
    assert "PyTorch" in agc_optax.TORCH_LAYOUT.__doc__
    params, _ = _torch_tree()
    table = agc_optax.describe(params, unit_axes=agc_optax.TORCH_LAYOUT)
    assert table["conv/weight"].unit_axes == (0,) and table["conv/weight"].num_units == 8
    assert table["fc/weight"].unit_axes == (0,) and table["fc/weight"].num_units == 10
    assert table["bn1/weight"].unit_axes == () and table["bn1/weight"].num_units == 1
    assert table["bn1/bias"].unit_axes == ()
    # The regex the README used to advise splits the 1-D norm weight into 8 units.
    assert agc_optax.describe(params, unit_axes=[(r"weight$", (0,))])["bn1/weight"].num_units == 8


def test_torch_layout_clips_like_timm():
    params, grads = _torch_tree()
    clipping, eps = 0.01, 1e-3
    tx = agc_optax.adaptive_grad_clip(clipping, eps, unit_axes=agc_optax.TORCH_LAYOUT)
    out, _ = tx.update(grads, tx.init(params), params)

    def timm_agc(g, w):  # timm.utils.agc.adaptive_clip_grad with norm_type 2
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        axes = tuple(range(1, g.ndim)) if g.ndim > 1 else None
        wn = np.maximum(np.sqrt(np.sum(w**2, axis=axes, keepdims=g.ndim > 1)), eps)
        gn = np.sqrt(np.sum(g**2, axis=axes, keepdims=g.ndim > 1))
        max_norm = clipping * wn
        return np.where(gn > max_norm, g * (max_norm / np.maximum(gn, 1e-6)), g)

    want = jax.tree.map(timm_agc, grads, params)
    for got, ref in zip(jax.tree.leaves(out), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)

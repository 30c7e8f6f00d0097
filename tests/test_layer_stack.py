"""The unstacked layer layout (pi05_jax.model.layer_stack): per-layer weight buffers and Python-unrolled layer loops
must compute what the stacked layout's lax.scan computes, in the model functions and in the fast path's own layer
loops; the conversion is cached per checkpoint and works for quantized weights too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pi05_jax import implementations, sampler
from pi05_jax.fast import denoise as fast_denoise
from pi05_jax.fast import ops as fast_ops
from pi05_jax.fast import path as fast_path
from pi05_jax.model import gemma, layer_stack, reference, siglip
from pi05_jax.observation import observation_from_arrays
from pi05_jax.runtime import Model
from tests.conftest import REFERENCE_DIR, case_inputs, rel_err

# Stacked scan vs unrolled layers in float32: the same ops on the same values; XLA may fuse the two programs
# differently, so allow float32 rounding only.
FP32_LAYOUT_TOL = 1e-6
FP32_REL_TOL = 1e-5  # vs upstream's saved outputs (as tests/test_fast_path.py)


@pytest.fixture(scope="module")
def params(tiny_fp32):
    return tiny_fp32.params


@pytest.fixture(scope="module")
def unstacked(params):
    return layer_stack.unstack_layers(params)


def _case(model, cases, name):
    ins = case_inputs(cases, name)
    return ins, observation_from_arrays(ins, model.config)


def _assert_close(ours, ref, tol=FP32_LAYOUT_TOL):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= tol


# --- the conversion -------------------------------------------------------------------------------------------------


def test_unstack_layers_splits_both_groups_and_shares_the_rest(params, unstacked):
    for path in (layer_stack.LLM_PATH, layer_stack.IMG_PATH):
        stacked = layer_stack.get_path(params, path)
        groups = layer_stack.get_path(unstacked, path)
        assert layer_stack.is_unstacked(groups) and not layer_stack.is_unstacked(stacked)
        depth = layer_stack.num_layers(stacked)
        assert len(groups) == depth
        for i, layer in enumerate(groups):
            flat, tree = jax.tree.flatten(layer)
            assert tree == jax.tree.structure(stacked)
            for ours, ref in zip(flat, jax.tree.leaves(stacked), strict=True):
                np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref)[i])
    assert unstacked["action_in_proj"] is params["action_in_proj"]
    assert unstacked["PaliGemma"]["llm"]["embedder"] is params["PaliGemma"]["llm"]["embedder"]
    assert layer_stack.params_unstacked(unstacked) and not layer_stack.params_unstacked(params)
    assert layer_stack.unstack_layers(unstacked)["PaliGemma"]["llm"]["layers"] is unstacked["PaliGemma"]["llm"][
        "layers"]


def test_unstack_rejects_params_without_layer_groups():
    with pytest.raises(KeyError, match="PaliGemma/llm/layers"):
        layer_stack.unstack_layers({"PaliGemma": {"img": {}}})


def test_cached_unstack_is_once_per_checkpoint_and_keeps_unstacked_params(params, unstacked):
    a = layer_stack.unstack_layers_cached(params)
    b = layer_stack.unstack_layers_cached(params)
    assert a is not params and a["PaliGemma"]["llm"]["layers"] is b["PaliGemma"]["llm"]["layers"]
    assert a["PaliGemma"]["img"]["Transformer"]["encoderblock"] is b["PaliGemma"]["img"]["Transformer"]["encoderblock"]
    assert layer_stack.unstack_layers_cached(unstacked) is unstacked  # no second copy
    # Another checkpoint (one layer leaf replaced by an equal copy) gets its own conversion.
    llm = params["PaliGemma"]["llm"]
    layers = {**llm["layers"], "pre_ffw_norm": {"scale": np.array(llm["layers"]["pre_ffw_norm"]["scale"])}}
    other = {**params, "PaliGemma": {**params["PaliGemma"], "llm": {**llm, "layers": layers}}}
    c = layer_stack.unstack_layers_cached(other)
    assert c["PaliGemma"]["llm"]["layers"] is not a["PaliGemma"]["llm"]["layers"]
    np.testing.assert_array_equal(c["PaliGemma"]["llm"]["layers"][1]["pre_ffw_norm"]["scale"],
                                  a["PaliGemma"]["llm"]["layers"][1]["pre_ffw_norm"]["scale"])


def test_scan_or_unroll_matches_scan_and_checks_per_layer_xs():
    w = jnp.arange(12.0).reshape(3, 4)
    xs = jnp.arange(3.0)

    def body(c, inp):
        p, x = inp
        return c * 0.5 + p * x, p.sum() + x

    c_scan, y_scan = layer_stack.scan_or_unroll(body, jnp.ones(4), {"w": w}["w"], xs)
    c_loop, y_loop = layer_stack.scan_or_unroll(body, jnp.ones(4), tuple(w), layer_stack.split_layers(xs, 3))
    np.testing.assert_array_equal(c_loop, c_scan)
    assert isinstance(y_loop, tuple) and len(y_loop) == 3
    np.testing.assert_array_equal(jnp.stack(y_loop), y_scan)
    with pytest.raises(ValueError, match=r"xs\[0\].*3 entries"):
        layer_stack.scan_or_unroll(body, jnp.ones(4), tuple(w), xs)


def test_quantized_weights_unstack_per_layer():
    from pi05_jax.quantized.fp4_weight import quantize_weight
    from pi05_jax.quantized.fp8_weight import Fp8Weight

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 64, 32)).astype(np.float32)  # [L, D, F]
    x = jnp.asarray(rng.standard_normal((2, 5, 64)).astype(np.float32))
    group = {"fp8": Fp8Weight.quantize(w, (0,), lead=1, name="w8"),
             "fp4": quantize_weight(w, stacked=True, where="w4", backend="dequant")}
    layers = layer_stack.unstack(group)
    assert len(layers) == 3
    for i, layer in enumerate(layers):
        assert type(layer["fp8"]) is type(group["fp8"]) and type(layer["fp4"]) is type(group["fp4"])
        assert layer["fp8"].name == "w8" and layer["fp4"].backend == "dequant"  # static fields kept
        for name in ("fp8", "fp4"):
            sliced = jax.tree.map(lambda a, i=i: a[i], group[name])  # what lax.scan hands one layer
            np.testing.assert_array_equal(layer[name].einsum("BTD,DF->BTF", x), sliced.einsum("BTD,DF->BTF", x))


# --- model functions: unstacked vs stacked --------------------------------------------------------------------------


def test_siglip_unstacked_matches_stacked(params, unstacked):
    images = jax.random.uniform(jax.random.key(0), (2, 224, 224, 3), jnp.float32, -1.0, 1.0)
    run = jax.jit(siglip.encode_images, static_argnames="dtype")
    ref = run(params["PaliGemma"]["img"], images, dtype=jnp.float32)
    _assert_close(run(unstacked["PaliGemma"]["img"], images, dtype=jnp.float32), ref)


@pytest.fixture(scope="module")
def prefix_inputs(params):
    b, s = 2, 40
    d = params["PaliGemma"]["llm"]["embedder"]["input_embedding"].shape[-1]
    x = jax.random.normal(jax.random.key(1), (b, s, d), jnp.float32)
    lengths = jnp.array([40, 23], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
    return x, positions, lengths


@pytest.mark.parametrize("last_layer_kv_only", [True, False])
def test_prefill_kv_unstacked_matches_stacked(params, unstacked, prefix_inputs, last_layer_kv_only):
    x, positions, lengths = prefix_inputs
    def attend(q, k, v):
        return fast_ops.prefix_attend_xla(q, k, v, lengths)

    def run(p):
        return jax.jit(lambda llm: gemma.prefill(llm, x, positions, attend, last_layer_kv_only=last_layer_kv_only))(
            p["PaliGemma"]["llm"])

    k_ref, v_ref = run(params)
    k, v = run(unstacked)
    assert isinstance(k, tuple) and isinstance(v, tuple) and len(k) == len(v) == k_ref.shape[0]
    _assert_close(jnp.stack(k), k_ref)
    _assert_close(jnp.stack(v), v_ref)


def test_fast_expert_on_packed_layers_matches_the_stacked_reference(params, prefix_inputs):
    """pi05_jax.fast.denoise.expert_forward (packed per-layer weights, the fused QKV, XLA ops) computes what
    gemma.expert_forward computes on openpi's stacked layout with upstream's masked attention."""
    x_prefix, positions, lengths = prefix_inputs
    width = params["action_in_proj"]["kernel"].shape[-1]
    t = 7
    tokens = jax.random.normal(jax.random.key(2), (2, t, width), jnp.float32)
    suffix_positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    cond = reference.time_conditioning(params, jnp.array([0.7, 0.3], jnp.float32))
    packed = fast_path.pack(params, implementations.COMPACT.options)
    ops = fast_path.ops(packed, implementations.COMPACT.options)

    def attend_prefix(q, k, v):
        return fast_ops.prefix_attend_xla(q, k, v, lengths)

    def attend_suffix(q, ck, cv, k, v):
        s = ck.shape[1]
        mask = jnp.concatenate([jnp.broadcast_to((jnp.arange(s)[None, :] < lengths[:, None])[:, None], (2, t, s)),
                                jnp.ones((2, t, t), bool)], axis=-1)
        return gemma.masked_attention(q, jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1), mask)

    @jax.jit
    def run(stacked, packed):
        llm = stacked["PaliGemma"]["llm"]
        kv = gemma.prefill(llm, x_prefix, positions, attend_prefix)
        mods = gemma.expert_modulations(llm, cond, jnp.float32)
        want = gemma.expert_forward(llm, tokens, mods, kv, suffix_positions, attend_suffix)
        per_layer = (tuple(kv[0]), tuple(kv[1]))
        got = fast_denoise.expert_forward(packed["PaliGemma"]["llm"]["layers"], tokens, mods, per_layer,
                                          suffix_positions, lengths, ops)
        return got, want

    got, want = run(params, packed)
    _assert_close(got, want)


def test_modulation_table_on_unstacked_params_matches_stacked(params, unstacked):
    ref = fast_denoise.modulation_table(params, 3)
    ours = fast_denoise.modulation_table(unstacked, 3)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        _assert_close(a, b)


# --- whole samplers on unstacked params -----------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", ["reference", "compact"])
def test_samplers_on_unstacked_params_reproduce_upstream(tiny_fp32, unstacked, model_cases, kernels):
    """Params already in the unstacked layout go through the reference (its layer loops unrolled) and a fast path
    (its prepare packs them)."""
    ins, obs = _case(tiny_fp32, model_cases, "batch2_mixed")
    actions = sampler.sample_actions(unstacked, obs, noise=ins["noise"], num_steps=int(ins["num_steps"]),
                                     kernels=kernels)
    assert rel_err(actions, model_cases["batch2_mixed/out/fp32/actions"]) <= FP32_REL_TOL


def test_model_load_holds_one_packed_copy_for_a_fast_path(reference_dir):
    model = Model.load(REFERENCE_DIR / "checkpoint", dtype="float32", kernels="compact")
    assert layer_stack.params_unstacked(model.params)
    # the loaded weights are already in `compact`'s layout: its prepare makes no new buffer
    prepared = implementations.COMPACT.prepare(model.params, 2)
    for path in (layer_stack.LLM_PATH, layer_stack.IMG_PATH):
        ours, theirs = layer_stack.get_path(prepared, path), layer_stack.get_path(model.params, path)
        assert all(a is b for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True))
    assert not layer_stack.params_unstacked(Model.load(REFERENCE_DIR / "checkpoint", dtype="float32").params)


def test_consuming_conversion_frees_the_stacked_arrays_and_keeps_the_values(reference_dir):
    """Model.load's conversion: the same per-layer values as a plain unstack, and the stacked buffers are freed."""
    from checkpoints.openpi_io import load_params
    from pi05_jax.model import layer_stack

    _, params = load_params(reference_dir / "checkpoint", dtype="float32")
    _, again = load_params(reference_dir / "checkpoint", dtype="float32")
    stacked = jax.tree.leaves(again["PaliGemma"]["llm"]["layers"])
    plain = layer_stack.unstack_layers(params)
    consumed = layer_stack.unstack_layers(again, consume=True)
    assert all(a.is_deleted() for a in stacked)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(consumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

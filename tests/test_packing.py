"""The fast path's weight layout (pi05_jax.fast.packing): fused Gemma / SigLIP QKV weights, the zero-padded SigLIP MLP,
the transposed expert gating. Each packed piece computes what upstream's function computes on openpi's layout
(float32 rounding only); FP8 q/kv weights fuse the same way (their e4m3 rows and scales concatenated), every other
quantized leaf keeps openpi's keys and still runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pi05_jax import implementations, sampler
from pi05_jax.fast import ops as fast_ops
from pi05_jax.fast import packing
from pi05_jax.fast import path as fast_path
from pi05_jax.fast import vision as fast_vision
from pi05_jax.model import gemma, layer_stack, siglip
from pi05_jax.observation import observation_from_arrays
from tests.conftest import case_inputs, cosine, rel_err

# packed vs openpi's layout in float32: the same dot products, only the GEMM shapes (hence maybe the accumulation
# order) differ
PACKED_TOL = 1e-6


@pytest.fixture(scope="module")
def unstacked(tiny_fp32):
    return layer_stack.unstack_layers(tiny_fp32.params)


def _ops(layout, attention="xla"):
    options = implementations.PALLAS.options if attention == "pallas" else implementations.COMPACT.options
    return fast_ops.ops_for(attention, layout, options.prefill_attention_tiles, options.cross_attention_tiles,
                            options.geglu_tiles)


# --- the layout -----------------------------------------------------------------------------------------------------


def test_packed_layout_shapes_and_sharing(unstacked):
    packed = packing.pack_weights(unstacked, transpose_expert_gating=True)
    layers = packed["PaliGemma"]["llm"]["layers"]
    for i, (p, ref) in enumerate(zip(layers, unstacked["PaliGemma"]["llm"]["layers"], strict=True)):
        for sfx in ("", "_1"):
            q, kv = ref["attn"][f"q_einsum{sfx}"]["w"], ref["attn"][f"kv_einsum{sfx}"]["w"]
            n, d, h = q.shape
            k = kv.shape[1]
            if sfx == "" and i == len(layers) - 1:  # the KV-only last prefix layer stays as it is
                assert p["attn"]["kv_einsum"] is ref["attn"]["kv_einsum"] and "qkv_einsum" not in p["attn"]
                continue
            assert f"q_einsum{sfx}" not in p["attn"] and f"kv_einsum{sfx}" not in p["attn"]
            w = np.asarray(p["attn"][f"qkv_einsum{sfx}"]["w"])
            assert w.shape == (d, k, n // k + 2, h)
            g = n // k
            np.testing.assert_array_equal(w[:, :, :g].transpose(1, 2, 0, 3).reshape(n, d, h), q)  # q head k*G+g
            np.testing.assert_array_equal(w[:, :, g].transpose(1, 0, 2), kv[0])
            np.testing.assert_array_equal(w[:, :, g + 1].transpose(1, 0, 2), kv[1])
        assert p["mlp"] is ref["mlp"] and p["attn"]["attn_vec_einsum_1"] is ref["attn"]["attn_vec_einsum_1"]
        np.testing.assert_array_equal(np.asarray(p["mlp_1"]["gating_einsum_t"]),
                                      np.swapaxes(np.asarray(ref["mlp_1"]["gating_einsum"]), 1, 2))
    for p, ref in zip(packed["PaliGemma"]["img"]["Transformer"]["encoderblock"],
                      unstacked["PaliGemma"]["img"]["Transformer"]["encoderblock"], strict=True):
        mha, rmha = p["MultiHeadDotProductAttention_0"], ref["MultiHeadDotProductAttention_0"]
        qkv = np.asarray(mha["qkv"]["kernel"])
        for c, name in enumerate(("query", "key", "value")):
            np.testing.assert_array_equal(qkv[:, c], rmha[name]["kernel"])
            np.testing.assert_array_equal(np.asarray(mha["qkv"]["bias"])[c], rmha[name]["bias"])
    assert packed["PaliGemma"]["llm"]["embedder"] is unstacked["PaliGemma"]["llm"]["embedder"]
    assert fast_ops.layout_of(packed) == fast_ops.Layout(gemma_qkv="fused", expert_qkv="fused",
                                                         expert_gating="transposed", siglip_qkv="fused")


def test_pack_is_cached_per_checkpoint_and_layout(unstacked):
    a = packing.pack_weights_cached(unstacked, transpose_expert_gating=True)
    b = packing.pack_weights_cached(unstacked, transpose_expert_gating=True)
    # the same packed arrays (pi05_jax.leaf_cache rebuilds the containers around them on a hit)
    assert all(x is y for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    c = packing.pack_weights_cached(unstacked, transpose_expert_gating=False)
    assert "gating_einsum" in c["PaliGemma"]["llm"]["layers"][0]["mlp_1"]


def test_bad_inputs_are_rejected(tiny_fp32):
    with pytest.raises(ValueError, match="not"):
        packing.fuse_gemma_qkv_weights(np.zeros((8, 4, 2)), np.zeros((2, 3, 4, 2)))
    with pytest.raises(ValueError, match="unstacked"):
        packing.pack_weights(tiny_fp32.params, transpose_expert_gating=False)


# --- the model pieces -----------------------------------------------------------------------------------------------


def _narrow_siglip_mlp(params, f: int):
    """The tiny SigLIP with its MLP cut to the first f units (a smaller valid model, so padding has work to do)."""
    blocks = []
    for lp in layer_stack.get_path(params, layer_stack.IMG_PATH):
        mlp = lp["MlpBlock_0"]
        blocks.append({**lp, "MlpBlock_0": {
            "Dense_0": {"kernel": mlp["Dense_0"]["kernel"][:, :f], "bias": mlp["Dense_0"]["bias"][:f]},
            "Dense_1": {**mlp["Dense_1"], "kernel": mlp["Dense_1"]["kernel"][:f]}}})
    return layer_stack.replace_path(params, layer_stack.IMG_PATH, tuple(blocks))


def test_padded_fused_siglip_equals_upstreams(unstacked):
    narrow = _narrow_siglip_mlp(unstacked, 100)
    packed = packing.pack_weights(narrow, transpose_expert_gating=False)
    mlp = packed["PaliGemma"]["img"]["Transformer"]["encoderblock"][0]["MlpBlock_0"]
    assert mlp["Dense_0"]["kernel"].shape[1] == packing.PAD_MULTIPLE and not np.asarray(mlp["Dense_1"]["kernel"])[
        100:].any()
    images = jax.random.uniform(jax.random.key(0), (2, 224, 224, 3), jnp.float32, -1.0, 1.0)
    want = jax.jit(lambda p: siglip.encode_images(p, images, dtype=jnp.float32))(narrow["PaliGemma"]["img"])
    ops = _ops(fast_ops.layout_of(packed))
    got = jax.jit(lambda p: fast_vision.encode_images(p, images, dtype=jnp.float32, ops=ops))(
        packed["PaliGemma"]["img"])
    assert rel_err(np.asarray(got), np.asarray(want)) <= PACKED_TOL


def test_fused_gemma_qkv_equals_separate(unstacked):
    attn = unstacked["PaliGemma"]["llm"]["layers"][0]["attn"]
    fused = {"qkv_einsum": {"w": packing.fuse_gemma_qkv_weights(attn["q_einsum"]["w"], attn["kv_einsum"]["w"])}}
    d = attn["q_einsum"]["w"].shape[1]
    x = jax.random.normal(jax.random.key(3), (2, 7, d), jnp.float32)
    positions = 5 + jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    want = jax.jit(lambda a: gemma.qkv(x, a, "", positions))(attn)
    got = jax.jit(lambda a: fast_ops.prefix_qkv_fused(x, a, positions))(fused)
    for o, r in zip(got, want, strict=True):
        assert o.shape == r.shape
        assert rel_err(np.asarray(o), np.asarray(r)) <= PACKED_TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_rotated_packed_qkv_holds_upstreams_values(unstacked, dtype):
    """The expert's fused, rotated QKV layout (what the packed cross-attention reads) vs gemma.qkv's three arrays
    stacked the same way: equal to float32 rounding (bf16: the same elementwise ops on GEMM outputs of one rounding)."""
    attn = jax.tree.map(lambda a: a.astype(dtype), unstacked["PaliGemma"]["llm"]["layers"][0]["attn"])
    fused = {"qkv_einsum_1": {"w": packing.fuse_gemma_qkv_weights(attn["q_einsum_1"]["w"], attn["kv_einsum_1"]["w"])}}
    d = attn["q_einsum_1"]["w"].shape[1]
    x = jax.random.normal(jax.random.key(4), (2, 7, d), jnp.float32).astype(dtype)
    positions = 11 + jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    q, k, v = jax.jit(lambda a: gemma.qkv(x, a, "_1", positions))(attn)
    got = jax.jit(lambda a: fast_ops.expert_qkv_fused(x, a, positions))(fused)
    kh = k.shape[2]
    want = jnp.concatenate([q.reshape(2, 7, kh, -1, q.shape[-1]), k[:, :, :, None], v[:, :, :, None]], axis=3)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == jnp.float32:
        assert rel_err(np.asarray(got), np.asarray(want)) <= PACKED_TOL
    else:
        assert cosine(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))) >= 0.99999
    # the quantized-layout op builds the same layout from openpi's weights
    again = jax.jit(lambda a: fast_ops.expert_qkv_quantized(x, a, positions))(attn)
    np.testing.assert_array_equal(np.asarray(again.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_transposed_expert_gating_runs_the_same_mlp(unstacked):
    packed = packing.pack_weights(unstacked, transpose_expert_gating=True)
    before = unstacked["PaliGemma"]["llm"]["layers"][0]["mlp_1"]
    after = packed["PaliGemma"]["llm"]["layers"][0]["mlp_1"]
    d = before["gating_einsum"].shape[1]
    h = jax.random.normal(jax.random.key(5), (2, 7, d), jnp.float32)
    want = gemma.feed_forward(h, before)
    got = _ops(fast_ops.layout_of(packed), "pallas").expert_mlp(h, after)
    assert rel_err(np.asarray(got), np.asarray(want)) <= PACKED_TOL


# --- quantized leaves -----------------------------------------------------------------------------------------------


def test_quantized_leaves_fuse_or_keep_their_keys_and_run(tiny_fp32, model_cases):
    """FP8 SigLIP and prefix-stream q/kv weights are fused into one FP8 weight each; the expert's NVFP4 MLP (and
    every other quantized leaf) keeps openpi's keys; the float expert QKV in the same layers is fused as an array.
    `pallas` on them computes what `reference` computes on the same quantized params (the quantized matmuls see the
    same token rows in both)."""
    from checkpoints.quantize import Plan, quantize_params
    from pi05_jax.quantized.fp4_weight import Fp4Weight
    from pi05_jax.quantized.fp8_weight import Fp8Weight

    params = quantize_params(tiny_fp32.params, Plan(fmt="fp4", parts=("siglip", "prefix")))
    prepared = implementations.PALLAS.prepare(params, 2)
    layers = prepared["PaliGemma"]["llm"]["layers"]
    layer = layers[0]
    assert is_fused_array(layer["attn"]["qkv_einsum_1"]["w"])
    assert isinstance(layer["attn"]["qkv_einsum"]["w"], Fp8Weight) and "q_einsum" not in layer["attn"]
    assert isinstance(layers[-1]["attn"]["kv_einsum"]["w"], Fp8Weight)  # the KV-only last prefix layer: as stored
    assert isinstance(layer["mlp_1"]["gating_einsum"], Fp4Weight) and "gating_einsum_t" not in layer["mlp_1"]
    block = prepared["PaliGemma"]["img"]["Transformer"]["encoderblock"][0]
    assert isinstance(block["MultiHeadDotProductAttention_0"]["qkv"]["kernel"], Fp8Weight)
    assert isinstance(block["MlpBlock_0"]["Dense_0"]["kernel"], Fp8Weight)
    assert fast_ops.layout_of(prepared) == fast_ops.Layout(gemma_qkv="fused_quantized", expert_qkv="fused",
                                                           expert_gating="quantized",
                                                           siglip_qkv="fused_quantized")

    ins = case_inputs(model_cases, "libero_like")
    obs = observation_from_arrays(ins, tiny_fp32.config)
    got = np.asarray(sampler.sample_actions(params, obs, noise=ins["noise"], num_steps=2, kernels="pallas"))
    want = np.asarray(sampler.sample_actions(params, obs, noise=ins["noise"], num_steps=2, kernels="reference"))
    assert np.isfinite(got).all()
    assert cosine(got, want) >= 0.9999, cosine(got, want)
    described = fast_path.ops(prepared, implementations.PALLAS.options).describe()
    assert described.count("own matmuls") == 1 and described.count("fused FP8") == 2, described


def is_fused_array(w) -> bool:
    return packing.is_array(w) and w.ndim == 4


def _static_act_amax(params, plan):
    """A made-up calibration ({key: [L] amax}): the same scale for the weights that share an input (q and kv, SigLIP's
    query/key/value), as calibration records them, different per layer."""
    from checkpoints.layout import flatten

    flat = flatten(params)
    return {k: np.linspace(2.0, 3.0, flat[k].shape[0]).astype(np.float32) for k in plan.targets()}


@pytest.fixture(scope="module")
def fp8_unstacked(tiny_fp32):
    """The tiny model's FP8 params (every part) with static activation scales (the fused weight must carry them;
    per-token scaling is the same computation on the same rows, run end to end above), unstacked."""
    from checkpoints.quantize import Plan, quantize_params

    amax = _static_act_amax(tiny_fp32.params, Plan())
    return layer_stack.unstack_layers(quantize_params(tiny_fp32.params, Plan(), act_amax=amax))


def test_fused_fp8_qkv_holds_the_parts_values_and_scales_exactly(fp8_unstacked):
    """The fused FP8 weights are the parts' e4m3 rows and per-output-channel scales, concatenated: dequantized, they
    are bit for bit the float fusion of the dequantized parts (the same code as the float layout's test)."""
    from pi05_jax.quantized.fp8_weight import E4M3, Fp8Weight

    packed = packing.pack_weights(fp8_unstacked, transpose_expert_gating=True)
    layers, ref_layers = packed["PaliGemma"]["llm"]["layers"], fp8_unstacked["PaliGemma"]["llm"]["layers"]
    for i, (p, ref) in enumerate(zip(layers, ref_layers, strict=True)):
        for sfx in ("", "_1"):
            q, kv = ref["attn"][f"q_einsum{sfx}"]["w"], ref["attn"][f"kv_einsum{sfx}"]["w"]
            if sfx == "" and i == len(layers) - 1:
                assert p["attn"]["kv_einsum"]["w"] is kv and "qkv_einsum" not in p["attn"]
                continue
            w = p["attn"][f"qkv_einsum{sfx}"]["w"]
            assert isinstance(w, Fp8Weight) and w.values.dtype == E4M3 and w.layout.contract == (0,)
            want = packing.fuse_gemma_qkv_weights(q.dequantize(), kv.dequantize())
            assert w.shape == want.shape
            np.testing.assert_array_equal(np.asarray(w.dequantize()), np.asarray(want))
            assert w.options == q.options and w.act_scale is not None
            np.testing.assert_array_equal(np.asarray(w.act_scale), np.asarray(q.act_scale))
        assert p["mlp_1"]["gating_einsum"] is ref["mlp_1"]["gating_einsum"]  # quantized MLPs: as they are
    for p, ref in zip(packed["PaliGemma"]["img"]["Transformer"]["encoderblock"],
                      fp8_unstacked["PaliGemma"]["img"]["Transformer"]["encoderblock"], strict=True):
        mha, rmha = p["MultiHeadDotProductAttention_0"], ref["MultiHeadDotProductAttention_0"]
        kernel = np.asarray(mha["qkv"]["kernel"].dequantize())
        for c, name in enumerate(("query", "key", "value")):
            np.testing.assert_array_equal(kernel[:, c], np.asarray(rmha[name]["kernel"].dequantize()))
            np.testing.assert_array_equal(np.asarray(mha["qkv"]["bias"])[c], rmha[name]["bias"])
    assert fast_ops.layout_of(packed) == fast_ops.Layout(gemma_qkv="fused_quantized", expert_qkv="fused_quantized",
                                                         expert_gating="quantized", siglip_qkv="fused_quantized")
    # packing is idempotent on the fused FP8 weights too
    again = packing.pack_weights(packed, transpose_expert_gating=True)
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(packed), strict=True))


def test_fused_fp8_qkv_forward_equals_the_unfused_quantized_forward(fp8_unstacked):
    """Each fused FP8 projection (SigLIP, prefix stream, expert) against the same layer's unfused quantized op on
    openpi's keys, in float32: one FP8 GEMM instead of two (three), the same activation quantization, so equal up to
    the GEMMs' float32 accumulation order (measured ~1e-7)."""
    packed = packing.pack_weights(fp8_unstacked, transpose_expert_gating=False)
    positions = 3 + jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    llm, ref_llm = packed["PaliGemma"]["llm"]["layers"], fp8_unstacked["PaliGemma"]["llm"]["layers"]
    for i in range(len(llm) - 1):
        fused, ref = llm[i]["attn"], ref_llm[i]["attn"]
        for sfx, fused_op, ref_op in (("", fast_ops.prefix_qkv_fused, fast_ops.prefix_qkv_quantized),
                                      ("_1", fast_ops.expert_qkv_fused, fast_ops.expert_qkv_quantized)):
            d = ref[f"q_einsum{sfx}"]["w"].shape[1]
            x = jax.random.normal(jax.random.key(10 * i + len(sfx)), (2, 7, d), jnp.float32)
            got, want = fused_op(x, fused, positions), ref_op(x, ref, positions)
            for o, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                assert o.shape == r.shape and o.dtype == jnp.float32
                assert rel_err(np.asarray(o), np.asarray(r)) <= PACKED_TOL, (i, sfx)
    img = packed["PaliGemma"]["img"]["Transformer"]["encoderblock"]
    ref_img = fp8_unstacked["PaliGemma"]["img"]["Transformer"]["encoderblock"]
    for i, (p, ref) in enumerate(zip(img, ref_img, strict=True)):
        mha, rmha = p["MultiHeadDotProductAttention_0"], ref["MultiHeadDotProductAttention_0"]
        y = jax.random.normal(jax.random.key(100 + i), (2, 9, rmha["query"]["kernel"].shape[0]), jnp.float32)
        got, want = fast_ops.vision_qkv_fused(y, mha, jnp.float32), fast_ops.vision_qkv_quantized(y, rmha, jnp.float32)
        for o, r in zip(got, want, strict=True):
            assert o.shape == r.shape and rel_err(np.asarray(o), np.asarray(r)) <= PACKED_TOL, i


def test_fp8_qkv_with_different_static_scales_is_not_fused(tiny_fp32, model_cases):
    """q and kv weights whose calibrated activation scales differ cannot share one quantized activation: the stream
    keeps openpi's two weights in every layer (one layout), and the fast path still runs it."""
    from checkpoints.quantize import Plan, quantize_params

    plan = Plan(parts=("expert",))
    amax = _static_act_amax(tiny_fp32.params, plan)
    amax["PaliGemma/llm/layers/attn/kv_einsum_1/w"][1] *= 1.5  # one layer's kv scale differs from its q scale
    params = quantize_params(tiny_fp32.params, plan, act_amax=amax)
    prepared = implementations.COMPACT.prepare(params, 2)
    layout = fast_ops.layout_of(prepared)
    assert layout.expert_qkv == "quantized" and layout.gemma_qkv == "fused", layout
    assert all("q_einsum_1" in p["attn"] for p in prepared["PaliGemma"]["llm"]["layers"])
    ins = case_inputs(model_cases, "libero_like")
    obs = observation_from_arrays(ins, tiny_fp32.config)
    got = np.asarray(sampler.sample_actions(params, obs, noise=ins["noise"], num_steps=int(ins["num_steps"]),
                                            kernels="compact"))
    assert np.isfinite(got).all()
    assert cosine(got, model_cases["libero_like/out/fp32/actions"]) >= 0.99  # the FP8 accuracy gate

"""Prepare-time weight packing (pi05_jax.weight_packing): fused Gemma / SigLIP QKV weights, zero-padded SigLIP MLP
and heads. Packed and unpacked fast paths compute the same actions (float32 rounding only) and upstream's; quantized
leaves are left unpacked and still run."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pi05_jax import denoise_fast, fast_path, gemma, layer_stack, siglip, weight_packing
from pi05_jax.observation import observation_from_arrays
from tests.conftest import MODEL_CASES, case_inputs, rel_err

# Packed vs unpacked in float32: the same dot products, only the GEMM shapes (hence maybe the accumulation order)
# differ, so float32 rounding only.
PACKED_TOL = {"float32": 1e-6}
FP32_REL_TOL = 1e-4  # vs upstream's saved outputs (as tests/test_fast_path.py)
# The tiny model's SigLIP mlp_dim (128) and head_dim (16) are multiples of 128 / not: pad to 96 so both pad.
PAD = 96

ALL_OFF = dict(fuse_gemma_qkv=False, fuse_siglip_qkv=False, pad_siglip_mlp=False, pad_siglip_heads=False)
ALL_ON = dict(fuse_gemma_qkv=True, fuse_siglip_qkv=True, pad_siglip_mlp=True, pad_siglip_heads=True,
              pad_multiple=PAD)


def _impl(name, attention="xla", **packing):
    return fast_path.make_implementation(name, fast_path.FastPathOptions(attention=attention, **packing))


UNPACKED = _impl("test-packing-off", **ALL_OFF)
PACKED = _impl("test-packing-on", **ALL_ON)
PACKED_PALLAS = _impl("test-packing-on-pallas", attention="pallas", **ALL_ON)
UNPACKED_PALLAS = _impl("test-packing-off-pallas", attention="pallas", **ALL_OFF)


def _sample(params, obs, noise, num_steps, impl):
    """What sampler.sample_actions does for a registered fast path: prepare on the host, then the specialized jit."""
    prepared, plan = impl.prepare(params, obs, num_steps)
    run = jax.jit(impl.specialize(plan).sample, static_argnums=3)
    return np.asarray(run(prepared, obs, jnp.asarray(noise), num_steps))


@pytest.fixture(scope="module")
def unstacked(tiny_fp32):
    return layer_stack.unstack_layers(tiny_fp32.params)


# --- the layout -----------------------------------------------------------------------------------------------------


def test_packed_layout_shapes_and_sharing(unstacked):
    options = weight_packing.PackOptions(**ALL_ON)
    packed = weight_packing.pack_weights(unstacked, options)
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
    for p, ref in zip(packed["PaliGemma"]["img"]["Transformer"]["encoderblock"],
                      unstacked["PaliGemma"]["img"]["Transformer"]["encoderblock"], strict=True):
        mha, rmha = p["MultiHeadDotProductAttention_0"], ref["MultiHeadDotProductAttention_0"]
        d, n, h = rmha["query"]["kernel"].shape
        qkv = np.asarray(mha["qkv"]["kernel"])
        assert qkv.shape == (d, 3, n, PAD) and mha["qkv"]["bias"].shape == (3, n, PAD)
        for c, name in enumerate(("query", "key", "value")):
            np.testing.assert_array_equal(qkv[:, c, :, :h], rmha[name]["kernel"])
            np.testing.assert_array_equal(np.asarray(mha["qkv"]["bias"])[c, :, :h], rmha[name]["bias"])
        assert not qkv[..., h:].any() and not np.asarray(mha["qkv"]["bias"])[..., h:].any()
        f = ref["MlpBlock_0"]["Dense_0"]["kernel"].shape[1]
        fp = -(-f // PAD) * PAD
        assert fp > f and p["MlpBlock_0"]["Dense_0"]["kernel"].shape[1] == fp
        assert p["MlpBlock_0"]["Dense_1"]["kernel"].shape[0] == fp
        assert not np.asarray(p["MlpBlock_0"]["Dense_1"]["kernel"])[f:].any()
    assert packed["PaliGemma"]["llm"]["embedder"] is unstacked["PaliGemma"]["llm"]["embedder"]


def test_pack_is_cached_per_checkpoint_and_options(unstacked):
    a = weight_packing.pack_weights_cached(unstacked)
    b = weight_packing.pack_weights_cached(unstacked)
    # the same packed arrays (pi05_jax.leaf_cache rebuilds the containers around them on a hit)
    assert all(x is y for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    c = weight_packing.pack_weights_cached(unstacked, weight_packing.PackOptions(fuse_siglip_qkv=False))
    blocks = lambda p: p["PaliGemma"]["img"]["Transformer"]["encoderblock"]
    assert "qkv" in blocks(a)[0]["MultiHeadDotProductAttention_0"]
    assert "qkv" not in blocks(c)[0]["MultiHeadDotProductAttention_0"]  # other options: another packed copy
    off = weight_packing.PackOptions(fuse_gemma_qkv=False, fuse_siglip_qkv=False, pad_siglip_mlp=False)
    assert weight_packing.pack_weights_cached(unstacked, off) is unstacked


def test_bad_pack_options_are_rejected():
    with pytest.raises(ValueError, match="fuse_siglip_qkv"):
        fast_path.FastPathOptions(fuse_siglip_qkv=False, pad_siglip_heads=True)
    with pytest.raises(ValueError, match="pad_multiple"):
        fast_path.FastPathOptions(pad_multiple=0)
    with pytest.raises(ValueError, match="q_einsum"):
        weight_packing.fuse_gemma_qkv_weights(np.zeros((8, 4, 2)), np.zeros((2, 3, 4, 2)))


# --- the model pieces -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [False, True])
def test_padded_fused_siglip_equals_unpadded(unstacked, heads):
    options = weight_packing.PackOptions(fuse_gemma_qkv=False, pad_siglip_heads=heads, pad_multiple=PAD)
    packed = weight_packing.pack_weights(unstacked, options)
    images = jax.random.uniform(jax.random.key(0), (2, 224, 224, 3), jnp.float32, -1.0, 1.0)
    ref = jax.jit(lambda p: siglip.encode_images(p, images, dtype=jnp.float32))(unstacked["PaliGemma"]["img"])
    ours = jax.jit(lambda p: siglip.encode_images_packed(p, images, dtype=jnp.float32))(packed["PaliGemma"]["img"])
    assert rel_err(np.asarray(ours), np.asarray(ref)) <= PACKED_TOL["float32"]


def test_fused_gemma_qkv_equals_separate(unstacked):
    attn = unstacked["PaliGemma"]["llm"]["layers"][0]["attn"]
    fused = {"qkv_einsum_1": {"w": weight_packing.fuse_gemma_qkv_weights(attn["q_einsum_1"]["w"],
                                                                          attn["kv_einsum_1"]["w"])}}
    d = attn["q_einsum_1"]["w"].shape[1]
    x = jax.random.normal(jax.random.key(3), (2, 7, d), jnp.float32)
    positions = 5 + jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    ref = jax.jit(lambda a: gemma.qkv_any(x, a, "_1", positions))(attn)
    ours = jax.jit(lambda a: gemma.qkv_any(x, a, "_1", positions))(fused)
    for o, r in zip(ours, ref, strict=True):
        assert o.shape == r.shape
        assert rel_err(np.asarray(o), np.asarray(r)) <= PACKED_TOL["float32"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_rotated_packed_qkv_holds_the_same_values(unstacked, dtype):
    """gemma.qkv_packed_rotated (the layout the packed cross-attention reads) vs gemma.qkv_packed's three arrays:
    bit for bit, since RoPE and the q scale act per element of a slot."""
    attn = unstacked["PaliGemma"]["llm"]["layers"][0]["attn"]
    w = weight_packing.fuse_gemma_qkv_weights(attn["q_einsum_1"]["w"], attn["kv_einsum_1"]["w"]).astype(dtype)
    d, kh, g2, _ = w.shape
    x = jax.random.normal(jax.random.key(4), (2, 7, d), jnp.float32).astype(dtype)
    positions = 11 + jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    q, k, v = jax.jit(gemma.qkv_packed)(x, w, positions)
    packed = jax.jit(gemma.qkv_packed_rotated)(x, w, positions)
    assert packed.shape == (2, 7, kh, g2, w.shape[3]) and packed.dtype == dtype
    want = jnp.concatenate([q.reshape(2, 7, kh, g2 - 2, -1), k[:, :, :, None], v[:, :, :, None]], axis=3)
    np.testing.assert_array_equal(np.asarray(packed.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_transposed_expert_gating_runs_the_same_mlp(unstacked):
    """PackOptions.transpose_expert_gating: only the expert's gating weight moves (to gating_einsum_t [2, F, D]);
    gemma.feed_forward on either layout and the fast path's Pallas GeGLU agree."""
    packed = weight_packing.pack_weights(unstacked, weight_packing.PackOptions(
        fuse_gemma_qkv=False, fuse_siglip_qkv=False, pad_siglip_mlp=False, transpose_expert_gating=True))
    before = unstacked["PaliGemma"]["llm"]["layers"][0]
    after = packed["PaliGemma"]["llm"]["layers"][0]
    assert "gating_einsum" not in after["mlp_1"] and after["mlp"] is before["mlp"]  # the prefix MLP is untouched
    np.testing.assert_array_equal(np.asarray(after["mlp_1"]["gating_einsum_t"]),
                                  np.swapaxes(np.asarray(before["mlp_1"]["gating_einsum"]), 1, 2))
    d = before["mlp_1"]["gating_einsum"].shape[1]
    h = jax.random.normal(jax.random.key(5), (2, 7, d), jnp.float32)
    want = gemma.feed_forward(h, before["mlp_1"])
    for got in (gemma.feed_forward(h, after["mlp_1"]), fast_path.pallas_expert_mlp(h, after["mlp_1"])):
        assert rel_err(np.asarray(got), np.asarray(want)) <= PACKED_TOL["float32"]


def test_transposed_expert_projections_run_the_same_layer(unstacked):
    """PackOptions.transpose_expert_projections: the expert's fused QKV, attention-out and down weights as [N, K]
    `_t` leaves in place of the originals; the fast path's Pallas ops on them equal XLA's on the originals."""
    options = weight_packing.PackOptions(fuse_siglip_qkv=False, pad_siglip_mlp=False)
    fused = weight_packing.pack_weights(unstacked, options)["PaliGemma"]["llm"]["layers"][0]
    moved = weight_packing.pack_weights(unstacked, dataclasses.replace(
        options, transpose_expert_projections=weight_packing.EXPERT_PROJECTIONS))
    moved = moved["PaliGemma"]["llm"]["layers"][0]
    assert {"qkv_einsum_1_t", "attn_vec_einsum_1_t"} <= set(moved["attn"]) and "linear_t" in moved["mlp_1"]
    assert not {"qkv_einsum_1", "attn_vec_einsum_1"} & set(moved["attn"]) and "linear" not in moved["mlp_1"]
    np.testing.assert_array_equal(np.asarray(moved["attn"]["qkv_einsum"]["w"]),  # the prefix stream is untouched
                                  np.asarray(fused["attn"]["qkv_einsum"]["w"]))
    assert moved["mlp"] is fused["mlp"]
    d = fused["attn"]["qkv_einsum_1"]["w"].shape[0]
    key = jax.random.split(jax.random.key(6), 2)
    h = jax.random.normal(key[0], (2, 7, d), jnp.float32)
    positions = 3 + jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    pairs = [
        (denoise_fast.xla_qkv_rotated(h, fused["attn"], positions),
         fast_path.pallas_qkv_rotated(h, moved["attn"], positions)),
        (gemma.feed_forward(h, fused["mlp_1"]), fast_path.pallas_expert_mlp(h, moved["mlp_1"])),
    ]
    n, hd, _ = fused["attn"]["attn_vec_einsum_1"]["w"].shape
    o = jax.random.normal(key[1], (2, 7, n, hd), jnp.float32)
    pairs.append((denoise_fast.xla_attn_out(o, fused["attn"]), fast_path.pallas_attn_out(o, moved["attn"])))
    for want, got in pairs:
        assert got.shape == want.shape
        assert rel_err(np.asarray(got), np.asarray(want)) <= PACKED_TOL["float32"]


def test_transposed_expert_projections_subset(unstacked):
    """Only the named projections move: ("attn_out", "down") keeps the fused QKV weight for XLA's GEMM."""
    options = weight_packing.PackOptions(fuse_siglip_qkv=False, pad_siglip_mlp=False,
                                         transpose_expert_projections=("attn_out", "down"))
    layer = weight_packing.pack_weights(unstacked, options)["PaliGemma"]["llm"]["layers"][0]
    assert {"qkv_einsum_1", "attn_vec_einsum_1_t"} <= set(layer["attn"]) and "linear_t" in layer["mlp_1"]
    assert not {"qkv_einsum_1_t", "attn_vec_einsum_1"} & set(layer["attn"])
    for bad in ("down", ("down", "up")):
        with pytest.raises(ValueError, match="transpose_expert_projections"):
            weight_packing.PackOptions(transpose_expert_projections=bad)


def test_packing_is_idempotent(unstacked):
    """Packed params pass through every restructuring unchanged (runtime.Model.load packs once, prepare again)."""
    options = weight_packing.PackOptions(pad_siglip_heads=True, transpose_expert_gating=True,
                                         transpose_expert_projections=weight_packing.EXPERT_PROJECTIONS)
    once = weight_packing.pack_weights(unstacked, options)
    twice = weight_packing.pack_weights(once, options)
    assert jax.tree.structure(twice) == jax.tree.structure(once)
    assert all(a is b for a, b in zip(jax.tree.leaves(twice), jax.tree.leaves(once), strict=True))


# --- the fast path end to end ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MODEL_CASES)
def test_packed_fast_path_matches_unpacked_and_upstream(tiny_fp32, model_cases, case):
    ins = case_inputs(model_cases, case)
    obs = observation_from_arrays(ins, tiny_fp32.config)
    steps = int(ins["num_steps"])
    packed = _sample(tiny_fp32.params, obs, ins["noise"], steps, PACKED)
    unpacked = _sample(tiny_fp32.params, obs, ins["noise"], steps, UNPACKED)
    assert rel_err(packed, unpacked) <= PACKED_TOL["float32"]
    assert rel_err(packed, model_cases[f"{case}/out/fp32/actions"]) <= FP32_REL_TOL


def test_packed_pallas_matches_unpacked(tiny_fp32, model_cases):
    ins = case_inputs(model_cases, "batch2_mixed")
    obs = observation_from_arrays(ins, tiny_fp32.config)
    steps = int(ins["num_steps"])
    packed = _sample(tiny_fp32.params, obs, ins["noise"], steps, PACKED_PALLAS)
    unpacked = _sample(tiny_fp32.params, obs, ins["noise"], steps, UNPACKED_PALLAS)
    assert rel_err(packed, unpacked) <= PACKED_TOL["float32"]
    assert rel_err(packed, model_cases["batch2_mixed/out/fp32/actions"]) <= FP32_REL_TOL


def test_quantized_leaves_stay_unpacked_and_run(tiny_fp32, model_cases):
    """FP8 SigLIP and prefix-stream weights and the expert's NVFP4 MLP (objects, not arrays) are not packed; the
    float expert QKV in the same layers still is, and the packed fast path computes what the unpacked one does on
    the same quantized params. (The quantized parts all run before the only packed one, the expert's QKV, so
    their dynamic activation quantization sees identical inputs in both runs.)"""
    from checkpoints.quantize import Plan, quantize_params
    from pi05_jax.quantized.fp4_weight import Fp4Weight
    from pi05_jax.quantized.fp8_weight import Fp8Weight

    params = quantize_params(tiny_fp32.params, Plan(fmt="fp4", parts=("siglip", "prefix")))
    ins = case_inputs(model_cases, "libero_like")
    obs = observation_from_arrays(ins, tiny_fp32.config)
    prepared, _ = PACKED.prepare(params, obs, 2)
    layer = prepared["PaliGemma"]["llm"]["layers"][0]
    assert "qkv_einsum_1" in layer["attn"] and "qkv_einsum" not in layer["attn"]
    assert isinstance(layer["attn"]["q_einsum"]["w"], Fp8Weight)
    assert isinstance(layer["mlp_1"]["linear"], Fp4Weight)
    block = prepared["PaliGemma"]["img"]["Transformer"]["encoderblock"][0]
    assert "qkv" not in block["MultiHeadDotProductAttention_0"]
    assert isinstance(block["MlpBlock_0"]["Dense_0"]["kernel"], Fp8Weight)

    packed = _sample(params, obs, ins["noise"], 2, PACKED)
    unpacked = _sample(params, obs, ins["noise"], 2, UNPACKED)
    assert np.isfinite(packed).all()
    assert rel_err(packed, unpacked) <= PACKED_TOL["float32"]

    # the `pallas` path's own packing (its default transposes the expert's gating weight for the GeGLU kernel):
    # the NVFP4 gating weight stays as it is and runs through its own matmul
    prepared, _ = PACKED_PALLAS.prepare(params, obs, 2)
    mlp = prepared["PaliGemma"]["llm"]["layers"][0]["mlp_1"]
    assert isinstance(mlp["gating_einsum"], Fp4Weight) and "gating_einsum_t" not in mlp
    packed_pallas = _sample(params, obs, ins["noise"], 2, PACKED_PALLAS)
    assert rel_err(packed_pallas, _sample(params, obs, ins["noise"], 2, UNPACKED_PALLAS)) <= PACKED_TOL["float32"]

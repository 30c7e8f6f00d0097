"""GQA cross-attention (denoise): the flash-decoding Pallas kernel and its single-pass variant (interpret mode on the
CPU) against their plain-JAX reference, and the reference against upstream's masked attention over (prefix ++ suffix)
keys."""

from __future__ import annotations

import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gqa_cross_attention import (
    BlockSizes,
    combine_splits,
    gqa_cross_attention,
    gqa_cross_attention_packed,
    gqa_cross_attention_packed_reference,
    gqa_cross_attention_reference,
    unpack_qkv,
)
from pi05_jax import gemma

# The Triton lowering tests trace the deprecated-but-working Pallas Triton backend (see docs/design.md).
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

# Kernel vs reference: float32 differs in summation order (and the split combine); bfloat16 in where probabilities
# are rounded to bf16 (unnormalized per split vs normalized softmax): two bf16 ulps (eps 2**-7).
TOL = {
    jnp.float32: dict(rtol=1e-5, atol=1e-5),
    jnp.bfloat16: dict(rtol=2 * 2**-7, atol=2 * 2**-7),
}
UPSTREAM_TOL = {
    jnp.float32: dict(rtol=1e-6, atol=1e-6),
    jnp.bfloat16: dict(rtol=2**-7, atol=2**-7),
}

ACTIONS = 50
REAL = dict(slots=968, heads=8, kv_heads=1, head_dim=256)  # 50 action tokens x 8 heads on one KV head, head_dim 256
TINY = dict(slots=968, heads=8, kv_heads=1, head_dim=16)  # the shared tiny reference model's expert


def make_inputs(batch, slots, heads, kv_heads, head_dim, dtype, tokens=ACTIONS, seed=0):
    rng = np.random.default_rng(seed)
    arrays = (
        rng.standard_normal((batch, tokens, heads, head_dim)) * head_dim**-0.5,  # q, pre-scaled
        rng.standard_normal((batch, slots, kv_heads, head_dim)) * 2.0,  # k_prefix
        rng.standard_normal((batch, slots, kv_heads, head_dim)),  # v_prefix
        rng.standard_normal((batch, tokens, kv_heads, head_dim)) * 2.0,  # k_self
        rng.standard_normal((batch, tokens, kv_heads, head_dim)),  # v_self
    )
    return tuple(jnp.asarray(x, dtype) for x in arrays)


def as_f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


def check_against_reference(shape, lengths, dtype, block_sizes=None, tokens=ACTIONS, seed=0):
    q, kp, vp, ks, vs = make_inputs(len(lengths), **shape, dtype=dtype, tokens=tokens, seed=seed)
    lengths = jnp.asarray(lengths, jnp.int32)
    out = gqa_cross_attention(q, kp, vp, lengths, ks, vs, block_sizes=block_sizes or BlockSizes(), interpret=True)
    ref = gqa_cross_attention_reference(q, kp, vp, lengths, ks, vs)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(as_f32(out), as_f32(ref), **TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_real_shape_full_prefix(dtype):
    check_against_reference(REAL, [968], dtype)


@pytest.mark.parametrize("lengths", [[1], [77], [572], [572, 77]], ids=str)
def test_real_shape_partial_prefix(lengths):
    check_against_reference(REAL, lengths, jnp.bfloat16, seed=len(lengths))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("lengths", [[1, 968], [572, 77], [0, 129]], ids=str)
def test_tiny_config_batch2(lengths, dtype):
    check_against_reference(TINY, lengths, dtype)


@pytest.mark.parametrize(
    "block_sizes",
    [
        BlockSizes(block_rows=16, block_k=16, split_k=48),
        BlockSizes(block_rows=128, block_k=32, split_k=256),
        BlockSizes(block_rows=256, block_k=128, split_k=1024),  # one prefix split: no flash-decoding split at all
    ],
    ids=lambda b: f"rows{b.block_rows}_k{b.block_k}_split{b.split_k}",
)
def test_block_sizes_and_splits(block_sizes):
    # bfloat16: float32 inputs cap block_k at 16 (see FLOAT32_MAX_BLOCK_K), so they would not use these tiles.
    check_against_reference(TINY, [968, 300], jnp.bfloat16, block_sizes=block_sizes, seed=3)


COMBINE = BlockSizes(combine="pallas")  # the split partials merged by the Pallas combine kernel


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("slots,lengths", [(576, [572, 77]), (968, [1, 968])], ids=["S576", "S968"])
def test_pallas_combine_real_shape(slots, lengths, dtype):
    check_against_reference({**REAL, "slots": slots}, lengths, dtype, block_sizes=COMBINE)


@pytest.mark.parametrize(
    "block_sizes",
    [COMBINE, BlockSizes(combine="pallas", combine_rows=64), BlockSizes(block_rows=16, block_k=16, split_k=48,
                                                                        combine="pallas", combine_rows=32)],
    ids=["rows16", "rows64", "small_tiles_rows32"])
@pytest.mark.parametrize("lengths", [[1, 968], [0, 129]], ids=str)
def test_pallas_combine_tiny_config(lengths, block_sizes):
    """Rows that saw no prefix key (length 0) and the last, overlapping row block of the combine."""
    check_against_reference(TINY, lengths, jnp.bfloat16, block_sizes=block_sizes, tokens=11)


def test_bad_combine_is_rejected():
    with pytest.raises(ValueError, match="combine"):
        BlockSizes(combine="cuda")
    with pytest.raises(ValueError, match="combine_rows"):
        BlockSizes(combine_rows=24)


@pytest.mark.parametrize(
    "shape,tokens",
    [
        (dict(slots=40, heads=8, kv_heads=2, head_dim=16), 50),  # two KV heads, prefix < default tile
        (dict(slots=10, heads=4, kv_heads=1, head_dim=32), 3),  # prefix and suffix below the smallest tile
    ],
    ids=["gqa4x2", "small"],
)
def test_other_shapes(shape, tokens):
    check_against_reference(shape, [shape["slots"], 7], jnp.float32, tokens=tokens, seed=5)


SINGLE_PASS = BlockSizes(block_rows=16, single_pass=True)  # 25 programs over the 400 rows of the real shape


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("slots,lengths", [(576, [572, 77]), (968, [1, 968])], ids=["S576", "S968"])
def test_single_pass_real_shape(slots, lengths, dtype):
    check_against_reference(dict(REAL, slots=slots), lengths, dtype, block_sizes=SINGLE_PASS, seed=slots)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("lengths", [[1, 968], [572, 77], [0, 129]], ids=str)
def test_single_pass_tiny_config_batch2(lengths, dtype):
    check_against_reference(TINY, lengths, dtype, block_sizes=SINGLE_PASS)


@pytest.mark.parametrize(
    "block_sizes",
    [
        BlockSizes(block_rows=32, block_k=32, single_pass=True),  # 13 row blocks, the last one overlapping
        BlockSizes(block_rows=64, block_k=128, split_k=16, single_pass=True),  # split_k is ignored when single pass
        BlockSizes(block_rows=512, block_k=16, single_pass=True),  # one block wider than the 400 rows: padded q
    ],
    ids=lambda b: f"rows{b.block_rows}_k{b.block_k}",
)
def test_single_pass_block_sizes(block_sizes):
    check_against_reference(TINY, [968, 300], jnp.bfloat16, block_sizes=block_sizes, seed=4)


def test_single_pass_other_shapes():
    # Two KV heads, a prefix and suffix below the smallest tile.
    shape = dict(slots=10, heads=8, kv_heads=2, head_dim=32)
    check_against_reference(shape, [10, 7], jnp.float32, block_sizes=SINGLE_PASS, tokens=3, seed=6)


@pytest.mark.parametrize("block_sizes", [BlockSizes(), SINGLE_PASS], ids=["split", "single_pass"])
def test_prefix_past_the_length_is_never_used(block_sizes):
    # NaN everywhere past each row's prefix length: nothing of it may reach the result.
    q, kp, vp, ks, vs = make_inputs(2, **TINY, dtype=jnp.float32, seed=7)
    lengths = jnp.asarray([77, 600], jnp.int32)
    dead = jnp.arange(TINY["slots"])[None, :, None, None] >= lengths[:, None, None, None]
    kp_bad, vp_bad = jnp.where(dead, jnp.nan, kp), jnp.where(dead, jnp.nan, vp)
    out = gqa_cross_attention(q, kp_bad, vp_bad, lengths, ks, vs, block_sizes=block_sizes, interpret=True)
    ref = gqa_cross_attention_reference(q, kp, vp, lengths, ks, vs)
    assert np.all(np.isfinite(as_f32(out)))
    np.testing.assert_allclose(as_f32(out), as_f32(ref), **TOL[jnp.float32])


def test_combine_splits_equals_one_softmax():
    # Two partials over disjoint key sets combine to the softmax over their union; an empty split is ignored.
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((1, 1, 6, 10)) * 3, jnp.float32)  # [B,K,R,S]
    values = jnp.asarray(rng.standard_normal((1, 1, 10, 4)), jnp.float32)  # [B,K,S,H]
    parts = []
    for lo, hi in ((0, 3), (3, 10)):
        lg, m = logits[..., lo:hi], jnp.max(logits[..., lo:hi], axis=-1)
        p = jnp.exp(lg - m[..., None])
        parts.append((jnp.einsum("BKRS,BKSH->BKRH", p, values[:, :, lo:hi]), m, jnp.sum(p, axis=-1)))
    empty = (jnp.zeros_like(parts[0][0]), jnp.full_like(parts[0][1], -1e30), jnp.zeros_like(parts[0][2]))
    acc, row_max, row_sum = (jnp.stack(xs, axis=2) for xs in zip(*parts, empty, strict=True))
    expected = jnp.einsum("BKRS,BKSH->BKRH", jax.nn.softmax(logits, axis=-1), values)
    np.testing.assert_allclose(as_f32(combine_splits(acc, row_max, row_sum)), as_f32(expected), **TOL[jnp.float32])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [TINY, dict(REAL, slots=200)], ids=["tiny", "real_heads"])
def test_reference_matches_upstream_masked_attention(shape, dtype):
    # The sampler's plain path: upstream's masked attention over concat(prefix cache, suffix K/V) with the mask
    # [prefix slots valid | all suffix tokens] for every action query.
    q, kp, vp, ks, vs = make_inputs(2, **shape, dtype=dtype, seed=11)
    lengths = jnp.asarray([shape["slots"], 57], jnp.int32)
    prefix_valid = jnp.arange(shape["slots"])[None, :] < lengths[:, None]
    mask = jnp.concatenate(
        [jnp.repeat(prefix_valid[:, None, :], ACTIONS, axis=1), jnp.ones((2, ACTIONS, ACTIONS), bool)], axis=-1
    )
    upstream = gemma.masked_attention(q, jnp.concatenate([kp, ks], 1), jnp.concatenate([vp, vs], 1), mask)
    ref = gqa_cross_attention_reference(q, kp, vp, lengths, ks, vs)
    np.testing.assert_allclose(as_f32(ref), as_f32(upstream), **UPSTREAM_TOL[dtype])


def test_bad_inputs_name_the_shape():
    q, kp, vp, ks, vs = make_inputs(1, slots=32, heads=8, kv_heads=1, head_dim=16, dtype=jnp.float32)
    lengths = jnp.asarray([3], jnp.int32)
    with pytest.raises(ValueError, match="q.shape"):
        gqa_cross_attention(q[0], kp, vp, lengths, ks, vs)
    with pytest.raises(ValueError, match="v_prefix.shape"):
        gqa_cross_attention(q, kp, vp[:, :16], lengths, ks, vs)
    with pytest.raises(ValueError, match="k_self.shape"):
        gqa_cross_attention(q, kp, vp, lengths, ks[:, :10], vs[:, :10])
    with pytest.raises(ValueError, match="prefix_lengths.shape"):
        gqa_cross_attention(q, kp, vp, lengths[None], ks, vs)
    with pytest.raises(ValueError, match="dtype"):
        gqa_cross_attention(q, kp.astype(jnp.bfloat16), vp, lengths, ks, vs)
    with pytest.raises(ValueError, match="split_k"):
        BlockSizes(block_k=64, split_k=96)


# --- packed q/k/v (the expert's fused QKV GEMM layout [B,T,K,G+2,H]) -----------------------------------------------


def make_packed(batch, slots, heads, kv_heads, head_dim, dtype, tokens=ACTIONS, seed=0):
    q, kp, vp, ks, vs = make_inputs(batch, slots, heads, kv_heads, head_dim, dtype, tokens=tokens, seed=seed)
    g = heads // kv_heads
    qkv = jnp.concatenate([q.reshape(batch, tokens, kv_heads, g, head_dim), ks[:, :, :, None], vs[:, :, :, None]],
                          axis=3)
    return qkv, kp, vp, (q, ks, vs)


def check_packed(shape, lengths, dtype, block_sizes=None, tokens=ACTIONS, seed=0):
    qkv, kp, vp, _ = make_packed(len(lengths), **shape, dtype=dtype, tokens=tokens, seed=seed)
    lengths = jnp.asarray(lengths, jnp.int32)
    out = gqa_cross_attention_packed(qkv, kp, vp, lengths, block_sizes=block_sizes or BlockSizes(), interpret=True)
    ref = gqa_cross_attention_packed_reference(qkv, kp, vp, lengths)
    assert out.shape == (len(lengths), tokens, shape["heads"], shape["head_dim"]) and out.dtype == qkv.dtype
    np.testing.assert_allclose(as_f32(out), as_f32(ref), **TOL[dtype])


def test_unpack_qkv_is_the_concatenation_inverse():
    qkv, _, _, (q, ks, vs) = make_packed(2, **dict(TINY, kv_heads=2), dtype=jnp.float32, tokens=5)
    for got, want in zip(unpack_qkv(qkv), (q, ks, vs), strict=True):
        np.testing.assert_array_equal(as_f32(got), as_f32(want))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("slots,lengths", [(968, [968]), (576, [572, 77]), (968, [1, 0])],
                         ids=["S968_full", "S576_572_77", "S968_1_0"])
def test_packed_real_shape(slots, lengths, dtype):
    check_packed({**REAL, "slots": slots}, lengths, dtype, seed=len(lengths))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("lengths", [[1, 968], [572, 129]], ids=str)
def test_packed_tiny_config(lengths, dtype):
    check_packed(TINY, lengths, dtype, seed=7)


@pytest.mark.parametrize(
    "block_sizes",
    [BlockSizes(combine="pallas"), BlockSizes(block_rows=16, block_k=16, split_k=48),
     BlockSizes(block_rows=64, block_k=128, split_k=1024)],
    ids=["pallas_combine", "rows16_k16_split48", "one_prefix_split"])
def test_packed_block_sizes(block_sizes):
    check_packed(TINY, [968, 300], jnp.bfloat16, block_sizes=block_sizes, seed=3)


@pytest.mark.parametrize(
    "shape,tokens",
    [(dict(slots=40, heads=8, kv_heads=2, head_dim=16), 50), (dict(slots=10, heads=4, kv_heads=1, head_dim=32), 3)],
    ids=["gqa4x2", "small"])
def test_packed_other_shapes(shape, tokens):
    check_packed(shape, [shape["slots"], 7], jnp.float32, tokens=tokens, seed=5)


def test_packed_equals_the_split_kernel():
    """Same inputs through both entry points: the packed layout changes where q, k and v are read, not the math."""
    qkv, kp, vp, (q, ks, vs) = make_packed(2, **REAL, dtype=jnp.bfloat16, seed=9)
    lengths = jnp.asarray([572, 31], jnp.int32)
    packed = gqa_cross_attention_packed(qkv, kp, vp, lengths, interpret=True)
    split = gqa_cross_attention(q, kp, vp, lengths, ks, vs, interpret=True)
    np.testing.assert_allclose(as_f32(packed), as_f32(split), **TOL[jnp.bfloat16])


@pytest.mark.parametrize(
    "shape,lengths,prefetch_shape,block_sizes",
    [(REAL, [572], (2, 256, 1024), BlockSizes()),  # a slice of the expert's [2, F, D] gating weight
     (dict(REAL, slots=576), [572, 77], (2, 64, 1024), BlockSizes(prefetch_splits=8)),
     (TINY, [968, 300], (2, 64, 32), BlockSizes(prefetch_splits=2, prefetch_rows=64)),
     (TINY, [5], (3, 7, 48), BlockSizes(prefetch_splits=3)),  # rows and columns that are not tiles
     (REAL, [572], (2, 128, 1024), BlockSizes(prefetch_cols=256)),  # the leading quarter of every row
     (TINY, [5], (3, 7, 48), BlockSizes(prefetch_cols=32))],
    ids=["real", "real_batch2_8splits", "tiny_batch2", "ragged_array", "real_leading_cols", "ragged_leading_cols"])
def test_packed_prefetch_reads_every_element_and_changes_nothing(shape, lengths, prefetch_shape, block_sizes):
    """With a prefetch array the extra programs stream all of it (their sums add up to its sum) and the attention
    output is bit-for-bit the same as without it."""
    from pallas_kernels.gqa_cross_attention import _gqa_cross_packed

    qkv, kp, vp, _ = make_packed(len(lengths), **shape, dtype=jnp.bfloat16, seed=11)
    lengths = jnp.asarray(lengths, jnp.int32)
    w = jnp.asarray(np.random.default_rng(12).standard_normal(prefetch_shape), jnp.bfloat16)
    plain, none = _gqa_cross_packed(qkv, kp, vp, lengths, None, block_sizes=block_sizes, interpret=True)
    out, sums = _gqa_cross_packed(qkv, kp, vp, lengths, w, block_sizes=block_sizes, interpret=True)
    assert none is None
    np.testing.assert_array_equal(as_f32(out), as_f32(plain))
    programs = len(lengths) * shape["kv_heads"] * block_sizes.prefetch_splits * (shape["heads"] // shape["kv_heads"])
    assert sums.ndim == 1 and sums.shape[0] % programs == 0  # one sum per prefetch program (x token blocks)
    read = w[..., :block_sizes.prefetch_cols] if block_sizes.prefetch_cols else w
    np.testing.assert_allclose(float(jnp.sum(sums)), float(jnp.sum(read.astype(jnp.float32))), rtol=1e-5, atol=1e-3)
    public = gqa_cross_attention_packed(qkv, kp, vp, lengths, prefetch=w, block_sizes=block_sizes, interpret=True)
    np.testing.assert_array_equal(as_f32(public), as_f32(plain))


def test_packed_bad_inputs_name_the_shape():
    qkv, kp, vp, _ = make_packed(1, slots=32, heads=8, kv_heads=1, head_dim=16, dtype=jnp.float32)
    lengths = jnp.asarray([3], jnp.int32)
    with pytest.raises(ValueError, match="qkv.shape"):
        gqa_cross_attention_packed(qkv[:, :, :, :2], kp, vp, lengths)
    with pytest.raises(ValueError, match="k_prefix.shape"):
        gqa_cross_attention_packed(qkv, kp[..., :8], vp[..., :8], lengths)
    with pytest.raises(ValueError, match="v_prefix.shape"):
        gqa_cross_attention_packed(qkv, kp, vp[:, :16], lengths)
    with pytest.raises(ValueError, match="prefix_lengths.shape"):
        gqa_cross_attention_packed(qkv, kp, vp, lengths[None])
    with pytest.raises(ValueError, match="dtype"):
        gqa_cross_attention_packed(qkv, kp.astype(jnp.bfloat16), vp, lengths)
    with pytest.raises(ValueError, match="single_pass"):
        gqa_cross_attention_packed(qkv, kp, vp, lengths, block_sizes=SINGLE_PASS)
    with pytest.raises(ValueError, match="prefetch.shape"):
        gqa_cross_attention_packed(qkv, kp, vp, lengths, prefetch=jnp.float32(1))
    with pytest.raises(ValueError, match="prefetch_splits"):
        BlockSizes(prefetch_splits=0)


def lower_for_h100(fn, *args):
    """StableHLO of `fn(*args)` lowered for an H100 from this (GPU-less) machine: runs the Pallas Triton lowering."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("block_sizes", [BlockSizes(), SINGLE_PASS], ids=["split", "single_pass"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_triton_lowering_for_h100(dtype, block_sizes):
    q = jax.ShapeDtypeStruct((1, ACTIONS, 8, 256), dtype)
    prefix = jax.ShapeDtypeStruct((1, 968, 1, 256), dtype)
    suffix = jax.ShapeDtypeStruct((1, ACTIONS, 1, 256), dtype)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    fn = functools.partial(gqa_cross_attention, block_sizes=block_sizes, interpret=False)
    text = lower_for_h100(fn, q, prefix, prefix, lengths, suffix, suffix)
    assert "__gpu$xla.gpu.triton" in text and "gqa_cross_attention" in text
    assert ("gqa_cross_attention_single_pass" in text) == block_sizes.single_pass


def test_second_call_does_not_recompile():
    # Pallas imports a module while tracing that adds a JAX config flag; without the eager import in
    # pallas_kernels/_interpret.py every jit traced before it would recompile once. Needs a fresh interpreter.
    script = """
import jax, jax.numpy as jnp
from pallas_kernels.gqa_cross_attention import gqa_cross_attention
from pallas_kernels.ragged_prefill_attention import ragged_prefill_attention
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
key = jax.random.split(jax.random.key(0), 6)
q, kp, vp, ks, vs = (jax.random.normal(k, s) for k, s in zip(key, [(1, 8, 8, 16), (1, 32, 1, 16), (1, 32, 1, 16),
                                                                   (1, 8, 1, 16), (1, 8, 1, 16)]))
lengths = jnp.asarray([20], jnp.int32)
step = jax.jit(lambda q, kp, vp, ks, vs, n: gqa_cross_attention(q, kp, vp, n, ks, vs)
               + ragged_prefill_attention(q, ks, vs, jnp.minimum(n, 8)))
counts = []
for _ in range(3):
    jax.block_until_ready(step(q, kp, vp, ks, vs, lengths))
    counts.append(len(compiles))
print(counts)
assert counts[0] == counts[1] == counts[2], counts
"""
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
@pytest.mark.parametrize("shape,tokens,self_length", [(dict(REAL, slots=576), 64, 50), (TINY, 64, 50), (TINY, 20, 7)],
                         ids=["real_64_rows_50_valid", "tiny_64_50", "tiny_20_7"])
def test_padding_tokens_are_not_keys(packed, shape, tokens, self_length):
    """With self_length, the tokens past it (the denoise loop's row padding) are not keys: the valid tokens' outputs
    equal attention over the valid tokens alone (the padded tokens' own outputs are dropped by the caller)."""
    qkv, kp, vp, (q, ks, vs) = make_packed(2, **shape, dtype=jnp.bfloat16, tokens=tokens, seed=11)
    lengths = jnp.asarray([shape["slots"] - 4, 33], jnp.int32)
    if packed:
        out = gqa_cross_attention_packed(qkv, kp, vp, lengths, self_length=self_length, interpret=True)
        ref = gqa_cross_attention_packed_reference(qkv, kp, vp, lengths, self_length=self_length)
    else:
        out = gqa_cross_attention(q, kp, vp, lengths, ks, vs, self_length=self_length, interpret=True)
        ref = gqa_cross_attention_reference(q, kp, vp, lengths, ks, vs, self_length=self_length)
    np.testing.assert_allclose(as_f32(out), as_f32(ref), **TOL[jnp.bfloat16])
    valid_only = gqa_cross_attention_reference(q[:, :self_length], kp, vp, lengths, ks[:, :self_length],
                                               vs[:, :self_length])
    np.testing.assert_allclose(as_f32(out[:, :self_length]), as_f32(valid_only), **TOL[jnp.bfloat16])


def test_bad_self_length_is_rejected():
    q, kp, vp, ks, vs = make_inputs(1, **TINY, dtype=jnp.float32, tokens=8)
    for bad in (0, 9):
        with pytest.raises(ValueError, match="self_length"):
            gqa_cross_attention(q, kp, vp, jnp.asarray([5]), ks, vs, self_length=bad, interpret=True)

"""GQA cross-attention (denoise): the packed flash-decoding Pallas kernel (interpret mode on the CPU) against its
plain-JAX reference, at pi0.5's real shapes (50 action tokens x 8 query heads on one KV head, head_dim 256, up to 968
prefix slots) and the tiny config's, and the reference against upstream's masked attention over (prefix ++ suffix)
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
    gqa_cross_attention_packed,
    gqa_cross_attention_packed_reference,
    unpack_qkv,
)
from pi05_jax.model import gemma
from tests.conftest import as_f32, assert_kernel_matches

# The Triton lowering tests trace the deprecated-but-working Pallas Triton backend (see docs/design.md).
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

# Kernel vs reference. float32: exact dots; only the summation order (and the split combine) differs, so the
# relative (Frobenius) error gates at 1e-5. bfloat16: the probabilities are rounded to bf16 in different places
# (unnormalized per split vs the normalized softmax): cosine >= 0.99999 and every element within two bf16 ulps.
BF16_TOL = dict(rtol=2 * 2**-7, atol=2 * 2**-7)
UPSTREAM_TOL = {
    jnp.float32: dict(rtol=1e-6, atol=1e-6),
    jnp.bfloat16: dict(rtol=2**-7, atol=2**-7),
}

ACTIONS = 50
REAL = dict(slots=968, heads=8, kv_heads=1, head_dim=256)  # 50 action tokens x 8 heads on one KV head, head_dim 256
TINY = dict(slots=968, heads=8, kv_heads=1, head_dim=16)  # the shared tiny reference model's expert
DEFAULT = BlockSizes()  # the kernel's own default tiles, which the `pallas` fast path runs
TWO_STEPS = BlockSizes(block_k=64, num_stages=2)  # a second schedule: 64-key steps, two pipeline stages


def make_packed(batch, slots, heads, kv_heads, head_dim, dtype, tokens=ACTIONS, seed=0):
    """(qkv [B,T,K,G+2,H], k_prefix, v_prefix [B,S,K,H], (q, k_self, v_self) unpacked)."""
    rng = np.random.default_rng(seed)
    q, kp, vp, ks, vs = (jnp.asarray(x, dtype) for x in (
        rng.standard_normal((batch, tokens, heads, head_dim)) * head_dim**-0.5,  # q, pre-scaled
        rng.standard_normal((batch, slots, kv_heads, head_dim)) * 2.0,  # k_prefix, peaky enough that masking matters
        rng.standard_normal((batch, slots, kv_heads, head_dim)),  # v_prefix
        rng.standard_normal((batch, tokens, kv_heads, head_dim)) * 2.0,  # k_self
        rng.standard_normal((batch, tokens, kv_heads, head_dim)),  # v_self
    ))
    g = heads // kv_heads
    qkv = jnp.concatenate([q.reshape(batch, tokens, kv_heads, g, head_dim), ks[:, :, :, None], vs[:, :, :, None]],
                          axis=3)
    return qkv, kp, vp, (q, ks, vs)


def assert_matches(out, ref, dtype):
    assert_kernel_matches(out, ref, dtype, bf16_tol=BF16_TOL)


def check_packed(shape, lengths, dtype, block_sizes=DEFAULT, tokens=ACTIONS, seed=0):
    qkv, kp, vp, _ = make_packed(len(lengths), **shape, dtype=dtype, tokens=tokens, seed=seed)
    lengths = jnp.asarray(lengths, jnp.int32)
    out = gqa_cross_attention_packed(qkv, kp, vp, lengths, block_sizes=block_sizes, interpret=True)
    ref = gqa_cross_attention_packed_reference(qkv, kp, vp, lengths)
    assert out.shape == (len(lengths), tokens, shape["heads"], shape["head_dim"]) and out.dtype == qkv.dtype
    assert_matches(out, ref, dtype)


# float32 inputs cap block_k at 16 (FLOAT32_MAX_BLOCK_K), so the two schedules only differ in bf16.
@pytest.mark.parametrize("dtype,block_sizes", [(jnp.float32, DEFAULT), (jnp.bfloat16, DEFAULT),
                                               (jnp.bfloat16, TWO_STEPS)], ids=["f32", "bf16", "bf16_two_steps"])
@pytest.mark.parametrize("slots,lengths", [(968, [968]), (576, [572, 77]), (968, [1, 0])],
                         ids=["S968_full", "S576_572_77", "S968_1_0"])
def test_real_shape(slots, lengths, dtype, block_sizes):
    check_packed({**REAL, "slots": slots}, lengths, dtype, block_sizes=block_sizes, seed=len(lengths))


@pytest.mark.parametrize("lengths", [[1], [77], [572], [572, 77]], ids=str)
def test_real_shape_partial_prefix(lengths):
    check_packed(REAL, lengths, jnp.bfloat16, block_sizes=DEFAULT, seed=len(lengths))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("lengths", [[1, 968], [572, 77], [0, 129]], ids=str)
def test_tiny_config_batch2(lengths, dtype):
    check_packed(TINY, lengths, dtype, seed=7)


@pytest.mark.parametrize(
    "block_sizes",
    [BlockSizes(block_rows=16, block_k=16, split_k=48),  # 4 token blocks, the last one overlapping
     BlockSizes(block_rows=32, block_k=32, split_k=256),
     BlockSizes(block_rows=64, block_k=128, split_k=1024),  # one prefix split: no flash-decoding split at all
     TWO_STEPS],
    ids=["rows16_k16_split48", "rows32_k32_split256", "one_prefix_split", "two_steps"])
def test_block_sizes_and_splits(block_sizes):
    check_packed(TINY, [968, 300], jnp.bfloat16, block_sizes=block_sizes, seed=3)


@pytest.mark.parametrize(
    "shape,tokens",
    [(dict(slots=40, heads=8, kv_heads=2, head_dim=16), 50),  # two KV heads, prefix < default tile
     (dict(slots=10, heads=4, kv_heads=1, head_dim=32), 3)],  # prefix and tokens below the smallest tile
    ids=["gqa4x2", "small"])
def test_other_shapes(shape, tokens):
    check_packed(shape, [shape["slots"], 7], jnp.float32, tokens=tokens, seed=5)


@pytest.mark.parametrize("dtype,block_sizes", [(jnp.float32, DEFAULT), (jnp.bfloat16, DEFAULT),
                                               (jnp.bfloat16, TWO_STEPS)], ids=["f32", "bf16", "bf16_two_steps"])
def test_prefix_past_the_length_is_never_used(dtype, block_sizes):
    # NaN everywhere past each row's prefix length: nothing of it may reach the result.
    qkv, kp, vp, _ = make_packed(2, **TINY, dtype=dtype, seed=7)
    lengths = jnp.asarray([77, 600], jnp.int32)
    dead = jnp.arange(TINY["slots"])[None, :, None, None] >= lengths[:, None, None, None]
    kp_bad, vp_bad = jnp.where(dead, jnp.nan, kp), jnp.where(dead, jnp.nan, vp)
    out = gqa_cross_attention_packed(qkv, kp_bad, vp_bad, lengths, block_sizes=block_sizes, interpret=True)
    assert np.all(np.isfinite(as_f32(out)))
    assert_matches(out, gqa_cross_attention_packed_reference(qkv, kp, vp, lengths), dtype)


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
    assert_matches(combine_splits(acc, row_max, row_sum), expected, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [TINY, dict(REAL, slots=200)], ids=["tiny", "real_heads"])
def test_reference_matches_upstream_masked_attention(shape, dtype):
    # The sampler's plain path: upstream's masked attention over concat(prefix cache, suffix K/V) with the mask
    # [prefix slots valid | all suffix tokens] for every action query.
    qkv, kp, vp, (q, ks, vs) = make_packed(2, **shape, dtype=dtype, seed=11)
    lengths = jnp.asarray([shape["slots"], 57], jnp.int32)
    prefix_valid = jnp.arange(shape["slots"])[None, :] < lengths[:, None]
    mask = jnp.concatenate(
        [jnp.repeat(prefix_valid[:, None, :], ACTIONS, axis=1), jnp.ones((2, ACTIONS, ACTIONS), bool)], axis=-1
    )
    upstream = gemma.masked_attention(q, jnp.concatenate([kp, ks], 1), jnp.concatenate([vp, vs], 1), mask)
    ref = gqa_cross_attention_packed_reference(qkv, kp, vp, lengths)
    np.testing.assert_allclose(as_f32(ref), as_f32(upstream), **UPSTREAM_TOL[dtype])


def test_unpack_qkv_is_the_concatenation_inverse():
    qkv, _, _, (q, ks, vs) = make_packed(2, **dict(TINY, kv_heads=2), dtype=jnp.float32, tokens=5)
    for got, want in zip(unpack_qkv(qkv), (q, ks, vs), strict=True):
        np.testing.assert_array_equal(as_f32(got), as_f32(want))


def test_bad_inputs_name_the_shape():
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
    with pytest.raises(ValueError, match="head dim"):
        gqa_cross_attention_packed(qkv[..., :12], kp[..., :12], vp[..., :12], lengths, interpret=False)
    with pytest.raises(ValueError, match="split_k"):
        BlockSizes(block_k=64, split_k=96)
    with pytest.raises(ValueError, match="block_rows"):
        BlockSizes(block_rows=24)
    with pytest.raises(ValueError, match="num_warps"):
        BlockSizes(num_warps=0)


def lower_for_h100(fn, *args):
    """StableHLO of `fn(*args)` lowered for an H100 from this (GPU-less) machine: runs the Pallas Triton lowering."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("block_sizes", [DEFAULT, TWO_STEPS], ids=["default", "two_steps"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_triton_lowering_for_h100(dtype, block_sizes):
    qkv = jax.ShapeDtypeStruct((1, ACTIONS, 1, 10, 256), dtype)
    prefix = jax.ShapeDtypeStruct((1, 968, 1, 256), dtype)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    fn = functools.partial(gqa_cross_attention_packed, block_sizes=block_sizes, interpret=False)
    text = lower_for_h100(fn, qkv, prefix, prefix, lengths)
    assert "__gpu$xla.gpu.triton" in text and "gqa_cross_attention_packed" in text


def test_second_call_does_not_recompile():
    # Pallas imports a module while tracing that adds a JAX config flag; without the eager import in
    # pallas_kernels/_interpret.py every jit traced before it would recompile once. Needs a fresh interpreter.
    script = """
import jax, jax.numpy as jnp
from pallas_kernels.gqa_cross_attention import gqa_cross_attention_packed
from pallas_kernels.ragged_prefill_attention import ragged_prefill_attention
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
key = jax.random.split(jax.random.key(0), 3)
qkv, kp, vp = (jax.random.normal(k, s) for k, s in zip(key, [(1, 8, 1, 10, 16), (1, 32, 1, 16), (1, 32, 1, 16)]))
lengths = jnp.asarray([20], jnp.int32)
step = jax.jit(lambda qkv, kp, vp, n: gqa_cross_attention_packed(qkv, kp, vp, n)
               + ragged_prefill_attention(qkv[:, :, 0, :8], qkv[:, :, :, 8], qkv[:, :, :, 9], jnp.minimum(n, 8)))
counts = []
for _ in range(3):
    jax.block_until_ready(step(qkv, kp, vp, lengths))
    counts.append(len(compiles))
print(counts)
assert counts[0] == counts[1] == counts[2], counts
"""
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]

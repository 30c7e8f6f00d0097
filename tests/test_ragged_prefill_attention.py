"""Ragged prefill attention: the Pallas kernel (interpret mode on the CPU) against its plain-JAX reference, and the
reference against upstream's masked attention (pi05_jax.model.gemma.masked_attention)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels.ragged_prefill_attention import (
    BlockSizes,
    ragged_prefill_attention,
    ragged_prefill_attention_reference,
)
from pi05_jax.model import gemma
from tests.conftest import as_f32, assert_kernel_matches

# The Triton lowering tests trace the deprecated-but-working Pallas Triton backend (see docs/design.md).
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

# Kernel vs reference: float32 differs only in summation order, so the relative (Frobenius) error gates at 1e-5;
# bfloat16 in where probabilities are rounded to bf16 (the kernel rounds unnormalized exp, the reference normalized
# softmax): cosine >= 0.99999 and every element within two bf16 ulps (eps 2**-7).
BF16_TOL = dict(rtol=2 * 2**-7, atol=2 * 2**-7)
# Reference vs upstream's masked attention: the same math on valid rows, so only compilation-level differences.
UPSTREAM_TOL = {
    jnp.float32: dict(rtol=1e-6, atol=1e-6),
    jnp.bfloat16: dict(rtol=2**-7, atol=2**-7),
}

REAL = dict(seq=968, heads=8, kv_heads=1, head_dim=256)  # pi0.5: 8:1 GQA, head_dim 256, 968 prefix slots
TINY = dict(seq=968, heads=8, kv_heads=1, head_dim=16)  # the shared tiny reference model


def make_inputs(batch, seq, heads, kv_heads, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq, heads, head_dim)) * head_dim**-0.5  # pre-scaled, as gemma does
    k = rng.standard_normal((batch, seq, kv_heads, head_dim)) * 2.0  # peaky enough that masking matters
    v = rng.standard_normal((batch, seq, kv_heads, head_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def assert_matches(out, ref, dtype):
    assert_kernel_matches(out, ref, dtype, bf16_tol=BF16_TOL)


def check_against_reference(shape, lengths, dtype, block_sizes=None, seed=0):
    q, k, v = make_inputs(len(lengths), **shape, dtype=dtype, seed=seed)
    lengths = jnp.asarray(lengths, jnp.int32)
    out = ragged_prefill_attention(q, k, v, lengths, block_sizes=block_sizes or BlockSizes(), interpret=True)
    ref = ragged_prefill_attention_reference(q, k, v, lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_matches(out, ref, dtype)
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_real_shape_full_length(dtype):
    check_against_reference(REAL, [968], dtype)


@pytest.mark.parametrize("lengths", [[1], [77], [572], [77, 572]], ids=str)
def test_real_shape_partial_lengths(lengths):
    check_against_reference(REAL, lengths, jnp.bfloat16, seed=len(lengths))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("lengths", [[1, 968], [572, 77], [0, 200]], ids=str)
def test_tiny_config_batch2(lengths, dtype):
    out = check_against_reference(TINY, lengths, dtype)
    for row, n in enumerate(lengths):
        assert not np.any(as_f32(out[row, n:])), "rows past the length must be zeros"


@pytest.mark.parametrize(
    "block_sizes",
    [BlockSizes(block_rows=16, block_k=16), BlockSizes(block_rows=128, block_k=32), BlockSizes(256, 128)],
    ids=lambda b: f"rows{b.block_rows}_k{b.block_k}",
)
def test_block_sizes_tile_ragged_lengths(block_sizes):
    # 968 is no multiple of 128 or 256: the shifted last row block and KV tile are exercised with every length.
    # bfloat16: float32 inputs cap block_k at 16 (see FLOAT32_MAX_BLOCK_K), so they would not use these tiles.
    check_against_reference(TINY, [968, 131], jnp.bfloat16, block_sizes=block_sizes, seed=3)


@pytest.mark.parametrize(
    "shape",
    [
        dict(seq=40, heads=8, kv_heads=2, head_dim=16),  # two KV heads, sequence < default tiles
        dict(seq=10, heads=4, kv_heads=1, head_dim=32),  # fewer tokens than the smallest (16) tile
    ],
    ids=["gqa4x2", "seq10"],
)
def test_other_shapes(shape):
    check_against_reference(shape, [shape["seq"], 7], jnp.float32, seed=5)


def test_lengths_past_the_end_are_clamped():
    q, k, v = make_inputs(1, **TINY, dtype=jnp.float32)
    out = ragged_prefill_attention(q, k, v, jnp.asarray([5000], jnp.int32), interpret=True)
    ref = ragged_prefill_attention_reference(q, k, v, jnp.asarray([968], jnp.int32))
    assert_matches(out, ref, jnp.float32)


def test_keys_past_the_length_are_never_used():
    # Poison everything past each row's length with NaN: nothing past the length may reach the result (a kernel
    # that only masked logits would still multiply NaN values by zero probabilities and return NaN).
    q, k, v = make_inputs(2, **TINY, dtype=jnp.float32, seed=7)
    lengths = [77, 600]
    dead = jnp.arange(TINY["seq"])[None, :, None, None] >= jnp.asarray(lengths)[:, None, None, None]
    poisoned = [jnp.where(dead, jnp.nan, x) for x in (q, k, v)]
    out = ragged_prefill_attention(*poisoned, jnp.asarray(lengths, jnp.int32), interpret=True)
    ref = ragged_prefill_attention_reference(q, k, v, jnp.asarray(lengths, jnp.int32))
    assert np.all(np.isfinite(as_f32(out)))
    assert_matches(out, ref, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [TINY, dict(REAL, seq=200)], ids=["tiny", "real_heads"])
def test_reference_matches_upstream_masked_attention(shape, dtype):
    lengths = [shape["seq"], 57]
    q, k, v = make_inputs(2, **shape, dtype=dtype, seed=11)
    lengths_arr = jnp.asarray(lengths, jnp.int32)
    valid = jnp.arange(shape["seq"])[None, :] < lengths_arr[:, None]
    mask = valid[:, :, None] & valid[:, None, :]  # [B,T,S], as the sampler builds it for the padded prefix
    upstream = gemma.masked_attention(q, k, v, mask)
    ref = ragged_prefill_attention_reference(q, k, v, lengths_arr)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(as_f32(ref[row, :n]), as_f32(upstream[row, :n]), **UPSTREAM_TOL[dtype])


def test_bad_inputs_name_the_shape():
    q, k, v = make_inputs(1, seq=32, heads=8, kv_heads=1, head_dim=16, dtype=jnp.float32)
    lengths = jnp.asarray([3], jnp.int32)
    with pytest.raises(ValueError, match="q.shape"):
        ragged_prefill_attention(q[0], k, v, lengths)
    with pytest.raises(ValueError, match="k.shape"):
        ragged_prefill_attention(q, k[:, :16], v, lengths)
    with pytest.raises(ValueError, match="lengths.shape"):
        ragged_prefill_attention(q, k, v, jnp.asarray([3, 4], jnp.int32))
    k2, v2 = jnp.concatenate([k, k], axis=2), jnp.concatenate([v, v], axis=2)
    with pytest.raises(ValueError, match="k.shape"):
        ragged_prefill_attention(q[:, :, :7], k2, v2, lengths)  # 7 q heads cannot share 2 kv heads
    with pytest.raises(ValueError, match="dtype"):
        ragged_prefill_attention(q.astype(jnp.bfloat16), k, v, lengths)
    with pytest.raises(ValueError, match="block_rows"):
        BlockSizes(block_rows=48)


def test_interpret_defaults_to_cpu_backend():
    assert resolve_interpret(None) == (jax.default_backend() == "cpu")
    assert resolve_interpret(False) is False


def lower_for_h100(fn, *args):
    """StableHLO of `fn(*args)` lowered for an H100 from this (GPU-less) machine: runs the Pallas Triton lowering."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_triton_lowering_for_h100(dtype):
    # The Triton lowering rejects things interpret mode accepts (non-power-of-2 tensors, some scalar ops); this
    # catches them without a GPU. Compiling the Triton IR happens on the GPU (tests/test_kernels_on_gpu.py).
    q = jax.ShapeDtypeStruct((1, 968, 8, 256), dtype)
    kv = jax.ShapeDtypeStruct((1, 968, 1, 256), dtype)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    text = lower_for_h100(functools.partial(ragged_prefill_attention, interpret=False), q, kv, kv, lengths)
    assert "__gpu$xla.gpu.triton" in text and "ragged_prefill_attention" in text

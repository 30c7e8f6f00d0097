"""The Mosaic GPU PDL matmuls (pallas_kernels.pdl_matmul) in Mosaic GPU interpret mode against their plain-JAX
references, at the action expert's real shapes (M = 50 action tokens, batch 2 = 100 rows; QKV 1024 -> 2560, attention
out 2048 -> 1024, down 4096 -> 1024, gate/up 1024 -> 2 x 4096) and the tiny config's; their lowering for Hopper
(checked on the CPU: the griddepcontrol instructions are in the kernel exactly when asked for); and, marked `gpu`,
the same comparisons compiled on the card."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.pdl_matmul import (
    SHARED_MEMORY_BUDGET,
    PdlMatmulBlockSizes,
    fit_block_sizes,
    pdl_geglu_matmul,
    pdl_geglu_matmul_reference,
    pdl_matmul,
    pdl_matmul_reference,
    smem_bytes,
)
from pi05_jax import gemma
from tests.conftest import as_f32, assert_split_partials, matmul_operands

BF16 = jnp.bfloat16
# bfloat16 operands, float32 accumulation in both: the partials differ only by summation order (~1e-6 relative of
# the row's magnitude). The GeGLU rounds each product to bf16 before the GeGLU, as upstream does: a sum on a rounding
# boundary may round the other way, one bf16 ulp (2**-8 relative) of that input; its output is bf16 too.
PARTIAL_TOL = {BF16: dict(rtol=1e-5, atol=1e-4)}
GEGLU_TOL = {BF16: dict(rtol=2 * 2**-8, atol=2 * 2**-8)}

# name -> (M, K, N, K splits, block_n)
MATMUL_SHAPES = {
    "qkv": (50, 1024, 2560, 4, 64),
    "attn_out": (50, 2048, 1024, 8, 64),
    "down": (50, 4096, 1024, 8, 32),
    "down_n64": (50, 4096, 1024, 8, 64),
    "qkv_batch2": (100, 1024, 2560, 4, 64),
    "tiny_qkv": (50, 32, 160, 1, 32),
    "tiny_attn_out": (100, 128, 32, 2, 32),
    "few_rows_n16": (3, 64, 48, 1, 16),
}
GEGLU_SHAPES = {"expert": (50, 1024, 4096), "tiny": (100, 32, 64), "few_rows": (7, 64, 32)}


def _inputs(m, k, w_shape, seed=0):
    return matmul_operands(m, k, w_shape, BF16, seed)


def _check_matmul(name, interpret, pdl=True):
    m, k, n, splits, block_n = MATMUL_SHAPES[name]
    x, w = _inputs(m, k, (n, k))
    bs = fit_block_sizes(k, n, k_splits=splits, block_n=block_n, pdl=pdl)
    assert (bs.k_splits, bs.block_n) == (splits, block_n)
    got = pdl_matmul(x, w, k_splits=splits, block_sizes=bs, interpret=interpret)
    assert_split_partials(got, pdl_matmul_reference(x, w, k_splits=splits), x, w, splits, PARTIAL_TOL[BF16])


def _check_geglu(name, interpret, pdl=True):
    m, k, f = GEGLU_SHAPES[name]
    x, w = _inputs(m, k, (2, f, k), seed=1)
    bs = fit_block_sizes(k, f, k_splits=1, block_n=32, groups=2, pdl=pdl)
    got = pdl_geglu_matmul(x, w, block_sizes=bs, interpret=interpret)
    want = pdl_geglu_matmul_reference(x, w)
    assert got.shape == (m, f) and got.dtype == BF16
    np.testing.assert_allclose(as_f32(got), as_f32(want), **GEGLU_TOL[BF16])


@pytest.mark.parametrize("name", list(MATMUL_SHAPES))
def test_pdl_matmul_partials(name):
    _check_matmul(name, interpret=True)


@pytest.mark.parametrize("name", list(GEGLU_SHAPES))
def test_pdl_geglu_matmul(name):
    _check_geglu(name, interpret=True)


def test_geglu_padded_rows_are_zero_and_the_rest_unchanged():
    """padded_rows keeps the kernel's 64-row output: a PDL down projection reads it without a pad or a slice."""
    x, w = _inputs(50, 64, (2, 32, 64), seed=4)
    padded = pdl_geglu_matmul(x, w, padded_rows=True, interpret=True)
    assert padded.shape == (64, 32)
    np.testing.assert_array_equal(as_f32(padded[:50]), as_f32(pdl_geglu_matmul(x, w, interpret=True)))
    np.testing.assert_array_equal(as_f32(padded[50:]), np.zeros((14, 32), np.float32))


def test_geglu_reference_is_upstreams_mlp_front():
    """The reference on the transposed gating weight equals upstream's gelu(x W_gate) * (x W_up) on openpi's
    [2, D, F] in bf16."""
    x, w = _inputs(50, 64, (2, 64, 128), seed=3)
    gate, up = jnp.einsum("TD,CDF->CTF", x, w, preferred_element_type=jnp.float32).astype(BF16)
    upstream = gemma.gelu_tanh(gate) * up
    ours = pdl_geglu_matmul_reference(x, jnp.swapaxes(w, 1, 2))
    np.testing.assert_allclose(as_f32(ours), as_f32(upstream), **GEGLU_TOL[BF16])


@pytest.mark.parametrize("k,n,splits,block_n,groups", [(1024, 2560, 4, 64, 1), (2048, 1024, 8, 64, 1),
                                                        (4096, 1024, 8, 64, 1), (1024, 4096, 1, 32, 2),
                                                        (32, 160, 4, 64, 1), (64, 32, 8, 64, 1), (128, 48, 2, 64, 1)])
def test_fit_block_sizes_fit_the_shape_and_shared_memory(k, n, splits, block_n, groups):
    bs = fit_block_sizes(k, n, k_splits=splits, block_n=block_n, groups=groups)
    assert bs is not None
    assert n % bs.block_n == 0 and k % (bs.block_k * bs.k_splits) == 0 and bs.k_splits <= splits
    assert smem_bytes(k, bs, groups=groups, itemsize=2, out_itemsize=2 if groups == 2 else 4) <= SHARED_MEMORY_BUDGET


def test_default_down_program_fits_beside_a_geglu_program():
    """The expert's default PDL tiles (pi05_jax.expert_kernels) let the down projection's programs start while the
    GeGLU's run (the model's back-to-back pair): one program of each fits in an SM's 228 KiB of shared memory."""
    from pi05_jax.expert_kernels import PDL_GEGLU_BLOCK_N, PDL_PROJECTION_SPLITS

    splits, block_n = PDL_PROJECTION_SPLITS.down
    down = fit_block_sizes(4096, 1024, k_splits=splits, block_n=block_n)
    geglu = fit_block_sizes(1024, 4096, k_splits=1, block_n=PDL_GEGLU_BLOCK_N, groups=2)
    both = (smem_bytes(4096, down, groups=1, itemsize=2, out_itemsize=4)
            + smem_bytes(1024, geglu, groups=2, itemsize=2, out_itemsize=2))
    assert both <= 228 * 1024 - 2 * 1024  # the SM's shared memory, less 1 KiB the hardware reserves per block


def test_fit_block_sizes_gives_up_where_nothing_fits():
    assert fit_block_sizes(1024, 40, k_splits=1, block_n=64) is None  # no block_n in 16..64 divides 40
    assert fit_block_sizes(24, 64, k_splits=1, block_n=64) is None  # K not a multiple of 16
    assert fit_block_sizes(16384, 4096, k_splits=1, block_n=64, groups=2) is None  # 4 MiB slab per program


def test_bad_inputs_name_the_shape():
    x, w = _inputs(50, 64, (128, 64))
    with pytest.raises(ValueError, match="x.shape"):
        pdl_matmul(x[None], w)
    with pytest.raises(ValueError, match="w.shape"):
        pdl_matmul(x, w[:, :32])
    with pytest.raises(ValueError, match="dtype"):
        pdl_matmul(x.astype(jnp.float32), w)
    with pytest.raises(ValueError, match="w.shape"):
        pdl_geglu_matmul(x, w)  # not [2, K, F]
    with pytest.raises(ValueError, match="block_k"):
        pdl_matmul(x, w, k_splits=3)
    with pytest.raises(ValueError, match="shared memory"):
        pdl_geglu_matmul(*_inputs(50, 16384, (2, 64, 16384)))
    with pytest.raises(ValueError, match="block_n"):
        PdlMatmulBlockSizes(block_n=48)
    with pytest.raises(ValueError, match="block_k"):
        PdlMatmulBlockSizes(block_k=128)
    with pytest.raises(ValueError, match="max_concurrent_steps"):
        PdlMatmulBlockSizes(max_concurrent_steps=1)


def _lowered(fn, *shapes):
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


LOWERING_CASES = [(name, True) for name in [*MATMUL_SHAPES, *(f"geglu_{g}" for g in GEGLU_SHAPES)]] + [
    ("down", False), ("geglu_expert", False)]


@pytest.mark.parametrize("name,pdl", LOWERING_CASES, ids=[f"{n}-{'pdl' if p else 'no_pdl'}" for n, p in LOWERING_CASES])
def test_lowers_for_hopper_with_griddepcontrol_exactly_when_asked(name, pdl):
    """Lowering for CUDA on the CPU runs Pallas' Mosaic GPU lowering for sm_90 (Mosaic assumes Hopper without a
    GPU), layout inference and the shared-memory check included: the kernel body is expressible at the real and the
    tiny shapes. The PTX compile itself needs the card (the `gpu` tests)."""
    S = jax.ShapeDtypeStruct
    if name.startswith("geglu_"):
        m, k, f = GEGLU_SHAPES[name.removeprefix("geglu_")]
        bs = fit_block_sizes(k, f, k_splits=1, block_n=32, groups=2, pdl=pdl)
        text = _lowered(lambda x, w: pdl_geglu_matmul(x, w, block_sizes=bs, interpret=False),
                        S((m, k), BF16), S((2, f, k), BF16))
    else:
        m, k, n, splits, block_n = MATMUL_SHAPES[name]
        bs = fit_block_sizes(k, n, k_splits=splits, block_n=block_n, pdl=pdl)
        text = _lowered(lambda x, w: pdl_matmul(x, w, k_splits=splits, block_sizes=bs, interpret=False),
                        S((m, k), BF16), S((n, k), BF16))
    assert "mosaic_gpu" in text
    assert ("griddepcontrol.wait" in text) == pdl
    assert ("griddepcontrol.launch_dependents" in text) == pdl
    assert ("mosaic_gpu.uses_pdl" in text) == pdl


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [True, False], ids=["pdl", "no_pdl"])
@pytest.mark.parametrize("name", ["qkv", "attn_out", "down", "qkv_batch2", "tiny_qkv"])
def test_pdl_matmul_on_gpu(name, pdl):
    _check_matmul(name, interpret=False, pdl=pdl)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [True, False], ids=["pdl", "no_pdl"])
@pytest.mark.parametrize("name", list(GEGLU_SHAPES))
def test_pdl_geglu_matmul_on_gpu(name, pdl):
    _check_geglu(name, interpret=False, pdl=pdl)

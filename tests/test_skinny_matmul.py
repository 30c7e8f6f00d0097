"""Skinny matmuls on transposed weights (pallas_kernels.skinny_matmul): the split-K partial-sum matmul and the
GeGLU matmul in Pallas interpret mode against their plain-JAX references, at the expert's real shapes (M = 50 action
tokens, batch 2 = 100 rows, D = 1024, F = 4096) and the tiny config's, plus upstream's GeGLU MLP on openpi's layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.skinny_matmul import (
    SHARED_MEMORY_BUDGET,
    SkinnyBlockSizes,
    _tiles,
    geglu_matmul,
    geglu_matmul_reference,
    skinny_matmul,
    skinny_matmul_reference,
)
from pi05_jax import gemma
from tests.conftest import as_f32, assert_split_partials, matmul_operands

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

# Kernel vs reference. float32: exact dots, only the accumulation order differs. bfloat16: the float32 sums agree
# to ~1e-6 relative, but the GeGLU's inputs are rounded to bf16 (as upstream rounds each einsum): a sum sitting on a
# rounding boundary may round the other way, one bf16 ulp (2**-8 relative) of that input; the output is bf16 too.
PARTIAL_TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=1e-5, atol=1e-4)}
GEGLU_TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2 * 2**-8, atol=2 * 2**-8)}
DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])


_inputs = matmul_operands


@DTYPES
@pytest.mark.parametrize("m,k,n,splits", [(50, 4096, 1024, 8), (100, 2048, 1024, 4), (50, 1024, 2560, 2),
                                          (50, 64, 32, 1), (7, 128, 48, 2), (50, 64, 160, 4)],
                         ids=["down", "attn_out_batch2", "qkv", "tiny", "odd_rows", "tiny_qkv_n160"])
@pytest.mark.parametrize("block_m", [128, 16], ids=["m128", "m16"])
def test_skinny_matmul_partials(m, k, n, splits, block_m, dtype):
    x, w_t = _inputs(m, k, (n, k), dtype)
    bs = SkinnyBlockSizes(block_m=block_m, block_n=16 if n % 32 else 32)
    got = skinny_matmul(x, w_t, k_splits=splits, block_sizes=bs, interpret=True)
    assert_split_partials(got, skinny_matmul_reference(x, w_t, k_splits=splits), x, w_t, splits, PARTIAL_TOL[dtype])


@DTYPES
@pytest.mark.parametrize("m,k,f", [(50, 1024, 4096), (100, 1024, 4096), (50, 64, 128), (3, 32, 64), (300, 64, 64)],
                         ids=["expert", "expert_batch2", "tiny", "few_rows", "row_blocks"])
def test_geglu_matmul(m, k, f, dtype):
    x, w_t = _inputs(m, k, (2, f, k), dtype, seed=1)
    got = geglu_matmul(x, w_t, interpret=True)
    want = geglu_matmul_reference(x, w_t)
    assert got.shape == (m, f) and got.dtype == dtype
    np.testing.assert_allclose(as_f32(got), as_f32(want), **GEGLU_TOL[dtype])


@pytest.mark.parametrize("bs", [SkinnyBlockSizes(block_n=16, block_k=16), SkinnyBlockSizes(block_n=64, block_k=128),
                                SkinnyBlockSizes(block_n=32, block_k=512, num_warps=8, num_stages=2)],
                         ids=["n16_k16", "n64_k128", "n32_k512"])
def test_geglu_block_sizes(bs):
    x, w_t = _inputs(50, 512, (2, 256, 512), jnp.float32, seed=2)
    np.testing.assert_allclose(as_f32(geglu_matmul(x, w_t, block_sizes=bs, interpret=True)),
                               as_f32(geglu_matmul_reference(x, w_t)), **GEGLU_TOL[jnp.float32])


@pytest.mark.parametrize("m,dtype,weights", [(50, jnp.bfloat16, 2), (100, jnp.bfloat16, 2), (50, jnp.float32, 2),
                                              (100, jnp.float32, 1), (2000, jnp.float32, 2)])
def test_tiles_fit_shared_memory(m, dtype, weights):
    """Batch 2 (128-row blocks) and float32 inputs shrink block_k so num_stages copies of the tiles fit; on the H200
    the unshrunk batch-2 tiles asked for 288 KiB and failed to launch."""
    bs = SkinnyBlockSizes()
    bm, bn, bk, steps = _tiles(m, 4096, 4096, bs, 1, weights=weights, itemsize=jnp.dtype(dtype).itemsize)
    assert bm <= bs.block_m and bk * steps == 4096
    assert bs.num_stages * (bm + weights * bn) * bk * jnp.dtype(dtype).itemsize <= SHARED_MEMORY_BUDGET


@DTYPES
def test_geglu_reference_is_upstreams_mlp_front(dtype):
    """The reference on the transposed weight equals upstream's gelu(x W_gate) * (x W_up) on openpi's [2, D, F]."""
    x, w = _inputs(50, 64, (2, 64, 128), dtype, seed=3)
    gate, up = jnp.einsum("TD,CDF->CTF", x, w, precision="highest")
    upstream = gemma.gelu_tanh(gate) * up
    ours = geglu_matmul_reference(x, jnp.swapaxes(w, 1, 2))
    tol = {jnp.float32: dict(rtol=1e-6, atol=1e-6), jnp.bfloat16: dict(rtol=2 * 2**-8, atol=2 * 2**-8)}[dtype]
    np.testing.assert_allclose(as_f32(ours), as_f32(upstream), **tol)


def test_bad_inputs_name_the_shape():
    x, w_t = _inputs(50, 64, (2, 128, 64), jnp.float32)
    with pytest.raises(ValueError, match="x.shape"):
        geglu_matmul(x[None], w_t)
    with pytest.raises(ValueError, match="w_t.shape"):
        geglu_matmul(x, w_t[:, :, :32])
    with pytest.raises(ValueError, match="w_t.shape"):
        geglu_matmul(x, w_t[0])
    with pytest.raises(ValueError, match="dtype"):
        geglu_matmul(x, w_t.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="k_splits"):
        skinny_matmul(x, w_t[0], k_splits=3)
    with pytest.raises(ValueError, match="block_n"):
        geglu_matmul(x, w_t[:, :120])  # no power of two >= 16 divides 120
    with pytest.raises(ValueError, match="block_k"):
        SkinnyBlockSizes(block_k=100)
    with pytest.raises(ValueError, match="num_warps"):
        SkinnyBlockSizes(num_warps=0)


def test_jit_traces_under_a_tracer():
    x, w_t = _inputs(50, 64, (2, 128, 64), jnp.float32)
    got = jax.jit(lambda a, b: geglu_matmul(a, b, interpret=True))(x, w_t)
    np.testing.assert_allclose(as_f32(got), as_f32(geglu_matmul_reference(x, w_t)), **GEGLU_TOL[jnp.float32])

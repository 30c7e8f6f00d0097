"""The GeGLU matmul on the transposed gate/up weight (pallas_kernels.skinny_matmul.geglu_matmul) in Pallas interpret
mode against its plain-JAX reference, at the expert's real shapes (M = 50 action tokens, batch 2 = 100 rows, D = 1024,
F = 4096) and the tiny config's, plus the reference against upstream's GeGLU MLP on openpi's layout."""

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
)
from pi05_jax.model import gemma
from tests.conftest import as_f32, assert_kernel_matches, matmul_operands

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

# Kernel vs reference. float32: exact dots, only the accumulation order differs: relative (Frobenius) error <= 1e-5.
# bfloat16: the float32 sums agree to ~1e-6 relative, but the GeGLU's inputs are rounded to bf16 (as upstream rounds
# each einsum): a sum sitting on a rounding boundary may round the other way, one bf16 ulp (2**-8 relative) of that
# input; the output is bf16 too. Cosine >= 0.99999 and every element within two bf16 ulps.
BF16_TOL = dict(rtol=2 * 2**-8, atol=2 * 2**-8)
DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])


_inputs = matmul_operands


def assert_matches(got, want, dtype):
    assert_kernel_matches(got, want, dtype, bf16_tol=BF16_TOL)


@DTYPES
@pytest.mark.parametrize("m,k,f", [(50, 1024, 4096), (100, 1024, 4096), (50, 64, 128), (3, 32, 64), (300, 64, 64)],
                         ids=["expert", "expert_batch2", "tiny", "few_rows", "row_blocks"])
def test_geglu_matmul(m, k, f, dtype):
    x, w_t = _inputs(m, k, (2, f, k), dtype, seed=1)
    got = geglu_matmul(x, w_t, interpret=True)
    assert got.shape == (m, f) and got.dtype == dtype
    assert_matches(got, geglu_matmul_reference(x, w_t), dtype)


@pytest.mark.parametrize("bs", [SkinnyBlockSizes(block_n=16, block_k=16), SkinnyBlockSizes(block_n=64, block_k=128),
                                SkinnyBlockSizes(block_n=32, block_k=512, num_warps=8, num_stages=2)],
                         ids=["n16_k16", "n64_k128", "n32_k512"])
def test_geglu_block_sizes(bs):
    x, w_t = _inputs(50, 512, (2, 256, 512), jnp.float32, seed=2)
    assert_matches(geglu_matmul(x, w_t, block_sizes=bs, interpret=True), geglu_matmul_reference(x, w_t), jnp.float32)


@pytest.mark.parametrize("m,dtype", [(50, jnp.bfloat16), (100, jnp.bfloat16), (50, jnp.float32), (100, jnp.float32),
                                     (2000, jnp.float32)])
def test_tiles_fit_shared_memory(m, dtype):
    """Batch 2 (128-row blocks) and float32 inputs shrink block_k so num_stages copies of the x tile and the two
    weight tiles fit; on the H200 the unshrunk batch-2 tiles asked for 288 KiB and failed to launch."""
    bs = SkinnyBlockSizes()
    bm, bn, bk, steps = _tiles(m, 1024, 4096, bs, itemsize=jnp.dtype(dtype).itemsize)
    assert bm <= bs.block_m and bk * steps == 1024
    assert bs.num_stages * (bm + 2 * bn) * bk * jnp.dtype(dtype).itemsize <= SHARED_MEMORY_BUDGET


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
    with pytest.raises(ValueError, match="block_n"):
        geglu_matmul(x, w_t[:, :120])  # no power of two >= 16 divides 120
    with pytest.raises(ValueError, match="block_k"):
        SkinnyBlockSizes(block_k=100)
    with pytest.raises(ValueError, match="num_warps"):
        SkinnyBlockSizes(num_warps=0)


def test_jit_traces_under_a_tracer():
    x, w_t = _inputs(50, 64, (2, 128, 64), jnp.float32)
    got = jax.jit(lambda a, b: geglu_matmul(a, b, interpret=True))(x, w_t)
    assert_matches(got, geglu_matmul_reference(x, w_t), jnp.float32)

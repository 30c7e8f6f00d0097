"""pallas_kernels.fp8_matmul (Mosaic GPU and Triton backends, Pallas interpret mode on the CPU) and XLA's f8 dot
against the dequantize-then-float32-matmul reference, at the model's shape classes.

Shape classes (M rows, K contracted, N output channels of the full model):
  denoise M = 50 (action expert: q 1024->2048, attn out 2048->1024, MLP down 4096->1024),
  prefill M ~ 600 (Gemma-2B: q 2048->2048, MLP down 16384->2048), vision M = 256 per view (SigLIP: 1152->1152,
  MLP down 4304 (stored padded to 4352) -> 1152), and the tiny reference config.
Interpret mode simulates every tile, so N is cut to a slice of two tiles: tiles along N are independent, and the
slice keeps the block sizes the full shape uses (real M, real K, the real shape's K-split).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.fp8_matmul import (
    E4M3,
    Fp8MatmulBlockSizes,
    default_block_sizes,
    fp8_matmul,
    fp8_matmul_reference,
    fp8_matmul_xla,
)

# max |y - ref| / max |ref|: fp32 accumulation in another order, or one rounding of the output dtype.
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2.0**-7}

# (label, M, K, N of the full model)
SHAPES = [
    ("denoise_q", 50, 1024, 2048),
    ("denoise_attn_out", 50, 2048, 1024),
    ("denoise_mlp_down", 50, 4096, 1024),
    ("prefill_q", 600, 2048, 2048),
    ("vision_qkv", 256, 1152, 1152),
    ("vision_mlp_down", 256, 4352, 1152),
    ("tiny_expert_q", 50, 32, 128),
    ("tiny_llm_kv", 600, 64, 32),
]
# The Mosaic interpreter simulates each wgmma: its real-shape cases are the ones whose slices stay small.
MOSAIC_SHAPES = ["denoise_q", "denoise_mlp_down", "prefill_q", "vision_mlp_down", "tiny_expert_q", "tiny_llm_kv"]
TRITON_EXTRA = [("prefill_mlp_down", 600, 16384, 2048)]


def _operands(m, k, n, seed=0):
    """e4m3 operands spanning e4m3's range (incl. subnormals), positive non-trivial scales; never zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(1, 100, (m, 1)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32) * 60
    x_q = jnp.asarray(np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn))
    w_q = jnp.asarray(np.clip(w, -448, 448).astype(ml_dtypes.float8_e4m3fn))
    x_scale = jnp.asarray(rng.uniform(0.5, 2.0, m).astype(np.float32) / 448)
    w_scale = jnp.asarray(rng.uniform(0.5, 2.0, n).astype(np.float32) / 448)
    return x_q, x_scale, w_q, w_scale


def _numpy_reference(x_q, x_scale, w_q, w_scale):
    """Independent of the module: float64 numpy."""
    x = np.asarray(x_q).astype(np.float64) * np.asarray(x_scale, np.float64)[:, None]
    w = np.asarray(w_q).astype(np.float64) * np.asarray(w_scale, np.float64)[:, None]
    return x @ w.T


def _sliced(m, k, n_full):
    """Block sizes of the full shape and an N slice of two of its tiles."""
    bs = default_block_sizes(m, n_full, k)
    return bs, min(n_full, 2 * bs.block_n)


def _check(y, ref, dtype):
    y = np.asarray(y.astype(jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    assert y.shape == ref.shape
    assert np.all(np.isfinite(y))
    err = np.max(np.abs(y - ref)) / np.max(np.abs(ref))
    assert err <= TOL[jnp.dtype(dtype)], f"relative max error {err:.2e} > {TOL[jnp.dtype(dtype)]:.0e}"


def test_reference_matches_numpy():
    ops = _operands(50, 256, 64)
    _check(fp8_matmul_reference(*ops), _numpy_reference(*ops), jnp.float32)


@pytest.mark.parametrize("label,m,k,n_full", [s for s in SHAPES if s[0] in MOSAIC_SHAPES], ids=lambda v: str(v))
def test_mosaic_kernel_real_shapes(label, m, k, n_full):
    bs, n = _sliced(m, k, n_full)
    ops = _operands(m, k, n)
    y = fp8_matmul(*ops, out_dtype=jnp.float32, block_sizes=bs, backend="mosaic", interpret=True)
    _check(y, fp8_matmul_reference(*ops), jnp.float32)


@pytest.mark.parametrize("label,m,k,n_full", SHAPES + TRITON_EXTRA, ids=lambda v: str(v))
def test_triton_kernel_real_shapes(label, m, k, n_full):
    bs, n = _sliced(m, k, n_full)
    ops = _operands(m, k, n, seed=1)
    y = fp8_matmul(*ops, out_dtype=jnp.float32, block_sizes=bs, backend="triton", interpret=True)
    _check(y, fp8_matmul_reference(*ops), jnp.float32)


@pytest.mark.parametrize("backend", ["mosaic", "triton"])
@pytest.mark.parametrize("k_splits", [1, 2])
def test_kernel_bfloat16_output_and_k_splits(backend, k_splits):
    m, k, n = 50, 256, 64
    ops = _operands(m, k, n, seed=2)
    bs = Fp8MatmulBlockSizes(block_m=64, block_n=32, block_k=64, k_splits=k_splits)
    y = fp8_matmul(*ops, out_dtype=jnp.bfloat16, block_sizes=bs, backend=backend, interpret=True)
    assert y.dtype == jnp.bfloat16
    _check(y, fp8_matmul_reference(*ops), jnp.bfloat16)


@pytest.mark.parametrize("backend", ["mosaic", "triton"])
def test_kernel_per_tensor_activation_scale(backend):
    x_q, _, w_q, w_scale = _operands(64, 128, 64, seed=3)
    x_scale = jnp.float32(0.0123)  # a static (calibrated) scale: one per tensor
    y = fp8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=jnp.float32, backend=backend, interpret=True)
    _check(y, _numpy_reference(x_q, np.full(64, 0.0123, np.float32), w_q, w_scale), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("label,m,k,n_full", SHAPES[:6], ids=lambda v: str(v))
def test_xla_f8_path(label, m, k, n_full, dtype):
    ops = _operands(m, k, min(n_full, 512), seed=4)
    y = fp8_matmul_xla(*ops, out_dtype=dtype)
    assert y.dtype == dtype
    _check(y, _numpy_reference(*ops), dtype)


def test_default_block_sizes_fill_the_gpu_at_denoise_shapes():
    for m, k, n in [(50, 1024, 2048), (50, 2048, 1024), (50, 4096, 1024)]:
        bs = default_block_sizes(m, n, k)
        ctas = -(-m // bs.block_m) * (n // bs.block_n) * bs.k_splits
        assert ctas >= 66, (m, k, n, bs)
        assert k % (bs.block_k * bs.k_splits) == 0 and n % bs.block_n == 0


BAD = {
    "x not fp8": (lambda x, xs, w, ws: (x.astype(jnp.bfloat16), xs, w, ws), "float8_e4m3fn"),
    "K mismatch": (lambda x, xs, w, ws: (x, xs, w[:, :64], ws), "contracted sizes differ"),
    "w scale shape": (lambda x, xs, w, ws: (x, xs, w, ws[:3]), "w_scale"),
    "x rank": (lambda x, xs, w, ws: (x[None], xs, w, ws), "x_q [M, K]"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_operands_name_the_problem(name):
    mutate, needle = BAD[name]
    ops = mutate(*_operands(64, 128, 64))
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        fp8_matmul(*ops, interpret=True)


def test_block_sizes_that_do_not_divide_are_rejected():
    ops = _operands(64, 128, 96)
    with pytest.raises(ValueError, match="block_n"):
        fp8_matmul(*ops, block_sizes=Fp8MatmulBlockSizes(block_n=64), interpret=True)
    with pytest.raises(ValueError, match="unknown fp8_matmul backend"):
        fp8_matmul(*ops, backend="cuda", interpret=True)


def test_e4m3_dtype_constant():
    assert jnp.dtype(E4M3) == jnp.dtype(ml_dtypes.float8_e4m3fn)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["mosaic", "triton"])
@pytest.mark.parametrize("label,m,k,n", SHAPES[:6] + TRITON_EXTRA, ids=lambda v: str(v))
def test_compiled_kernel_on_gpu_full_shapes(label, m, k, n, backend):
    """The compiled kernels (no interpret mode) at the full N of every real shape class."""
    ops = _operands(m, k, n, seed=5)
    y = fp8_matmul(*ops, out_dtype=jnp.bfloat16, backend=backend, interpret=False)
    _check(y, fp8_matmul_reference(*ops), jnp.bfloat16)


@pytest.mark.parametrize("label,m,k,n", SHAPES, ids=lambda v: str(v))
def test_default_tiles_bound_the_products_per_accumulator(label, m, k, n):
    """Hopper's FP8 wgmma accumulates in reduced precision: no default tile sums more than the bound in one
    accumulator (the long-K prefill down projection failed the bf16 tolerance on the H200 without this)."""
    from pallas_kernels.fp8_matmul import MAX_K_PER_ACCUMULATOR

    bs = default_block_sizes(m, n, k)
    assert k % (bs.block_k * bs.k_splits) == 0
    assert k // bs.k_splits <= MAX_K_PER_ACCUMULATOR

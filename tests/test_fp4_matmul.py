"""pallas_kernels/fp4_matmul.py against its dequantize-then-matmul reference (interpret mode on the CPU).

Weights are random bytes (every e2m1 code, both nibbles) with random finite e4m3 scale bytes, so the kernel's
bit-level decoding is exercised without going through the quantizer. Shapes: the tiny config's MLPs and the real
ones (action expert D=1024, F=4096 at M=50; prefix LLM D=2048, F=16384 at M=600).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp4_matmul import (
    DEQUANT_VARIANTS,
    Fp4MatmulBlockSizes,
    default_block_sizes,
    dequantize_reference,
    fp4_matmul,
    fp4_matmul_reference,
)

# Relative (Frobenius) error vs the float32 reference, keyed by the output dtype. The kernel's weights are exact
# in bf16 (an e2m1 value times an e4m3 scale has <= 6 significant bits), so float32 outputs differ only by
# accumulation order; bfloat16 outputs add one rounding (2^-9 relative).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def operands(seed, m, k, n, g=None, x_dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    lead = (g,) if g else ()
    packed = rng.integers(0, 256, size=(*lead, k // 2, n), dtype=np.uint8)
    # e4m3 bytes 0x20..0x47: scales 2^-3 .. 2^1.9 (normal numbers, varied mantissas); a few subnormal / zero scales.
    scales = rng.integers(0x20, 0x48, size=(*lead, k // 16, n), dtype=np.uint8)
    scales.reshape(-1)[:: 97] = rng.integers(0, 8, size=scales.reshape(-1)[:: 97].shape, dtype=np.uint8)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return (jnp.asarray(x, x_dtype), jnp.asarray(packed), jnp.asarray(scales), jnp.float32(rng.uniform(0.01, 0.1)))


def check(args, *, out_dtype=jnp.float32, block_sizes=None):
    got = fp4_matmul(*args, block_sizes=block_sizes, out_dtype=out_dtype, interpret=True)
    want = fp4_matmul_reference(*args, out_dtype=jnp.float32)
    assert got.shape == want.shape and got.dtype == out_dtype
    err = rel_err(got, want)
    assert err <= TOL[out_dtype], f"relative error {err:.2e} > {TOL[out_dtype]:.0e}"


def test_reference_dequantizes_by_the_documented_layout():
    """Nibble order (low = even K) and scale rows (one per 16 K) checked element by element on a few bytes."""
    packed = jnp.asarray([[0x2F, 0x91], [0x07, 0x80]] + [[0, 0]] * 6, jnp.uint8)  # [K/2=8, N=2]
    scales = jnp.asarray([[0x38, 0x40]], jnp.uint8)  # e4m3 1.0 and 2.0
    w = np.asarray(dequantize_reference(packed, scales, 0.5))
    e2m1 = {0x0: 0.0, 0x1: 0.5, 0x2: 1.0, 0x7: 6.0, 0x8: -0.0, 0x9: -0.5, 0xF: -6.0}
    # column 0: bytes 0x2F, 0x07 -> elements 0:-6 (0xF), 1:1 (0x2), 2:6 (0x7), 3:0 ; scale 1.0 * 0.5
    np.testing.assert_array_equal(w[:4, 0], np.array([e2m1[0xF], e2m1[0x2], e2m1[0x7], e2m1[0x0]]) * 0.5)
    # column 1: bytes 0x91, 0x80 -> elements 0:0.5 (0x1), 1:-0.5 (0x9), 2:0, 3:-0 ; scale 2.0 * 0.5
    np.testing.assert_array_equal(w[:4, 1], np.array([e2m1[0x1], e2m1[0x9], 0.0, 0.0]))


# (m, k, n, g): tiny expert gate/up and down, tiny LLM gate/up; M not a multiple of 16 on purpose.
TINY = [(50, 32, 64, 2), (50, 64, 32, None), (21, 64, 128, 2)]


@pytest.mark.parametrize("dequant", DEQUANT_VARIANTS)
@pytest.mark.parametrize("m,k,n,g", TINY)
def test_tiny_shapes_bf16(m, k, n, g, dequant):
    args = operands(0, m, k, n, g)
    check(args, block_sizes=Fp4MatmulBlockSizes(dequant=dequant))
    check(args, out_dtype=jnp.bfloat16, block_sizes=Fp4MatmulBlockSizes(dequant=dequant))


@pytest.mark.parametrize("m,k,n,g", TINY)
def test_tiny_shapes_float32_activations(m, k, n, g):
    check(operands(1, m, k, n, g, x_dtype=jnp.float32))


@pytest.mark.parametrize("bs", [
    Fp4MatmulBlockSizes(block_m=16, block_n=32, block_k=64, k_splits=2),
    Fp4MatmulBlockSizes(block_m=32, block_n=32, block_k=64, k_splits=4, dequant="bf16"),
    Fp4MatmulBlockSizes(block_m=16, block_n=32, block_k=64, k_splits=2, dequant="f16asm"),
    Fp4MatmulBlockSizes(block_m=64, block_n=32, block_k=32, k_splits=4, dequant="f16", split_reduce="atomic"),
])
def test_tiling_and_k_splits(bs):
    check(operands(2, 40, 256, 64, 2), block_sizes=bs)
    check(operands(3, 40, 256, 64), block_sizes=bs, out_dtype=jnp.bfloat16)


def test_float8_scales_equal_their_bytes():
    x, w, s, ts = operands(4, 8, 64, 32)
    a = fp4_matmul(x, w, s, ts, interpret=True)
    b = fp4_matmul(x, w, jax.lax.bitcast_convert_type(s, jnp.float8_e4m3fn), ts, interpret=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Real shapes: the expert's gate/up [2, 1024, 4096] and down-projection [4096, 1024] at M=50 with the default
# (denoise) tiles; the prefix LLM's down-projection [16384, 2048] at M=600 with large tiles to keep interpret
# mode quick (the Triton tiling is exercised on the GPU by the gpu-marked test below and timed by
# `python -m pallas_kernels.fp4_matmul`).
REAL = [
    pytest.param(50, 1024, 4096, 2, None, id="expert_gate_up_M50"),
    pytest.param(50, 4096, 1024, None, None, id="expert_down_M50"),
    pytest.param(600, 16384, 2048, None, Fp4MatmulBlockSizes(block_m=256, block_n=512, block_k=2048),
                 id="prefix_down_M600"),
]


@pytest.mark.parametrize("m,k,n,g,bs", REAL)
def test_real_shapes(m, k, n, g, bs):
    check(operands(5, m, k, n, g), block_sizes=bs, out_dtype=jnp.bfloat16)


def test_default_block_sizes_fill_the_gpu_at_denoise_shapes():
    for k, n, g in ((1024, 4096, 2), (4096, 1024, 1)):
        bs = default_block_sizes(50, k, n, g)
        programs = g * (n // bs.block_n) * bs.k_splits
        assert programs >= 64, (k, n, g, bs)
        assert k % (bs.k_splits * min(bs.block_k, k // bs.k_splits)) == 0
        assert bs.dequant == "f16" and default_block_sizes(50, k, n, g, jnp.float32).dequant == "f32"


@pytest.mark.parametrize("bad,msg", [
    (lambda x, w, s, t: (x, w.astype(jnp.int8), s, t), "uint8"),
    (lambda x, w, s, t: (x, w, s[:, :1], t), "block_scales must be"),
    (lambda x, w, s, t: (x[:, :32], w, s, t), "twice"),
    (lambda x, w, s, t: (x, w, s, jnp.ones(2)), "scalar"),
])
def test_bad_operands_raise_clear_errors(bad, msg):
    args = operands(6, 8, 64, 32)
    with pytest.raises(ValueError, match=msg):
        fp4_matmul(*bad(*args), interpret=True)


def test_f16_variants_need_bf16_activations():
    with pytest.raises(ValueError, match="needs bfloat16 activations"):
        fp4_matmul(*operands(9, 8, 64, 32, x_dtype=jnp.float32), block_sizes=Fp4MatmulBlockSizes(dequant="f16"),
                   interpret=True)


def test_bad_block_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="power of two"):
        Fp4MatmulBlockSizes(block_n=96)
    with pytest.raises(ValueError, match="dequant"):
        Fp4MatmulBlockSizes(dequant="lut")
    with pytest.raises(ValueError, match="split_reduce"):
        Fp4MatmulBlockSizes(split_reduce="tree")
    with pytest.raises(ValueError, match="multiple of block_n"):
        fp4_matmul(*operands(7, 8, 64, 48), block_sizes=Fp4MatmulBlockSizes(block_n=32), interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dequant", DEQUANT_VARIANTS)
@pytest.mark.parametrize("m,k,n,g,splits", [(50, 1024, 4096, 2, None), (50, 4096, 1024, None, None),
                                            (50, 4096, 1024, None, "atomic"), (600, 2048, 16384, 2, None)])
def test_compiled_kernel_on_gpu(m, k, n, g, splits, dequant):
    args = operands(8, m, k, n, g)
    bs = dataclasses.replace(default_block_sizes(m, k, n, g or 1), dequant=dequant)
    if splits:
        bs = dataclasses.replace(bs, k_splits=2 * bs.k_splits, split_reduce=splits)
    got = fp4_matmul(*args, block_sizes=bs,
                     out_dtype=jnp.float32, interpret=False)
    err = rel_err(got, fp4_matmul_reference(*args, out_dtype=jnp.float32))
    assert err <= TOL[jnp.float32], f"relative error {err:.2e}"

"""Every Pallas kernel the GPU path runs through the Triton lowering lowers to Triton IR at the real shapes, checked
on the CPU (no GPU needed): interpret-mode tests check the math, this checks what interpret mode cannot, that the
kernel body is expressible in Triton (power-of-2 tiles, supported indexing and ops) for the shapes the model uses.

Lowering for CUDA asks JAX's Pallas Triton registration for the local GPU's compute capability; on a machine
without a GPU the test supplies Hopper's (9.0) by replacing that one query (`jax._src.pallas.triton`, jax pinned at
0.11.2). PTX compilation itself (register and shared-memory limits) needs the card: the `gpu` benchmarks cover it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.ada_norm_matmul import ada_norm_matmul_geglu, ada_norm_matmul_rope
from pallas_kernels.fp4_matmul import fp4_matmul
from pallas_kernels.fp8_matmul import fp8_matmul
from pallas_kernels.gqa_cross_attention import BlockSizes, gqa_cross_attention, gqa_cross_attention_packed
from pallas_kernels.matmul_gated_residual import matmul_gated_residual
from pallas_kernels.ragged_prefill_attention import ragged_prefill_attention
from pallas_kernels.residual_norm import gated_residual_norm
from pallas_kernels.skinny_matmul import geglu_matmul, skinny_matmul

S = jax.ShapeDtypeStruct
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32

# name -> (function of the operands, operand shapes): the real pi0.5 shapes, batch 1, 2 views + 60 prompt tokens
# (prefix bucket 576), 50 action tokens, 10 Euler steps.
CASES = {
    "ragged_prefill_attention": (
        lambda q, k, v, n: ragged_prefill_attention(q, k, v, n, interpret=False),
        (S((1, 576, 8, 256), BF16), S((1, 576, 1, 256), BF16), S((1, 576, 1, 256), BF16), S((1,), I32))),
    "ragged_prefill_attention as SigLIP (16 heads, group 1, head_dim 128)": (
        lambda q, k, v, n: ragged_prefill_attention(q, k, v, n, interpret=False),
        (S((2, 256, 16, 128), BF16), S((2, 256, 16, 128), BF16), S((2, 256, 16, 128), BF16), S((2,), I32))),
    "gqa_cross_attention": (
        lambda q, kp, vp, n, ks, vs: gqa_cross_attention(q, kp, vp, n, ks, vs, interpret=False),
        (S((1, 50, 8, 256), BF16), S((1, 576, 1, 256), BF16), S((1, 576, 1, 256), BF16), S((1,), I32),
         S((1, 50, 1, 256), BF16), S((1, 50, 1, 256), BF16))),
    "gqa_cross_attention with the Pallas combine": (
        lambda q, kp, vp, n, ks, vs: gqa_cross_attention(q, kp, vp, n, ks, vs, interpret=False,
                                                         block_sizes=BlockSizes(combine="pallas")),
        (S((1, 50, 8, 256), BF16), S((1, 576, 1, 256), BF16), S((1, 576, 1, 256), BF16), S((1,), I32),
         S((1, 50, 1, 256), BF16), S((1, 50, 1, 256), BF16))),
    "gqa_cross_attention_packed (q, k, v read from the QKV GEMM's layout)": (
        lambda qkv, kp, vp, n: gqa_cross_attention_packed(qkv, kp, vp, n, interpret=False),
        (S((1, 50, 1, 10, 256), BF16), S((1, 576, 1, 256), BF16), S((1, 576, 1, 256), BF16), S((1,), I32))),
    "gqa_cross_attention_packed with the GeGLU weight prefetched into L2": (
        lambda qkv, kp, vp, n, w: gqa_cross_attention_packed(qkv, kp, vp, n, prefetch=w, interpret=False),
        (S((1, 50, 1, 10, 256), BF16), S((1, 576, 1, 256), BF16), S((1, 576, 1, 256), BF16), S((1,), I32),
         S((2, 4096, 1024), BF16))),
    "geglu_matmul (expert gate/up + GeGLU, transposed weight)": (
        lambda x, w: geglu_matmul(x, w, interpret=False),
        (S((50, 1024), BF16), S((2, 4096, 1024), BF16))),
    "skinny_matmul (expert down projection, 8 K splits)": (
        lambda x, w: skinny_matmul(x, w, k_splits=8, interpret=False),
        (S((50, 4096), BF16), S((1024, 4096), BF16))),
    "gated_residual_norm (expert residual + adaRMS on the down projection's 8 splits)": (
        lambda p, x, g, sc, sh: gated_residual_norm(p, x, g, sc, sh, interpret=False),
        (S((8, 50, 1024), F32), S((50, 1024), BF16), S((1, 1, 1024), BF16), S((1, 1, 1024), BF16),
         S((1, 1, 1024), BF16))),
    "ada_norm_matmul_rope": (
        lambda x, g, w, sw, c, s, i: ada_norm_matmul_rope(x, g, w, sw, c, s, group=8, step=i, interpret=False),
        (S((64, 1024), F32), S((10, 1024), F32), S((1024, 10, 2, 128), BF16), S((10, 10, 2, 128), F32),
         S((64, 128), F32), S((64, 128), F32), S((), I32))),
    "ada_norm_matmul_geglu": (
        lambda x, g, w, sw, i: ada_norm_matmul_geglu(x, g, w, sw, step=i, interpret=False),
        (S((64, 1024), F32), S((10, 1024), F32), S((2, 1024, 4096), BF16), S((10, 2, 4096), F32), S((), I32))),
    "matmul_gated_residual (out, K split)": (
        lambda a, w, g, r, i: matmul_gated_residual(a, w, g, r, step=i, interpret=False),
        (S((64, 2048), BF16), S((2048, 1024), BF16), S((10, 1024), F32), S((64, 1024), F32), S((), I32))),
    "fp4_matmul (expert gate/up)": (
        lambda x, w, s, t: fp4_matmul(x, w, s, t, interpret=False),
        (S((50, 1024), BF16), S((2, 512, 4096), jnp.uint8), S((2, 64, 4096), jnp.uint8), S((), F32))),
    "fp8_matmul triton (prefill MLP)": (
        lambda x, xs, w, ws: fp8_matmul(x, xs, w, ws, backend="triton", interpret=False),
        (S((576, 2048), jnp.float8_e4m3fn), S((576,), F32), S((16384, 2048), jnp.float8_e4m3fn), S((16384,), F32))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_lowers_to_triton(hopper, name):
    fn, shapes = CASES[name]
    lowered = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "xla.gpu.triton" in text, f"{name}: no Triton kernel in the lowered module"

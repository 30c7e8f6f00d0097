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

from pallas_kernels.fp4_matmul import fp4_matmul
from pallas_kernels.fp8_matmul import fp8_matmul
from pallas_kernels.gqa_cross_attention import BlockSizes, gqa_cross_attention_packed
from pallas_kernels.ragged_prefill_attention import ragged_prefill_attention
from pallas_kernels.skinny_matmul import geglu_matmul

S = jax.ShapeDtypeStruct
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32

# name -> (function of the operands, operand shapes): the real pi0.5 shapes, batch 1, 2 views + 60 prompt tokens
# (prefix bucket 576), 50 action tokens, 10 Euler steps.
CASES = {
    "ragged_prefill_attention": (
        lambda q, k, v, n: ragged_prefill_attention(q, k, v, n, interpret=False),
        (S((1, 576, 8, 256), BF16), S((1, 576, 1, 256), BF16), S((1, 576, 1, 256), BF16), S((1,), I32))),
    "gqa_cross_attention_packed (q, k, v read from the QKV GEMM's layout)": (
        lambda qkv, kp, vp, n: gqa_cross_attention_packed(qkv, kp, vp, n, interpret=False),
        (S((1, 50, 1, 10, 256), BF16), S((1, 576, 1, 256), BF16), S((1, 576, 1, 256), BF16), S((1,), I32))),
    "gqa_cross_attention_packed with 64-key steps in 2 stages": (
        lambda qkv, kp, vp, n: gqa_cross_attention_packed(qkv, kp, vp, n, interpret=False,
                                                          block_sizes=BlockSizes(block_k=64, num_stages=2)),
        (S((1, 50, 1, 10, 256), BF16), S((1, 576, 1, 256), BF16), S((1, 576, 1, 256), BF16), S((1,), I32))),
    "geglu_matmul (expert gate/up + GeGLU, transposed weight)": (
        lambda x, w: geglu_matmul(x, w, interpret=False),
        (S((50, 1024), BF16), S((2, 4096, 1024), BF16))),
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

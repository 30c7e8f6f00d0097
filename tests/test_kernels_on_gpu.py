"""The Pallas kernels of the fast path compiled for the card (interpret=False) against their plain-JAX references at
the real shapes: what interpret mode cannot check (the Triton compile, register and shared-memory limits, the
hardware's bf16 dots). Marked `gpu`: skipped on machines without an NVIDIA GPU (the CI), run on the card with
`pytest -m gpu`. Gates as on the CPU: float32 (exact dots; the reference at HIGHEST precision, not the GPU's default
TF32) relative Frobenius error <= 1e-5; bfloat16 cosine >= 0.99999."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gqa_cross_attention as gqa
from pallas_kernels import ragged_prefill_attention as rpa
from pallas_kernels import skinny_matmul as skinny
from pi05_jax.fast import ops as fast_ops
from tests.conftest import KERNEL_BF16_COSINE as BF16_COSINE
from tests.conftest import KERNEL_F32_REL_ERR as F32_REL_ERR
from tests.conftest import cosine, rel_err

pytestmark = pytest.mark.gpu
TWO_STEPS = gqa.BlockSizes(block_k=64, num_stages=2)  # a second schedule: 64-key steps, two pipeline stages


def assert_matches(got, want, dtype):
    """conftest's gates (float32 relative error, bfloat16 cosine) without its elementwise bf16 tolerance: the card's
    bf16 dots round differently from the CPU's, elementwise bounds are for the CPU tests."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if dtype == jnp.float32:
        err = rel_err(got, want)
        assert err <= F32_REL_ERR, f"float32 relative error {err:.3g} > {F32_REL_ERR}"
    else:
        cos = cosine(got, want)
        assert cos >= BF16_COSINE, f"bfloat16 cosine {cos:.7f} < {BF16_COSINE}"


def normal(rng, shape, scale=1.0, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


@pytest.mark.parametrize("dtype,tiles", [(jnp.bfloat16, gqa.BlockSizes()), (jnp.bfloat16, TWO_STEPS),
                                         (jnp.float32, gqa.BlockSizes())], ids=["bf16", "bf16_two_steps", "f32"])
@pytest.mark.parametrize("slots,lengths", [(576, [572]), (968, [968, 77])], ids=["S576", "S968"])
def test_gqa_cross_attention_packed(slots, lengths, dtype, tiles):
    rng = np.random.default_rng(4)
    b = len(lengths)
    qkv = normal(rng, (b, 50, 1, 10, 256), 256**-0.5, dtype)
    kp, vp = normal(rng, (b, slots, 1, 256), 2.0, dtype), normal(rng, (b, slots, 1, 256), 1.0, dtype)
    n = jnp.asarray(lengths, jnp.int32)
    got = gqa.gqa_cross_attention_packed(qkv, kp, vp, n, block_sizes=tiles, interpret=False)
    with jax.default_matmul_precision("highest"):
        want = gqa.gqa_cross_attention_packed_reference(qkv, kp, vp, n)
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("m,dtype", [(50, jnp.bfloat16), (100, jnp.bfloat16), (300, jnp.bfloat16),
                                     (50, jnp.float32)], ids=["batch1", "batch2", "batch6", "batch1_f32"])
def test_geglu_matmul(m, dtype):
    rng = np.random.default_rng(5)
    x = normal(rng, (m, 1024), 1.0, dtype)
    w_t = normal(rng, (2, 4096, 1024), 1024**-0.5, dtype)
    got = skinny.geglu_matmul(x, w_t, interpret=False)
    # bf16: float32 sums rounded to bf16 before the GeGLU (upstream's rounding), a bf16 output; float32: exact dots
    assert_matches(got, skinny.geglu_matmul_reference(x, w_t), dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("seq,lengths", [(576, [572]), (968, [968, 77])], ids=["S576", "S968"])
def test_ragged_prefill_attention(seq, lengths, dtype):
    rng = np.random.default_rng(3)
    b = len(lengths)
    q = normal(rng, (b, seq, 8, 256), 256**-0.5, dtype)
    k, v = normal(rng, (b, seq, 1, 256), 2.0, dtype), normal(rng, (b, seq, 1, 256), 1.0, dtype)
    n = jnp.asarray(lengths, jnp.int32)
    got = rpa.ragged_prefill_attention(q, k, v, n, interpret=False)
    with jax.default_matmul_precision("highest"):
        want = rpa.ragged_prefill_attention_reference(q, k, v, n)
    assert_matches(got, want, dtype)


def test_cudnn_vision_attention():
    """SigLIP's attention through cuDNN (FastPathOptions.fused_attention) against upstream's, in float32."""
    rng = np.random.default_rng(8)
    q = normal(rng, (2, 256, 16, 72), 72**-0.5, jnp.bfloat16)
    k, v = normal(rng, (2, 256, 16, 72), 1.0, jnp.bfloat16), normal(rng, (2, 256, 16, 72), 1.0, jnp.bfloat16)
    got = jax.jit(lambda q, k, v: fast_ops.vision_attend_fused(q, k, v, jnp.bfloat16, implementation="cudnn"))(q, k, v)
    with jax.default_matmul_precision("highest"):
        want = fast_ops.vision_attend_xla(*(a.astype(jnp.float32) for a in (q, k, v)), jnp.float32)
    assert_matches(got, want, jnp.bfloat16)

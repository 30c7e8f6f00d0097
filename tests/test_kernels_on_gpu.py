"""The Pallas kernels of the fast paths compiled for the card (interpret=False) against their plain-JAX references at
the real shapes: what interpret mode cannot check (the Triton compile, register and shared-memory limits, atomics,
the hardware's bf16 dots). Marked `gpu`: skipped on machines without an NVIDIA GPU (the CI), run on the card with
`pytest -m gpu`. Tolerances are relative Frobenius errors keyed by dtype; float32 inputs use exact dots."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ada_norm_matmul as anm
from pallas_kernels import gqa_cross_attention as gqa
from pallas_kernels import matmul_gated_residual as mgr
from pallas_kernels import ragged_prefill_attention as rpa
from pallas_kernels import residual_norm as rn
from pallas_kernels import skinny_matmul as skinny

pytestmark = pytest.mark.gpu
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def normal(rng, shape, scale=1.0, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_ada_norm_matmul_rope_and_geglu(dtype):
    rng = np.random.default_rng(0)
    m, k, p, c, f, steps = 50, 1024, 10, 128, 4096, 10
    x = normal(rng, (m, k))
    gain = 1 + normal(rng, (steps, k), 0.1)
    w = normal(rng, (k, p, 2, c), k**-0.5, dtype)
    sw = normal(rng, (steps, p, 2, c), 0.1)
    ang = rng.uniform(0, 6, (m, c))
    cos, sin = jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)
    got = anm.ada_norm_matmul_rope(x, gain, w, sw, cos, sin, group=8, step=jnp.int32(3), interpret=False)
    want = anm.ada_norm_matmul_rope_reference(x, gain, w, sw, cos, sin, group=8, step=3)
    assert rel_err(got, want) <= TOL[dtype]
    wg = normal(rng, (2, k, f), k**-0.5, dtype)
    swg = normal(rng, (steps, 2, f), 0.1)
    got = anm.ada_norm_matmul_geglu(x, gain, wg, swg, step=jnp.int32(7), interpret=False)
    assert rel_err(got, anm.ada_norm_matmul_geglu_reference(x, gain, wg, swg, step=7)) <= TOL[dtype]


@pytest.mark.parametrize("splits", [1, 4, 8])
@pytest.mark.parametrize("k", [2048, 4096])
def test_matmul_gated_residual(k, splits):
    rng = np.random.default_rng(1)
    a, w = normal(rng, (50, k), 1.0, jnp.bfloat16), normal(rng, (k, 1024), k**-0.5, jnp.bfloat16)
    gate, res = normal(rng, (10, 1024), 0.5), normal(rng, (50, 1024))
    want = mgr.matmul_gated_residual_reference(a, w, gate, res, step=2)
    got = mgr.matmul_gated_residual(a, w, gate, res + 0.0, step=jnp.int32(2), interpret=False,
                                    block_sizes=mgr.GatedResidualBlockSizes(k_splits=splits))
    assert rel_err(got, want) <= 1e-5  # float32 output of a float32-accumulated bf16 dot: rounding only


@pytest.mark.parametrize("combine", ["xla", "pallas"])
@pytest.mark.parametrize("slots,lengths", [(576, [572]), (968, [968, 77])], ids=["S576", "S968"])
def test_gqa_cross_attention(slots, lengths, combine):
    rng = np.random.default_rng(2)
    b = len(lengths)
    q = normal(rng, (b, 50, 8, 256), 256**-0.5, jnp.bfloat16)
    kp, vp = normal(rng, (b, slots, 1, 256), 2.0, jnp.bfloat16), normal(rng, (b, slots, 1, 256), 1.0, jnp.bfloat16)
    ks, vs = normal(rng, (b, 50, 1, 256), 2.0, jnp.bfloat16), normal(rng, (b, 50, 1, 256), 1.0, jnp.bfloat16)
    n = jnp.asarray(lengths, jnp.int32)
    got = gqa.gqa_cross_attention(q, kp, vp, n, ks, vs, block_sizes=gqa.BlockSizes(combine=combine),
                                  interpret=False)
    assert rel_err(got, gqa.gqa_cross_attention_reference(q, kp, vp, n, ks, vs)) <= TOL[jnp.bfloat16]


@pytest.mark.parametrize("tiles", [{}, dict(block_k=128, num_stages=1)], ids=["k64", "k128_1stage"])
@pytest.mark.parametrize("combine", ["xla", "pallas"])
@pytest.mark.parametrize("slots,lengths", [(576, [572]), (968, [968, 77])], ids=["S576", "S968"])
def test_gqa_cross_attention_packed(slots, lengths, combine, tiles):
    rng = np.random.default_rng(4)
    b = len(lengths)
    qkv = normal(rng, (b, 50, 1, 10, 256), 256**-0.5, jnp.bfloat16)
    kp, vp = normal(rng, (b, slots, 1, 256), 2.0, jnp.bfloat16), normal(rng, (b, slots, 1, 256), 1.0, jnp.bfloat16)
    n = jnp.asarray(lengths, jnp.int32)
    got = gqa.gqa_cross_attention_packed(qkv, kp, vp, n, block_sizes=gqa.BlockSizes(combine=combine, **tiles),
                                         interpret=False)
    assert rel_err(got, gqa.gqa_cross_attention_packed_reference(qkv, kp, vp, n)) <= TOL[jnp.bfloat16]


@pytest.mark.parametrize("prefetch_splits", [2, 4, 8])
def test_gqa_cross_attention_packed_prefetch(prefetch_splits):
    """The L2-prefetch programs on the card: every element of the GeGLU weight read (the programs' sums add up to
    its sum), the attention output bit-for-bit the one without them."""
    rng = np.random.default_rng(8)
    qkv = normal(rng, (1, 50, 1, 10, 256), 256**-0.5, jnp.bfloat16)
    kp, vp = normal(rng, (1, 576, 1, 256), 2.0, jnp.bfloat16), normal(rng, (1, 576, 1, 256), 1.0, jnp.bfloat16)
    w = normal(rng, (2, 4096, 1024), 1.0, jnp.bfloat16)
    n = jnp.asarray([572], jnp.int32)
    bs = gqa.BlockSizes(prefetch_splits=prefetch_splits)
    plain, _ = gqa._gqa_cross_packed(qkv, kp, vp, n, None, block_sizes=bs, interpret=False)
    got, sums = gqa._gqa_cross_packed(qkv, kp, vp, n, w, block_sizes=bs, interpret=False)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(plain, np.float32))
    want = float(jnp.sum(w.astype(jnp.float32)))
    assert abs(float(jnp.sum(sums)) - want) <= 1e-3 * float(jnp.sum(jnp.abs(w.astype(jnp.float32))))


@pytest.mark.parametrize("m,dtype", [(50, jnp.bfloat16), (100, jnp.bfloat16), (300, jnp.bfloat16),
                                     (50, jnp.float32)], ids=["batch1", "batch2", "batch6", "batch1_f32"])
def test_geglu_matmul(m, dtype):
    rng = np.random.default_rng(5)
    x = normal(rng, (m, 1024), 1.0, dtype)
    w_t = normal(rng, (2, 4096, 1024), 1024**-0.5, dtype)
    got = skinny.geglu_matmul(x, w_t, interpret=False)
    # bf16: float32 sums rounded to bf16 before the GeGLU (upstream's rounding), a bf16 output; float32: exact dots
    assert rel_err(got, skinny.geglu_matmul_reference(x, w_t)) <= TOL[dtype]


@pytest.mark.parametrize("k,n,splits", [(4096, 1024, 8), (2048, 1024, 4), (1024, 2560, 2)],
                         ids=["down", "attn_out", "qkv"])
def test_skinny_matmul(k, n, splits):
    rng = np.random.default_rng(6)
    x = normal(rng, (50, k), 1.0, jnp.bfloat16)
    w_t = normal(rng, (n, k), k**-0.5, jnp.bfloat16)
    got = skinny.skinny_matmul(x, w_t, k_splits=splits, interpret=False)
    assert rel_err(got, skinny.skinny_matmul_reference(x, w_t, k_splits=splits)) <= 1e-5


@pytest.mark.parametrize("splits,m,dtype", [(8, 50, jnp.bfloat16), (2, 100, jnp.bfloat16), (8, 50, jnp.float32)],
                         ids=["down_batch1", "attn_out_batch2", "down_batch1_f32"])
def test_gated_residual_norm(splits, m, dtype):
    rng = np.random.default_rng(7)
    parts = normal(rng, (splits, m, 1024))
    x = normal(rng, (m, 1024), 3.0, dtype)
    gate, scale, shift = (normal(rng, (1, 1, 1024), 0.5, dtype) for _ in range(3))
    got = rn.gated_residual_norm(parts, x, gate, scale, shift, interpret=False)
    for g, w in zip(got, rn.gated_residual_norm_reference(parts, x, gate, scale, shift), strict=True):
        assert rel_err(g, w) <= TOL[dtype]


@pytest.mark.parametrize("shape,lengths", [((576, 8, 1, 256), [572]), ((256, 16, 16, 128), [256, 256])],
                         ids=["prefill", "siglip"])
def test_ragged_prefill_attention(shape, lengths):
    rng = np.random.default_rng(3)
    s, heads, kv_heads, h = shape
    b = len(lengths)
    q = normal(rng, (b, s, heads, h), h**-0.5, jnp.bfloat16)
    k, v = normal(rng, (b, s, kv_heads, h), 2.0, jnp.bfloat16), normal(rng, (b, s, kv_heads, h), 1.0, jnp.bfloat16)
    n = jnp.asarray(lengths, jnp.int32)
    got = rpa.ragged_prefill_attention(q, k, v, n, interpret=False)
    assert rel_err(got, rpa.ragged_prefill_attention_reference(q, k, v, n)) <= TOL[jnp.bfloat16]

"""pallas_kernels/ada_norm_matmul.py (adaRMS norm folded into the QKV+RoPE and the GeGLU GEMMs), interpret mode on the
CPU.

- parity with the module's plain-JAX references (`ada_norm_matmul_rope_reference`, `ada_norm_matmul_geglu_reference`)
  for float32 and bfloat16 weights: the tiny config's expert, an M > 64 that is not a multiple of 16 (two row
  blocks, padded rows), small tiles that split heads and K into several blocks, and the real action expert shapes
  (D=1024, KH=1, G=8, H=256; F=4096 at M=50) with the default tiles;
- the per-step tables: `step` as a traced int32 inside jit reads row `step` of gain / shift_w;
- the semantics, independently of the module's reference: an upstream-style adaRMS norm (normalize, * (1 + scale),
  + shift, then the matmul), rotate-half RoPE, the H^-0.5 query scale, keys RoPE'd unscaled, values untouched;
  gelu_tanh(gate) * up for the MLP;
- bad operands raise ValueErrors that name the argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallas_kernels.ada_norm_matmul import (
    RMS_EPS,
    AdaNormMatmulBlockSizes,
    ada_norm_matmul_geglu,
    ada_norm_matmul_geglu_reference,
    ada_norm_matmul_rope,
    ada_norm_matmul_rope_reference,
)

# Relative (Frobenius) error, keyed by the weights' dtype (= the output dtype). float32: exact dots in both, only the
# accumulation order and where the norm's r and shift @ W enter differ. bfloat16: the output is rounded to bf16
# (2^-9 relative) and the kernel's bf16 dot may accumulate in another order than the reference's.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# Two calls of the kernel that must compute the same thing (step from a table row vs the row passed alone).
SAME_TOL = {jnp.float32: 1e-6, jnp.bfloat16: 1e-3}
ROPE_MAX_WAVELENGTH = 10_000.0  # Gemma's


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _x_gain_shift(rng, m, k, steps):
    """x [M, K] float32 with row norms spread over two decades (so the per-row rsqrt matters), gain = 1 + scale and
    shift ([K] each, or [steps, K])."""
    x = rng.standard_normal((m, k)) * np.exp(rng.uniform(-2.0, 2.0, size=(m, 1)))
    lead = () if steps is None else (steps,)
    gain = 1.0 + 0.3 * rng.standard_normal((*lead, k))
    shift = 0.5 * rng.standard_normal((*lead, k))
    return jnp.asarray(x, jnp.float32), jnp.asarray(gain, jnp.float32), jnp.asarray(shift, jnp.float32)


def rope_angles(positions, head_dim):
    """cos, sin [M, H/2] float32 of integer positions [M] (Gemma's rotary frequencies)."""
    exponents = (2.0 / head_dim) * np.arange(head_dim // 2, dtype=np.float64)
    radians = np.asarray(positions, np.float64)[:, None] / ROPE_MAX_WAVELENGTH ** exponents[None, :]
    return jnp.asarray(np.cos(radians), jnp.float32), jnp.asarray(np.sin(radians), jnp.float32)


def rope_operands(seed, m, k, kh, group, c, dtype, steps=None):
    """(x, gain, w [K, P, 2, C], shift_w = shift @ w, cos, sin) and shift; w ~ N(0, 1/K) in `dtype`."""
    rng = np.random.default_rng(seed)
    x, gain, shift = _x_gain_shift(rng, m, k, steps)
    p = kh * (group + 2)
    w = jnp.asarray(rng.standard_normal((k, p, 2, c)) / np.sqrt(k), dtype)
    shift_w = jnp.einsum("...k,kpjc->...pjc", shift, w.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    cos, sin = rope_angles(rng.integers(0, 1000, size=m), 2 * c)
    return (x, gain, w, shift_w, cos, sin), shift


def geglu_operands(seed, m, k, f, dtype, steps=None):
    """(x, gain, w [2, K, F], shift_w = shift @ w) and shift; w ~ N(0, 1/K) in `dtype`."""
    rng = np.random.default_rng(seed)
    x, gain, shift = _x_gain_shift(rng, m, k, steps)
    w = jnp.asarray(rng.standard_normal((2, k, f)) / np.sqrt(k), dtype)
    shift_w = jnp.einsum("...k,gkf->...gf", shift, w.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return (x, gain, w, shift_w), shift


def check(got, want, dtype, tol=TOL):
    assert got.shape == want.shape and got.dtype == want.dtype == dtype, (got.shape, got.dtype, want.shape)
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    err = rel_err(got, want)
    assert err <= tol[dtype], f"relative error {err:.2e} > {tol[dtype]:.0e}"


# --- parity with the module's references -----------------------------------------------------------------------------

DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]
SMALL_TILES = AdaNormMatmulBlockSizes(block_m=16, block_n=16, block_k=16)

# (m, k, kh, group, c, block sizes)
ROPE_SMALL = [
    pytest.param(50, 32, 1, 8, 8, None, id="tiny_expert"),
    pytest.param(100, 64, 1, 8, 8, None, id="M100_two_row_blocks"),
    pytest.param(37, 64, 2, 2, 32, SMALL_TILES, id="two_kv_heads_small_tiles"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,kh,group,c,bs", ROPE_SMALL)
def test_rope_matches_reference(m, k, kh, group, c, bs, dtype):
    args, _ = rope_operands(0, m, k, kh, group, c, dtype)
    got = ada_norm_matmul_rope(*args, group=group, block_sizes=bs, interpret=True)
    check(got, ada_norm_matmul_rope_reference(*args, group=group), dtype)


# (m, k, f, block sizes)
GEGLU_SMALL = [
    pytest.param(50, 32, 64, None, id="tiny_expert"),
    pytest.param(100, 64, 64, None, id="M100_two_row_blocks"),
    pytest.param(37, 64, 96, SMALL_TILES, id="small_tiles"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,f,bs", GEGLU_SMALL)
def test_geglu_matches_reference(m, k, f, bs, dtype):
    args, _ = geglu_operands(1, m, k, f, dtype)
    got = ada_norm_matmul_geglu(*args, block_sizes=bs, interpret=True)
    check(got, ada_norm_matmul_geglu_reference(*args), dtype)


# The action expert (gemma_300m: D=1024, 8 query heads on 1 KV head of H=256, mlp_dim 4096) at M = 50 tokens with the
# default tiles; bf16 weights only (the model dtype), to keep interpret mode quick.
def test_rope_real_shape():
    args, _ = rope_operands(2, 50, 1024, 1, 8, 128, jnp.bfloat16)
    got = ada_norm_matmul_rope(*args, group=8, block_sizes=AdaNormMatmulBlockSizes(), interpret=True)
    check(got, ada_norm_matmul_rope_reference(*args, group=8), jnp.bfloat16)


def test_geglu_real_shape():
    args, _ = geglu_operands(3, 50, 1024, 4096, jnp.bfloat16)
    got = ada_norm_matmul_geglu(*args, block_sizes=AdaNormMatmulBlockSizes(), interpret=True)
    check(got, ada_norm_matmul_geglu_reference(*args), jnp.bfloat16)


# --- per-step tables -------------------------------------------------------------------------------------------------

STEPS = 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_step_reads_its_table_row(dtype):
    (x, gains, w, shift_ws, cos, sin), _ = rope_operands(4, 50, 32, 1, 8, 8, dtype, steps=STEPS)
    assert gains.shape == (STEPS, 32) and shift_ws.shape == (STEPS, 10, 2, 8)
    run = jax.jit(lambda s, *a: ada_norm_matmul_rope(*a, group=8, step=s, interpret=True))
    outs = []
    for s in range(STEPS):
        got = run(jnp.int32(s), x, gains, w, shift_ws, cos, sin)
        want = ada_norm_matmul_rope(x, gains[s], w, shift_ws[s], cos, sin, group=8, interpret=True)
        check(got, want, dtype, SAME_TOL)
        check(got, ada_norm_matmul_rope_reference(x, gains, w, shift_ws, cos, sin, group=8, step=s), dtype)
        outs.append(np.asarray(got, np.float32))
    assert rel_err(outs[0], outs[1]) > TOL[dtype], "the steps' tables differ: so must their outputs"


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_step_reads_its_table_row(dtype):
    (x, gains, w, shift_ws), _ = geglu_operands(5, 50, 32, 64, dtype, steps=STEPS)
    run = jax.jit(lambda s, *a: ada_norm_matmul_geglu(*a, step=s, interpret=True))
    outs = []
    for s in range(STEPS):
        got = run(jnp.int32(s), x, gains, w, shift_ws)
        want = ada_norm_matmul_geglu(x, gains[s], w, shift_ws[s], interpret=True)
        check(got, want, dtype, SAME_TOL)
        check(got, ada_norm_matmul_geglu_reference(x, gains, w, shift_ws, step=s), dtype)
        outs.append(np.asarray(got, np.float32))
    assert rel_err(outs[0], outs[2]) > TOL[dtype], "the steps' tables differ: so must their outputs"


# --- semantics: upstream's order of operations, written out here ----------------------------------------------------

SEMANTICS_TOL = {jnp.float32: 1e-5}
HIGHEST = lax.Precision.HIGHEST


def upstream_norm(x, gain, shift):
    """openpi's adaRMS: x * rsqrt(mean(x^2) + eps) * (1 + scale) + shift, float32 (gain = 1 + scale)."""
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * gain + shift


def upstream_rope(t, cos, sin):
    """Rotate-half RoPE over the last axis of t [M, ..., H]; cos / sin [M, H/2]."""
    lead = (t.shape[0],) + (1,) * (t.ndim - 2)
    cos, sin = cos.reshape(*lead, -1), sin.reshape(*lead, -1)
    t1, t2 = jnp.split(t, 2, axis=-1)
    return jnp.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], axis=-1)


@pytest.mark.parametrize("m,k,kh,group,h,bs", [
    pytest.param(50, 32, 1, 8, 16, None, id="tiny_expert"),
    pytest.param(37, 64, 2, 2, 64, SMALL_TILES, id="two_kv_heads_small_tiles"),
])
def test_rope_semantics_match_upstream(m, k, kh, group, h, bs):
    dtype = jnp.float32
    rng = np.random.default_rng(6)
    x, gain, shift = _x_gain_shift(rng, m, k, None)
    w_fused = jnp.asarray(rng.standard_normal((k, kh, group + 2, h)) / np.sqrt(k), dtype)  # [D, KH, G+2, H]
    cos, sin = rope_angles(rng.integers(0, 1000, size=m), h)

    y = jnp.einsum("md,dkgh->mkgh", upstream_norm(x, gain, shift), w_fused, precision=HIGHEST)
    q = upstream_rope(y[:, :, :group], cos, sin) * h**-0.5
    key = upstream_rope(y[:, :, group], cos, sin)
    value = y[:, :, group + 1]

    shift_w = jnp.einsum("d,dkgh->kgh", shift, w_fused, precision=HIGHEST).reshape(-1, 2, h // 2)
    out = ada_norm_matmul_rope(x, gain, w_fused.reshape(k, -1, 2, h // 2), shift_w, cos, sin, group=group,
                               block_sizes=bs, interpret=True)
    assert out.shape == (m, kh * (group + 2), 2, h // 2)
    out = out.reshape(m, kh, group + 2, h)
    for name, got, want in (("queries", out[:, :, :group], q), ("keys", out[:, :, group], key),
                            ("values", out[:, :, group + 1], value)):
        err = rel_err(got, want)
        assert err <= SEMANTICS_TOL[dtype], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("m,k,f,bs", [
    pytest.param(50, 32, 64, None, id="tiny_expert"),
    pytest.param(37, 64, 96, SMALL_TILES, id="small_tiles"),
])
def test_geglu_semantics_match_upstream(m, k, f, bs):
    dtype = jnp.float32
    rng = np.random.default_rng(7)
    x, gain, shift = _x_gain_shift(rng, m, k, None)
    w = jnp.asarray(rng.standard_normal((2, k, f)) / np.sqrt(k), dtype)

    hn = upstream_norm(x, gain, shift)
    gate = jnp.dot(hn, w[0], precision=HIGHEST)
    up = jnp.dot(hn, w[1], precision=HIGHEST)
    want = jax.nn.gelu(gate, approximate=True) * up

    shift_w = jnp.einsum("k,gkf->gf", shift, w, precision=HIGHEST)
    got = ada_norm_matmul_geglu(x, gain, w, shift_w, block_sizes=bs, interpret=True)
    assert got.shape == (m, f) and got.dtype == dtype
    err = rel_err(got, want)
    assert err <= SEMANTICS_TOL[dtype], f"relative error {err:.2e}"


# --- bad operands ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,kwargs,msg", [
    (lambda x, g, w, sw, c, s: (x, g, w[:, :, 0], sw, c, s), {}, "w must be"),
    (lambda x, g, w, sw, c, s: (x, g, w[:, :, :1], sw, c, s), {}, "w must be"),
    (lambda x, g, w, sw, c, s: (x, g[:-1], w, sw, c, s), {}, "gain must be"),
    (lambda x, g, w, sw, c, s: (x, g, w, sw[:, :1], c, s), {}, "shift_w must be"),
    (lambda x, g, w, sw, c, s: (x, g, w, sw[:-1], c, s), {}, "shift_w must be"),
    (lambda x, g, w, sw, c, s: (x, g, w, sw, c[:, :-1], s), {}, "cos and sin must be"),
    (lambda x, g, w, sw, c, s: (x, g, w, sw, c, s[:-1]), {}, "cos and sin must be"),
    (lambda x, g, w, sw, c, s: (x[:, :-1], g, w, sw, c, s), {}, "x's K"),
    (lambda x, g, w, sw, c, s: (x, g, w, sw, c, s), {"group": 2}, "P=10 heads must be a multiple of group"),
    (lambda x, g, w, sw, c, s: (x, g[None], w, sw, c, s), {"step": jnp.int32(0)}, "disagree"),
    (lambda x, g, w, sw, c, s: (x, g[None], w, sw[None], c, s), {"step": jnp.zeros(1, jnp.int32)}, "step must be"),
])
def test_rope_bad_operands_raise_clear_errors(bad, kwargs, msg):
    args, _ = rope_operands(8, 16, 32, 1, 8, 8, jnp.float32)
    kwargs = {"group": 8, **kwargs}
    with pytest.raises(ValueError, match=msg):
        ada_norm_matmul_rope(*bad(*args), **kwargs, interpret=True)


@pytest.mark.parametrize("bad,msg", [
    (lambda x, g, w, sw: (x, g, w[0], sw), "w must be"),
    (lambda x, g, w, sw: (x, g, jnp.concatenate([w, w]), sw), "w must be"),
    (lambda x, g, w, sw: (x, g[:-1], w, sw), "gain must be"),
    (lambda x, g, w, sw: (x, g, w, sw[:, :-1]), "shift_w must be"),
    (lambda x, g, w, sw: (x, g, w, sw[:1]), "shift_w must be"),
    (lambda x, g, w, sw: (x[:, :-1], g, w, sw), "x's K"),
])
def test_geglu_bad_operands_raise_clear_errors(bad, msg):
    args, _ = geglu_operands(9, 16, 32, 64, jnp.float32)
    with pytest.raises(ValueError, match=msg):
        ada_norm_matmul_geglu(*bad(*args), interpret=True)


def test_bad_block_sizes_raise_clear_errors():
    for name in ("block_m", "block_n", "block_k"):
        for v in (48, 8, 0):
            with pytest.raises(ValueError, match=f"{name} must be a power of two"):
                AdaNormMatmulBlockSizes(**{name: v})
    (x, gain, w, shift_w), _ = geglu_operands(10, 16, 32, 48, jnp.float32)
    with pytest.raises(ValueError, match="multiple of block_n"):
        ada_norm_matmul_geglu(x, gain, w, shift_w, block_sizes=AdaNormMatmulBlockSizes(block_n=32), interpret=True)


def test_concrete_step_outside_the_tables_is_rejected():
    rng = np.random.default_rng(3)
    k, f = 32, 64
    x = jnp.asarray(rng.standard_normal((16, k)), jnp.float32)
    gain = jnp.ones((3, k), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, k, f)), jnp.float32)
    shift_w = jnp.zeros((3, 2, f), jnp.float32)
    for step in (3, -1):
        with pytest.raises(ValueError, match="step"):
            ada_norm_matmul_geglu(x, gain, w, shift_w, step=step, interpret=True)

"""pallas_kernels/matmul_gated_residual.py (residual + gate * (a @ w), float32 residual stream), interpret mode on the
CPU.

- parity with `matmul_gated_residual_reference` for float32 and bfloat16 weights, one K split (the program writes
  residual + update) and four (atomic adds into the aliased residual): the tiny config's expert, M > 64 not a
  multiple of 16, small tiles, and the real action expert projections at M=50 (attention out K=2048 -> N=1024,
  MLP down K=4096 -> N=1024; bf16 only);
- the per-step gate table: `step` as a traced int32 inside jit reads row `step`;
- inside jit: a chain of two calls whose residual is not used afterwards (the buffer is written in place), and a
  residual that IS used afterwards (it must come out unchanged); an eager call leaves the caller's residual as is;
- bad operands raise ValueErrors that name the argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.matmul_gated_residual import (
    GatedResidualBlockSizes,
    matmul_gated_residual,
    matmul_gated_residual_reference,
)

# Relative (Frobenius) error of the float32 output, keyed by the weights' dtype (the dot's input dtype). Both sides
# cast `a` to w's dtype and accumulate in float32, so only the accumulation order (and, with K splits, the order of
# the atomic adds) differs.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# Two calls of the kernel that must compute the same thing (step from a table row vs the row passed alone).
SAME_TOL = {jnp.float32: 1e-6, jnp.bfloat16: 1e-6}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def operands(seed, m, k, n, dtype, steps=None):
    """(a [M, K] float32, w [K, N] ~ N(0, 1/K) in `dtype`, gate [N] or [steps, N] float32, residual [M, N] float32)."""
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    lead = () if steps is None else (steps,)
    gate = jnp.asarray(rng.standard_normal((*lead, n)), jnp.float32)
    residual = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    return a, w, gate, residual


def check(got, want, dtype, tol=TOL):
    assert got.shape == want.shape and got.dtype == want.dtype == jnp.float32, (got.shape, got.dtype, want.shape)
    assert np.all(np.isfinite(np.asarray(got)))
    err = rel_err(got, want)
    assert err <= tol[dtype], f"relative error {err:.2e} > {tol[dtype]:.0e}"


DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]
SPLITS = [pytest.param(1, id="splits1"), pytest.param(4, id="splits4")]


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,tiles", [
    pytest.param(50, 64, 32, {}, id="tiny_expert_out"),
    pytest.param(50, 64, 32, dict(block_m=16, block_n=16, block_k=16), id="tiny_small_tiles"),
    pytest.param(100, 128, 64, {}, id="M100_two_row_blocks"),
])
def test_matches_reference(m, k, n, tiles, dtype, splits):
    args = operands(0, m, k, n, dtype)
    got = matmul_gated_residual(*args, block_sizes=GatedResidualBlockSizes(k_splits=splits, **tiles), interpret=True)
    check(got, matmul_gated_residual_reference(*args), dtype)


# The action expert's attention out (8 heads x 256 -> 1024) and MLP down (4096 -> 1024) at M = 50 tokens, default
# tiles, bf16 weights only (the model dtype), to keep interpret mode quick.
@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("m,k,n", [
    pytest.param(50, 2048, 1024, id="expert_out_proj_M50"),
    pytest.param(50, 4096, 1024, id="expert_down_M50"),
])
def test_real_shapes(m, k, n, splits):
    args = operands(1, m, k, n, jnp.bfloat16)
    got = matmul_gated_residual(*args, block_sizes=GatedResidualBlockSizes(k_splits=splits), interpret=True)
    check(got, matmul_gated_residual_reference(*args), jnp.bfloat16)


STEPS = 3


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_reads_its_gate_row(dtype, splits):
    a, w, gates, residual = operands(2, 50, 64, 32, dtype, steps=STEPS)
    bs = GatedResidualBlockSizes(k_splits=splits)
    run = jax.jit(lambda s, *args: matmul_gated_residual(*args, step=s, block_sizes=bs, interpret=True))
    outs = []
    for s in range(STEPS):
        got = run(jnp.int32(s), a, w, gates, residual)
        check(got, matmul_gated_residual(a, w, gates[s], residual, block_sizes=bs, interpret=True), dtype, SAME_TOL)
        check(got, matmul_gated_residual_reference(a, w, gates, residual, step=s), dtype)
        outs.append(np.asarray(got))
    assert rel_err(outs[0], outs[1]) > TOL[dtype], "the steps' gates differ: so must their outputs"


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_chained_in_jit_with_residual_consumed(dtype, splits):
    """An expert layer's two projections: x = x + g1 * (o @ w_o); x = x + g2 * (h @ w_down), the stream not reused."""
    o, w_o, g1, x0 = operands(3, 50, 64, 32, dtype)
    h, w_down, g2, _ = operands(4, 50, 128, 32, dtype)
    bs = GatedResidualBlockSizes(k_splits=splits)

    @jax.jit
    def layer(x, o, w_o, g1, h, w_down, g2):
        x = x * 2.0  # an intermediate: its buffer is free to be written in place
        x = matmul_gated_residual(o, w_o, g1, x, block_sizes=bs, interpret=True)
        return matmul_gated_residual(h, w_down, g2, x, block_sizes=bs, interpret=True)

    got = layer(x0, o, w_o, g1, h, w_down, g2)
    want = matmul_gated_residual_reference(h, w_down, g2, matmul_gated_residual_reference(o, w_o, g1, x0 * 2.0))
    check(got, want, dtype)


@pytest.mark.parametrize("splits", SPLITS)
def test_residual_used_afterwards_is_not_clobbered(splits):
    a, w, gate, x0 = operands(5, 50, 64, 32, jnp.float32)
    bs = GatedResidualBlockSizes(k_splits=splits)

    @jax.jit
    def f(x, a, w, gate):
        x = x + 1.0
        return matmul_gated_residual(a, w, gate, x, block_sizes=bs, interpret=True), x

    out, x = f(x0, a, w, gate)
    check(out, matmul_gated_residual_reference(a, w, gate, x0 + 1.0), jnp.float32)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(x0 + 1.0))

    before = np.asarray(x0).copy()
    out = matmul_gated_residual(a, w, gate, x0, block_sizes=bs, interpret=True)  # eager: the caller's x0 survives
    check(out, matmul_gated_residual_reference(a, w, gate, jnp.asarray(before)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(x0), before)


@pytest.mark.parametrize("bad,bs,msg", [
    (lambda a, w, g, r: (a, w, g, r.astype(jnp.bfloat16)), None, "residual must be float32"),
    (lambda a, w, g, r: (a, w, g, r[:-1]), None, "residual must be float32"),
    (lambda a, w, g, r: (a, w, g[:-1], r), None, "gate must be"),
    (lambda a, w, g, r: (a, w, g[None, :].repeat(2, 0), r), None, "gate must be"),
    (lambda a, w, g, r: (a[:, :-1], w, g, r), None, "a must be"),
    (lambda a, w, g, r: (a, w[None], g, r), None, "a must be"),
    (lambda a, w, g, r: (a[:, :72], w[:72], g, r), GatedResidualBlockSizes(k_splits=16), "k_splits=16"),
    (lambda a, w, g, r: (a, w, g, r), GatedResidualBlockSizes(k_splits=2, block_k=32), "block_k=32"),
    (lambda a, w, g, r: (a, w[:, :48], g[:48], r[:, :48]), GatedResidualBlockSizes(block_n=32), "block_n=32"),
])
def test_bad_operands_raise_clear_errors(bad, bs, msg):
    args = operands(6, 16, 96, 64, jnp.float32)
    with pytest.raises(ValueError, match=msg):
        matmul_gated_residual(*bad(*args), block_sizes=bs, interpret=True)


def test_bad_block_sizes_raise_clear_errors():
    for name in ("block_m", "block_n", "block_k"):
        with pytest.raises(ValueError, match=f"{name} must be a power of two"):
            GatedResidualBlockSizes(**{name: 48})
    for splits in (0, 3):
        with pytest.raises(ValueError, match="k_splits must be a power of two"):
            GatedResidualBlockSizes(k_splits=splits)

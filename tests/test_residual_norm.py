"""The expert's gated residual + adaRMS kernel (pallas_kernels.residual_norm) in Pallas interpret mode against its
plain-JAX reference and against upstream's own ops (pi05_jax.gemma.ada_rms_norm after `x + y * gate`), at the real
shapes (M = 50 action tokens, batch 2, D = 1024, the down projection's 8 splits and attention-out's 2) and the tiny
config's (D = 32), including a width that is not a power of two."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.residual_norm import (
    ResidualNormBlockSizes,
    gated_residual_norm,
    gated_residual_norm_reference,
)
from pi05_jax import gemma

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

# Kernel vs reference. float32: only the order of the split sum and of the row's sum of squares differ (a few ulp).
# bfloat16: the outputs are bf16; a value on a rounding boundary may round the other way (one bf16 ulp, 2**-8
# relative, of the residual or of the normalized value).
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2**-7, atol=2**-7)}
DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])


def _inputs(splits, m, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    parts = jnp.asarray(rng.standard_normal((splits, m, d)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((m, d)) * 3.0, dtype)
    gate, scale, shift = (jnp.asarray(rng.standard_normal((1, 1, d)) * 0.5, dtype) for _ in range(3))
    return parts, x, gate, scale, shift


def as_f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


def _close_in_bf16(got, want, dtype):
    """bf16: at most a tiny fraction of elements one rounding step apart; float32: all within TOL."""
    got, want = as_f32(got), as_f32(want)
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, **TOL[dtype])
        return
    far = ~np.isclose(got, want, **TOL[dtype])
    assert far.mean() < 1e-3, f"{far.sum()} of {far.size} elements beyond one bf16 rounding step"
    np.testing.assert_allclose(got, want, rtol=4 * 2**-8, atol=4 * 2**-8)


@DTYPES
@pytest.mark.parametrize("splits,m,d", [(8, 50, 1024), (2, 50, 1024), (8, 100, 1024), (4, 50, 32), (1, 7, 32),
                                        (2, 5, 48)],
                         ids=["down", "attn_out", "batch2", "tiny", "one_split_odd_rows", "width48"])
@pytest.mark.parametrize("block_m", [4, 16], ids=["m4", "m16"])
def test_kernel_matches_reference(splits, m, d, block_m, dtype):
    parts, x, gate, scale, shift = _inputs(splits, m, d, dtype)
    got = gated_residual_norm(parts, x, gate, scale, shift, block_sizes=ResidualNormBlockSizes(block_m=block_m),
                              interpret=True)
    want = gated_residual_norm_reference(parts, x, gate, scale, shift)
    for g, w in zip(got, want, strict=True):
        assert g.shape == (m, d) and g.dtype == dtype
        _close_in_bf16(g, w, dtype)


@DTYPES
def test_reference_is_upstreams_ops(dtype):
    """The reference is the expert layer's own ops: the projection rounded to the model dtype, x + y * gate, then
    gemma.ada_rms_norm (bit for bit)."""
    parts, x, gate, scale, shift = _inputs(8, 50, 1024, dtype, seed=1)
    y = parts.sum(0).astype(dtype)
    x_new = x[None] + y[None] * gate
    h = gemma.ada_rms_norm(x_new, scale, shift)
    got_x, got_h = gated_residual_norm_reference(parts, x, gate, scale, shift)
    np.testing.assert_array_equal(as_f32(got_x), as_f32(x_new[0]))
    np.testing.assert_array_equal(as_f32(got_h), as_f32(h[0]))


def test_the_gate_and_the_norm_act():
    """Changing the gate changes x_new; changing scale and shift changes h only (the test can fail both ways)."""
    parts, x, gate, scale, shift = _inputs(2, 16, 64, jnp.float32, seed=2)
    x1, h1 = gated_residual_norm(parts, x, gate, scale, shift, interpret=True)
    x2, _ = gated_residual_norm(parts, x, gate * 2, scale, shift, interpret=True)
    x3, h3 = gated_residual_norm(parts, x, gate, scale + 1, shift, interpret=True)
    assert not np.allclose(as_f32(x1), as_f32(x2))
    np.testing.assert_array_equal(as_f32(x1), as_f32(x3))
    assert not np.allclose(as_f32(h1), as_f32(h3))


def test_bad_inputs_name_the_shapes():
    parts, x, gate, scale, shift = _inputs(2, 16, 64, jnp.float32)
    with pytest.raises(ValueError, match=r"partials\.shape=\(2, 16, 64\), x\.shape=\(16, 32\)"):
        gated_residual_norm(parts, x[:, :32], gate, scale, shift)
    with pytest.raises(ValueError, match="float32"):
        gated_residual_norm(parts.astype(jnp.bfloat16), x, gate, scale, shift)
    with pytest.raises(ValueError, match=r"scale must hold one value per column \(D=64\)"):
        gated_residual_norm(parts, x, gate, scale[..., :8], shift)
    with pytest.raises(ValueError, match="share a dtype"):
        gated_residual_norm(parts, x, gate.astype(jnp.bfloat16), scale, shift)
    with pytest.raises(ValueError, match="block_m"):
        ResidualNormBlockSizes(block_m=3)

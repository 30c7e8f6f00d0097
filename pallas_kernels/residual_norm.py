"""The action expert's gated residual add and the next adaRMS norm in one kernel, on a projection's split-K partials.

Axis legend: S K splits of the producing matmul, M rows (tokens), D width.

In the expert layer, `x + proj(o) * gate` is followed by `ada_rms_norm(x, scale, shift)`. XLA runs them as two
kernels: the residual add (with the projection's split-K reduction folded in) and the norm (a row reduction over
the new x). It cannot make one fusion of two reductions over different axes. Here one program owns whole rows (all
D columns), so it sums the S partials of `pallas_kernels.skinny_matmul.skinny_matmul`, adds the gated result to the
residual and normalizes the new row, writing both the new residual stream and the normalized, modulated activation
the next matmul reads. Per expert layer-step that is two kernels fewer (after the attention-out and the down
projections).

Rounding follows upstream's ops in the model dtype (x's dtype): the projection's sum is rounded to it, the product
with the gate is rounded, the residual sum is rounded; the norm's statistics and modulation are float32
(`pi05_jax.gemma.ada_rms_norm`: (1 + scale) in scale's dtype, output rounded to x's dtype). On the CPU the kernel
runs in Pallas interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels._tiles import pow2_at_least

RMS_EPS = 1e-6  # Gemma's RMSNorm epsilon (pi05_jax.gemma.RMS_EPS)


@dataclasses.dataclass(frozen=True)
class ResidualNormBlockSizes:
    """block_m rows per program (a power of two; each program holds [block_m, D] float32 in registers; one row per
    program was the fastest of 1 / 4 / 8 in the sampler on the H200, docs/PERF.md); num_warps / num_stages: Triton
    launch parameters."""

    block_m: int = 1
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if self.block_m < 1 or self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m must be a power of two >= 1, got {self.block_m=}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"need num_warps, num_stages >= 1; got {self.num_warps=}, {self.num_stages=}")


def _round(v, dtype):
    return v.astype(dtype).astype(jnp.float32)


def _kernel(parts_ref, x_ref, gate_ref, scale_ref, shift_ref, x_out_ref, h_out_ref, *, m, d, bm, dp, splits, dtype,
            mod_dtype):
    row_start = pl.program_id(0) * bm
    row_ok = (row_start + jnp.arange(bm) < m)[:, None]
    col_ok = (jnp.arange(dp) < d)[None, :]
    mask = row_ok & col_ok
    rows, cols = pl.ds(row_start, bm), pl.ds(0, dp)

    def vector(ref):  # a [D] modulation row as [1, Dp] float32
        return plgpu_triton.load(ref.at[cols], mask=col_ok[0], other=0.0).astype(jnp.float32)[None, :]

    y = jnp.zeros((bm, dp), jnp.float32)
    for s in range(splits):  # the splits in order, as a sequential sum
        part = plgpu_triton.load(parts_ref.at[pl.ds(s, 1), rows, cols], mask=mask[None], other=0.0)
        y = y + jnp.sum(part, axis=0)
    gated = _round(_round(y, dtype) * vector(gate_ref), dtype)
    x = plgpu_triton.load(x_ref.at[rows, cols], mask=mask, other=0.0).astype(jnp.float32)
    x_new = _round(x + gated, dtype)  # padded columns stay 0 and add nothing to the sum of squares
    var = jnp.sum(x_new * x_new, axis=1, keepdims=True) / jnp.float32(d)  # jnp.mean's sum, then divide
    normed = x_new * (1.0 / jnp.sqrt(var + jnp.float32(RMS_EPS)))
    gain = _round(1.0 + vector(scale_ref), mod_dtype)  # upstream's (1 + scale) in the modulation's dtype
    h = normed * gain + vector(shift_ref)
    plgpu_triton.store(x_out_ref.at[rows, cols], x_new.astype(x_out_ref.dtype), mask=mask)
    plgpu_triton.store(h_out_ref.at[rows, cols], h.astype(h_out_ref.dtype), mask=mask)


def _check(partials, x, gate, scale, shift):
    if partials.ndim != 3 or x.ndim != 2 or partials.shape[1:] != x.shape:
        raise ValueError(f"partials must be [S, M, D] and x [M, D] with the same M, D; got {partials.shape=}, "
                         f"{x.shape=}")
    if partials.dtype != jnp.float32:
        raise ValueError(f"partials must be float32 (a split-K matmul's sums); got {partials.dtype=}")
    d = x.shape[1]
    for name, v in (("gate", gate), ("scale", scale), ("shift", shift)):
        if v.size != d:
            raise ValueError(f"{name} must hold one value per column (D={d}); got {name}.shape={v.shape}")
    if len({gate.dtype, scale.dtype, shift.dtype}) != 1:
        raise ValueError(f"gate, scale and shift must share a dtype; got {gate.dtype=}, {scale.dtype=}, "
                         f"{shift.dtype=}")


def gated_residual_norm(partials: jax.Array, x: jax.Array, gate: jax.Array, scale: jax.Array, shift: jax.Array, *,
                        block_sizes: ResidualNormBlockSizes | None = None,
                        interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """(x_new, h) with x_new = x + round(sum_s partials[s]) * gate and h = ada_rms_norm(x_new, scale, shift).

    partials [S, M, D] float32 (the producing matmul's K splits), x [M, D] (the residual stream, the model dtype),
    gate / scale / shift one value per column (any shape of D elements). Both outputs are [M, D] in x's dtype."""
    _check(partials, x, gate, scale, shift)
    splits, m, d = partials.shape
    bs = block_sizes or ResidualNormBlockSizes()
    bm = min(bs.block_m, pow2_at_least(m, 1))
    dp = pow2_at_least(d, 16)
    kernel = functools.partial(_kernel, m=m, d=d, bm=bm, dp=dp, splits=splits, dtype=x.dtype, mod_dtype=gate.dtype)
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # whole arrays; rows masked in-kernel
    out = jax.ShapeDtypeStruct((m, d), x.dtype)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, bm),),
        in_specs=[whole(partials.shape), whole(x.shape), whole((d,)), whole((d,)), whole((d,))],
        out_specs=[whole((m, d)), whole((m, d))],
        out_shape=[out, out],
        compiler_params=plgpu_triton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=resolve_interpret(interpret),
        name="gated_residual_norm",
    )(partials, x, gate.reshape(d), scale.reshape(d), shift.reshape(d))


def gated_residual_norm_reference(partials: jax.Array, x: jax.Array, gate: jax.Array, scale: jax.Array,
                                  shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`gated_residual_norm` in plain JAX, written as upstream's ops: the projection (partials summed, rounded to
    x's dtype), `x + y * gate`, then adaRMS (float32 statistics, (1 + scale), + shift, rounded to x's dtype)."""
    _check(partials, x, gate, scale, shift)
    d = x.shape[1]
    y = partials.sum(0).astype(x.dtype)
    x_new = x + y * gate.reshape(d)
    x32 = x_new.astype(jnp.float32)
    normed = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + RMS_EPS))
    h = (normed * (1 + scale.reshape(d)) + shift.reshape(d)).astype(x.dtype)
    return x_new, h

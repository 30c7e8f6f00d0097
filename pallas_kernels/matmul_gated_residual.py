"""Gated residual GEMM for the action expert: out = residual + gate * (a @ W), the residual stream in float32.

Axis legend: M rows (tokens, padded), K contracted, N output columns (the width D), S splits of K.

The expert's attention-out and MLP-down projections both end in `x + (a @ W) * gate` (adaRMS's gate, a per-step
constant vector). Fusing the gate and the residual add into the GEMM's epilogue removes an elementwise kernel and
a round trip of the activations per projection. N = 1024 gives few column blocks at M = 50, so K is split across
programs (`k_splits`); with splits each program adds `gate * partial` into the output with float32 atomics, the
output buffer being the residual itself (aliased: no zero-initialized buffer, no reduction kernel). With one split
the program reads its residual block and writes the sum. The residual stream is therefore float32 (upstream keeps
it in the model dtype: rounding-level differences in bfloat16, the same math in float32); the order of the atomic
float additions, hence the last bits, may vary run to run.

float32 accumulation; float32 inputs use exact (non-TF32) dots. On the CPU the kernel runs in Pallas interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels._tiles import check_pow2_fields, pow2_at_least, triton_params
from pallas_kernels.ada_norm_matmul import per_step_tables
from pallas_kernels.ragged_prefill_attention import dot_precision


@dataclasses.dataclass(frozen=True)
class GatedResidualBlockSizes:
    """Tile sizes (powers of two for the Triton lowering; block_m and block_n are clamped to the problem)."""

    block_m: int = 64  # rows per program (M = 50 pads to one 64-row block)
    block_n: int = 32  # output columns per program
    block_k: int = 128  # contracted elements per inner step
    k_splits: int = 4  # programs along K (atomic float32 adds into the residual when > 1)
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        check_pow2_fields(self, ("block_m", "block_n", "block_k"))
        if self.k_splits < 1 or self.k_splits & (self.k_splits - 1):
            raise ValueError(f"k_splits must be a power of two >= 1, got k_splits={self.k_splits}")


def _kernel(step_ref, a_ref, w_ref, gate_ref, res_ref, o_ref, *, bk, k_steps, dtype, atomic):
    bm, bn = o_ref.shape
    precision = dot_precision(dtype)

    def k_step(i, acc):
        cols = pl.ds(pl.multiple_of(i * bk, bk), bk)
        return acc + jnp.dot(a_ref[:, cols].astype(dtype), w_ref[cols, :].astype(dtype),
                             preferred_element_type=jnp.float32, precision=precision)

    acc = lax.fori_loop(0, k_steps, k_step, jnp.zeros((bm, bn), jnp.float32))
    update = acc * gate_ref[pl.ds(step_ref[()], 1), :]  # this Euler step's gate row
    if atomic:
        from jax.experimental.pallas import triton as pl_triton

        pl_triton.atomic_add(o_ref, (slice(None), slice(None)), update)
    else:
        o_ref[...] = res_ref[...] + update



def matmul_gated_residual(a, w, gate, residual, *, step=None, block_sizes: GatedResidualBlockSizes | None = None,
                          interpret: bool | None = None):
    """residual + gate * (a @ w): a [M, K], w [K, N], gate [N], residual [M, N] float32 -> [M, N] float32.

    The dot runs in w's dtype (a is cast to it) with float32 accumulation. With `step`, gate carries a leading
    steps axis and row `step` is used (`ada_norm_matmul.per_step_tables`). Inside a jit, stop using `residual`
    afterwards (or XLA copies it): the kernel writes into its buffer."""
    if a.ndim != 2 or w.ndim != 2 or a.shape[1] != w.shape[0]:
        raise ValueError(f"a must be [M, K] and w [K, N] with the same K, got {a.shape=} {w.shape=}")
    m, k = a.shape
    n = w.shape[1]
    step_idx, (gate,) = per_step_tables(step, gate)
    if gate.shape[1:] != (n,):
        raise ValueError(f"gate must be [N]={n} (per step: [steps, N]), got {gate.shape[1:]=} after the steps axis")
    if residual.shape != (m, n) or residual.dtype != jnp.float32:
        raise ValueError(f"residual must be float32 [M, N]={(m, n)}, got {residual.shape=} {residual.dtype=}")
    bs = block_sizes or GatedResidualBlockSizes()
    bm = min(bs.block_m, pow2_at_least(m, 16))
    bn = min(bs.block_n, n)
    if n % bn:
        raise ValueError(f"N={n} must be a multiple of block_n={bn}")
    splits = bs.k_splits
    if k % splits:
        raise ValueError(f"K={k} must split into k_splits={splits} equal parts")
    k_split = k // splits
    bk = min(bs.block_k, k_split)
    if k_split % bk:
        raise ValueError(f"K/k_splits={k_split} must be a multiple of block_k={bk}")
    m_pad = pl.cdiv(m, bm) * bm
    if m_pad != m:
        a = jnp.pad(a, ((0, m_pad - m), (0, 0)))
        residual = jnp.pad(residual, ((0, m_pad - m), (0, 0)))
    atomic = splits > 1
    kernel = functools.partial(_kernel, bk=bk, k_steps=k_split // bk, dtype=w.dtype, atomic=atomic)
    # Grid (M blocks, N blocks, K splits): the first axis varies fastest in the Triton lowering, so row blocks that
    # share a weight tile run side by side.
    out = pl.pallas_call(
        kernel,
        grid=(m_pad // bm, n // bn, splits),
        in_specs=[
            pl.BlockSpec((None,), lambda i, j, s: (0,)),
            pl.BlockSpec((bm, k_split), lambda i, j, s: (i, s)),
            pl.BlockSpec((k_split, bn), lambda i, j, s: (s, j)),
            pl.BlockSpec((gate.shape[0], bn), lambda i, j, s: (0, j)),
            pl.BlockSpec((bm, bn), lambda i, j, s: (i, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, s: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n), jnp.float32),
        input_output_aliases={4: 0},
        compiler_params=triton_params(bs),
        interpret=resolve_interpret(interpret),
        name="matmul_gated_residual",
    )(step_idx, a, w, gate.astype(jnp.float32), residual)
    return out[:m] if m_pad != m else out



def matmul_gated_residual_reference(a, w, gate, residual, *, step=None):
    """`matmul_gated_residual` in plain JAX: a cast to w's dtype, float32 HIGHEST dot."""
    if step is not None:
        gate = gate[step]
    y = jnp.dot(a.astype(w.dtype).astype(jnp.float32), w.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return residual + gate.astype(jnp.float32)[None, :] * y

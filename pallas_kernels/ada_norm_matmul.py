"""adaRMS normalization folded into the GEMM that consumes it, for the action expert's skinny matmuls (M = 50).

Axis legend: M rows (tokens, padded), K contracted (width D), N output columns, P column pairs (heads of a fused
QKV weight, or the gate/up halves of a GeGLU MLP), C half a head (H / 2), F mlp dim.

Upstream computes `h = ada_rms_norm(x, scale, shift)` (an elementwise kernel over the whole row) and then
`h @ W`. With r = rsqrt(mean(x^2) + eps) a per-row scalar and `shift` a per-step constant vector:

    (r * x * (1 + scale) + shift) @ W  ==  r * ((x * (1 + scale)) @ W) + shift @ W

so the kernel streams x once, accumulating sum(x^2) beside the dot products of its K loop, and applies r and the
per-step constant `shift_w = shift @ W` (precomputed once per checkpoint and num_steps, `pi05_jax.denoise_fused`)
in the epilogue. No separate normalization kernel, no normalized copy of x in memory. The one rounding that moves:
upstream rounds the normalized-and-shifted row to the model dtype before the matmul, the kernel rounds
x * (1 + scale) (same relative size of error; exact in float32).

Every program computes TWO column blocks of the same rows and combines them in its epilogue:
- `ada_norm_matmul_rope`: the two halves of one head of a fused QKV weight [K, P, 2, C] (pi05_jax.weight_packing's
  [D, KH, G+2, H] viewed with H split in halves): rotary embedding over the pair (rotate-half), times the query
  scale for query heads; value heads pass through. Output [M, P, 2, C] = [M, KH, G+2, H].
- `ada_norm_matmul_geglu`: the gate and up columns of openpi's `gating_einsum` [2, K, F]: gelu_tanh(gate) * up.
  Output [M, F].

The K loop runs in full inside a program (the row statistics need all of K), so the grid is (M blocks, column
blocks); 32-wide column blocks give the expert 80 (QKV) and 128 (GeGLU) programs at M = 50. float32 accumulation;
float32 inputs use exact (non-TF32) dots. On the CPU the kernel runs in Pallas interpret mode.
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
from pallas_kernels.ragged_prefill_attention import dot_precision

RMS_EPS = 1e-6  # Gemma's RMSNorm epsilon (pi05_jax.gemma.RMS_EPS)


@dataclasses.dataclass(frozen=True)
class AdaNormMatmulBlockSizes:
    """Tile sizes (powers of two for the Triton lowering; block_m and block_n are clamped to the problem)."""

    block_m: int = 64  # rows per program (M = 50 pads to one 64-row block)
    block_n: int = 32  # columns per program, in each of its two column blocks
    block_k: int = 128  # contracted elements per inner step
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        check_pow2_fields(self, ("block_m", "block_n", "block_k"))


def _gelu_tanh(x):
    """flax's nn.gelu(approximate=True) in float32 (pi05_jax.linear.gelu_tanh)."""
    return 0.5 * x * (1.0 + jnp.tanh(jnp.float32(0.7978845608028654) * (x + 0.044715 * (x * x * x))))


def _kernel(step_ref, x_ref, gain_ref, w0_ref, w1_ref, sw_ref, *rest, epilogue, width, bk, k_steps, dtype,
            pairs_per_head, cols_per_half, rope_heads, scaled_heads, q_scale):
    o_ref = rest[-1]
    bm = x_ref.shape[0]
    bn = w0_ref.shape[-1]
    precision = dot_precision(dtype)
    t = pl.ds(step_ref[()], 1)  # this Euler step's row of the per-step tables

    def k_step(i, carry):
        acc0, acc1, ssq = carry
        cols = pl.ds(pl.multiple_of(i * bk, bk), bk)
        xt = x_ref[:, cols].astype(jnp.float32)
        ssq = ssq + jnp.sum(xt * xt, axis=1)
        h = (xt * gain_ref[t, cols]).astype(dtype)
        acc0 += jnp.dot(h, w0_ref[cols, :].astype(dtype), preferred_element_type=jnp.float32, precision=precision)
        acc1 += jnp.dot(h, w1_ref[cols, :].astype(dtype), preferred_element_type=jnp.float32, precision=precision)
        return acc0, acc1, ssq

    zeros = jnp.zeros((bm, bn), jnp.float32)
    acc0, acc1, ssq = lax.fori_loop(0, k_steps, k_step, (zeros, zeros, jnp.zeros((bm,), jnp.float32)))
    r = lax.rsqrt(ssq * jnp.float32(1.0 / width) + jnp.float32(RMS_EPS))[:, None]
    y0 = acc0 * r + sw_ref[t, 0, :]
    y1 = acc1 * r + sw_ref[t, 1, :]
    if epilogue == "geglu":
        o_ref[...] = (_gelu_tanh(y0) * y1).astype(o_ref.dtype)
        return
    # rope: this program's pair is head p = program_id(1) // cols_per_half of the [P, 2, C] columns
    head = pl.program_id(1) // cols_per_half
    kind = head % pairs_per_head  # position within its KV group: queries < scaled_heads, then keys, then values
    cos, sin = rest[0][...], rest[1][...]
    rot = kind < rope_heads
    z0 = jnp.where(rot, y0 * cos - y1 * sin, y0)
    z1 = jnp.where(rot, y1 * cos + y0 * sin, y1)
    scale = jnp.where(kind < scaled_heads, jnp.float32(q_scale), jnp.float32(1.0))
    o_ref[:, 0, :] = (z0 * scale).astype(o_ref.dtype)
    o_ref[:, 1, :] = (z1 * scale).astype(o_ref.dtype)


def per_step_tables(step, *tables):
    """(step index as int32 [1], tables with a leading steps axis). `step=None`: the tables hold one step (no
    leading axis); one is added and the index is 0. Else `step` is an int32 scalar (traced or not) and the tables
    carry the steps axis first: the kernel reads row `step` itself, so a loop over steps slices nothing in XLA.
    A concrete step must lie in [0, steps); a traced one is the caller's responsibility (the fori_loop's index)."""
    if step is None:
        return jnp.zeros((1,), jnp.int32), [t[None] for t in tables]
    if jnp.ndim(step) != 0:
        raise ValueError(f"step must be a scalar, got shape {jnp.shape(step)}")
    steps = {t.shape[0] for t in tables}
    if len(steps) != 1:
        raise ValueError(f"per-step tables disagree on the number of steps: {[t.shape for t in tables]}")
    if not isinstance(step, jax.core.Tracer) and not 0 <= int(step) < steps.pop():
        raise ValueError(f"step={int(step)} is outside the tables' {tables[0].shape[0]} steps")
    # A traced step cannot be checked here, and the kernels read row `step` as given (lax.dynamic_index would clamp).
    return jnp.reshape(step, (1,)).astype(jnp.int32), list(tables)


def _tiles(m, k, cols, bs: AdaNormMatmulBlockSizes):
    bm = min(bs.block_m, pow2_at_least(m, 16))
    bn = min(bs.block_n, cols)
    bk = min(bs.block_k, k)
    if cols % bn:
        raise ValueError(f"the column count {cols} must be a multiple of block_n={bn}")
    if k % bk:
        raise ValueError(f"K={k} must be a multiple of block_k={bk}")
    return bm, bn, bk


def _check_x(x, k):
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got {x.shape=}")
    if x.shape[1] != k:
        raise ValueError(f"x's K must match the weight's: {x.shape=}, K={k}")


def _check_table(name, table, want):
    if tuple(table.shape[1:]) != tuple(want):
        raise ValueError(f"{name} must be [{', '.join(map(str, want))}] (per step: [steps, ...]), got "
                         f"{name}.shape={tuple(table.shape[1:])} after the steps axis")


def _call(step, x, gain, w, w_specs, sw, sw_spec, extra, extra_specs, out_shape, out_spec, grid, *, epilogue, bk,
          bs, interpret, **static):
    m, k = x.shape
    bm = out_spec.block_shape[0]
    m_pad = grid[0] * bm
    if m_pad != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
        extra = [jnp.pad(e, ((0, m_pad - m), (0, 0))) for e in extra]
    steps = gain.shape[0]  # Euler steps in the per-step tables
    kernel = functools.partial(_kernel, epilogue=epilogue, width=k, bk=bk, k_steps=k // bk, dtype=w.dtype, **static)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[pl.BlockSpec((None,), lambda i, j: (0,)), pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((steps, k), lambda i, j: (0, 0)), *w_specs, sw_spec, *extra_specs],
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((m_pad, *out_shape[1:]), w.dtype),
        compiler_params=triton_params(bs),
        interpret=resolve_interpret(interpret),
        name=f"ada_norm_matmul_{epilogue}",
    )(step, x, gain.astype(jnp.float32), w, w, sw.astype(jnp.float32), *extra)
    return out[:m] if m_pad != m else out


def ada_norm_matmul_rope(x, gain, w, shift_w, cos, sin, *, group: int, step=None,
                         block_sizes: AdaNormMatmulBlockSizes | None = None, interpret: bool | None = None):
    """q, k, v of a fused QKV weight with the adaRMS norm, RoPE and the query scale folded in.

    x [M, K] (float32 or the model dtype), gain [K] = 1 + scale, w [K, P, 2, C] (a fused [K, KH, G+2, H] QKV weight
    viewed with H = 2C split in halves; P = KH * (G + 2)), shift_w [P, 2, C] float32 = shift @ w, cos / sin [M, C]
    float32 of each row's rotary angles, `group` = G query heads per KV head. With `step`, gain and shift_w carry a
    leading steps axis and row `step` is used (`per_step_tables`). Returns [M, P, 2, C] in w's dtype: per KV head
    G RoPE'd queries times H^-0.5, one RoPE'd key, one value."""
    if w.ndim != 4 or w.shape[2] != 2:
        raise ValueError(f"w must be [K, P, 2, C], got {w.shape=}")
    k, p, _, c = w.shape
    _check_x(x, k)
    if p % (group + 2):
        raise ValueError(f"P={p} heads must be a multiple of group + 2 = {group + 2} (G queries, a key, a value)")
    step_idx, (gain, shift_w) = per_step_tables(step, gain, shift_w)
    _check_table("gain", gain, (k,))
    _check_table("shift_w", shift_w, (p, 2, c))
    m = x.shape[0]
    if cos.shape != (m, c) or sin.shape != (m, c):
        raise ValueError(f"cos and sin must be [M, C]={(m, c)}, got {cos.shape=} {sin.shape=}")
    bs = block_sizes or AdaNormMatmulBlockSizes()
    bm, bn, bk = _tiles(m, k, c, bs)
    per_half = c // bn

    def w_spec(half):
        return pl.BlockSpec((k, None, None, bn), lambda i, j: (0, j // per_half, half, j % per_half))

    return _call(
        step_idx, x, gain, w, [w_spec(0), w_spec(1)],
        shift_w, pl.BlockSpec((shift_w.shape[0], None, 2, bn), lambda i, j: (0, j // per_half, 0, j % per_half)),
        [cos.astype(jnp.float32), sin.astype(jnp.float32)],
        [pl.BlockSpec((bm, bn), lambda i, j: (i, j % per_half))] * 2,
        (m, p, 2, c), pl.BlockSpec((bm, None, 2, bn), lambda i, j: (i, j // per_half, 0, j % per_half)),
        (pl.cdiv(m, bm), p * per_half), epilogue="rope", bk=bk, bs=bs, interpret=interpret,
        pairs_per_head=group + 2, cols_per_half=per_half, rope_heads=group + 1, scaled_heads=group,
        q_scale=float(2 * c) ** -0.5)


def ada_norm_matmul_geglu(x, gain, w, shift_w, *, step=None, block_sizes: AdaNormMatmulBlockSizes | None = None,
                          interpret: bool | None = None):
    """gelu_tanh(h @ w[0]) * (h @ w[1]) for h the adaRMS-normalized x, the norm folded in.

    x [M, K], gain [K] = 1 + scale, w [2, K, F] (openpi's gating_einsum), shift_w [2, F] float32 = shift @ w; with
    `step`, gain and shift_w carry a leading steps axis (`per_step_tables`). Returns [M, F] in w's dtype."""
    if w.ndim != 3 or w.shape[0] != 2:
        raise ValueError(f"w must be [2, K, F], got {w.shape=}")
    _, k, f = w.shape
    _check_x(x, k)
    step_idx, (gain, shift_w) = per_step_tables(step, gain, shift_w)
    _check_table("gain", gain, (k,))
    _check_table("shift_w", shift_w, (2, f))
    bs = block_sizes or AdaNormMatmulBlockSizes()
    m = x.shape[0]
    bm, bn, bk = _tiles(m, k, f, bs)
    return _call(
        step_idx, x, gain, w, [pl.BlockSpec((None, k, bn), lambda i, j, g=g: (g, 0, j)) for g in (0, 1)],
        shift_w, pl.BlockSpec((shift_w.shape[0], 2, bn), lambda i, j: (0, 0, j)), [], [],
        (m, f), pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        (pl.cdiv(m, bm), f // bn), epilogue="geglu", bk=bk, bs=bs, interpret=interpret,
        pairs_per_head=1, cols_per_half=1, rope_heads=0, scaled_heads=0, q_scale=1.0)



# --- plain-JAX references (the same math, float32 HIGHEST dots) -----------------------------------------------------


def _reference_pair(x, gain, w0, w1, dtype):
    """(h @ w0, h @ w1) * r with h = x * gain rounded to `dtype`, r = rsqrt(mean(x^2) + eps); float32 HIGHEST."""
    xf = x.astype(jnp.float32)
    r = lax.rsqrt(jnp.mean(xf * xf, axis=-1) + RMS_EPS)
    h = (xf * gain.astype(jnp.float32)).astype(dtype).astype(jnp.float32)

    def dot(w):
        y = jnp.einsum("MK,K...->M...", h, w.astype(jnp.float32), precision=lax.Precision.HIGHEST)
        return y * r.reshape(-1, *([1] * (y.ndim - 1)))

    return dot(w0), dot(w1)


def ada_norm_matmul_rope_reference(x, gain, w, shift_w, cos, sin, *, group: int, step=None):
    """`ada_norm_matmul_rope` in plain JAX, float32 throughout, output in w's dtype."""
    if step is not None:
        gain, shift_w = gain[step], shift_w[step]
    y0, y1 = _reference_pair(x, gain, w[:, :, 0], w[:, :, 1], w.dtype)  # each [M, P, C]
    y0, y1 = y0 + shift_w[None, :, 0], y1 + shift_w[None, :, 1]
    p, c = w.shape[1], w.shape[3]
    kind = jnp.arange(p) % (group + 2)
    rot = (kind < group + 1)[None, :, None]
    cs, sn = cos[:, None, :], sin[:, None, :]
    z0 = jnp.where(rot, y0 * cs - y1 * sn, y0)
    z1 = jnp.where(rot, y1 * cs + y0 * sn, y1)
    scale = jnp.where(kind < group, float(2 * c) ** -0.5, 1.0)[None, :, None]
    return jnp.stack([z0 * scale, z1 * scale], axis=2).astype(w.dtype)


def ada_norm_matmul_geglu_reference(x, gain, w, shift_w, *, step=None):
    """`ada_norm_matmul_geglu` in plain JAX, float32 throughout, output in w's dtype."""
    if step is not None:
        gain, shift_w = gain[step], shift_w[step]
    g, u = _reference_pair(x, gain, w[0], w[1], w.dtype)
    return (_gelu_tanh(g + shift_w[0]) * (u + shift_w[1])).astype(w.dtype)

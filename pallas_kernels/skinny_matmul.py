"""Skinny matmuls for the action expert (M = 50 tokens) against weights stored transposed, [N, K] (K contiguous).

Axis legend: M rows (tokens), K contracted (width), N output columns, F mlp dim, S K splits.

At M = 50 the expert's four GEMMs per layer read 34.6 MB of weights for 0.1% of the tensor cores' work: they are
bound by how fast the programs stream weights, and XLA's GEMMs reach 1.0-1.5 TB/s there (docs/PERF.md). A weight
stored as openpi keeps it, [K, N], gives each program a [block_k, block_n] tile made of block_k row segments of
block_n * 2 bytes, each from another DRAM page. Stored transposed, [N, K], the block_n columns a program owns are
one contiguous slab (block_n * K * 2 bytes), streamed front to back over its K loop. (That is our reading of why the
GeGLU kernel below reaches 2.1 TB/s where XLA's GEMM on the [K, N] weight reaches 1.35; the layout was not isolated
as the only cause. The split-K projections on the same layout measured no faster than XLA's: docs/PERF.md.)

- `skinny_matmul(x, w_t, k_splits=S)`: x [M, K] @ w_t[N, K]^T as float32 partial sums [S, M, N], split S ways over
  K (S * N / block_n programs). The caller reduces the partials (XLA fuses that sum into the consumer, e.g. the
  gated residual add, exactly as it does with its own split-K GEMMs).
- `geglu_matmul(x, w_t)`: gelu_tanh(x @ w_t[0]^T) * (x @ w_t[1]^T) for openpi's gating_einsum stored as [2, F, K]
  (upstream's rounding: each product rounded to x's dtype before the GeGLU); no K split (the GeGLU needs whole
  sums), N / block_n programs.

Rows past M (the 64-row block over 50 tokens) are masked on load and store; no padded copies. More rows than
block_m (batches) add row blocks on a second grid axis, each streaming the weights again. float32 accumulation;
float32 inputs use exact (non-TF32) dots. On the CPU the kernels run in Pallas interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels._tiles import check_pow2_fields, pow2_at_least, triton_params
from pallas_kernels.ragged_prefill_attention import dot_precision

# Shared memory the pipelined K loop may take (num_stages copies of the x and w tiles); the H100/H200 allow 227 KiB
# per block. block_k halves until the tiles fit. Measured on the H200: the default tiles at M = 50 (3 stages x
# (64 + 2 x 32 rows) x 256 x 2 bytes = 192 KiB by this count) launch; at M = 100 (128-row blocks, 288 KiB by this
# count) Triton asked for 256 KiB and the launch failed.
SHARED_MEMORY_BUDGET = 200 * 1024


@dataclasses.dataclass(frozen=True)
class SkinnyBlockSizes:
    """Tiles (powers of two). block_m caps the rows per program (M = 50 is one 64-row block; more rows add programs
    along a second grid axis); block_k is clamped to the K each program sees and halved until num_stages copies of
    the tiles fit SHARED_MEMORY_BUDGET (batch 2's 128-row blocks and float32 inputs need smaller K steps)."""

    block_m: int = 128
    block_n: int = 32  # output columns per program: a contiguous [block_n, K] slab of w_t
    block_k: int = 256  # contracted elements per inner step
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        check_pow2_fields(self, ("block_m", "block_n", "block_k"))
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"need num_warps, num_stages >= 1; got {self.num_warps=}, {self.num_stages=}")


def gelu_tanh(x):
    """jax.nn.gelu(approximate=True) in float32, x * 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))); the
    Triton and the Mosaic GPU GeGLU kernels (pallas_kernels.pdl_matmul) share it."""
    return x * (0.5 * (1.0 + jnp.tanh(jnp.float32(0.7978845608028654) * (x + 0.044715 * (x * x * x)))))


def _accumulate(x_ref, w_refs, *, m, bm, bk, k_steps, k_start, precision):
    """sum over this program's K range of x[rows, k] @ w[:, k]^T for each w ref ([bn, K_range]), rows the block of
    grid axis 1; float32 [bm, bn] each, and the row-validity mask of the block."""
    row_start = pl.program_id(1) * bm
    row_ok = (row_start + jnp.arange(bm) < m)[:, None]
    rows = pl.ds(row_start, bm)

    def k_step(i, accs):
        local = pl.multiple_of(i * bk, bk)
        xt = plgpu_triton.load(x_ref.at[rows, pl.ds(k_start + local, bk)], mask=row_ok, other=0.0)
        return tuple(acc + plgpu_triton.dot(xt, w_ref[:, pl.ds(local, bk)], trans_b=True, precision=precision)
                     for acc, w_ref in zip(accs, w_refs, strict=True))

    zeros = jnp.zeros((bm, w_refs[0].shape[0]), jnp.float32)
    return lax.fori_loop(0, k_steps, k_step, tuple(zeros for _ in w_refs)), row_ok, rows


def _split_kernel(x_ref, w_ref, o_ref, *, m, bm, bk, k_steps, precision):
    k_start = pl.program_id(2) * (k_steps * bk)
    (acc,), row_ok, rows = _accumulate(x_ref, (w_ref,), m=m, bm=bm, bk=bk, k_steps=k_steps, k_start=k_start,
                                       precision=precision)
    plgpu_triton.store(o_ref.at[rows, :], acc, mask=row_ok)


def _geglu_kernel(x_ref, wg_ref, wu_ref, o_ref, *, m, bm, bk, k_steps, precision, dtype):
    (gate, up), row_ok, rows = _accumulate(x_ref, (wg_ref, wu_ref), m=m, bm=bm, bk=bk, k_steps=k_steps, k_start=0,
                                           precision=precision)
    gate = gate.astype(dtype).astype(jnp.float32)  # upstream rounds each einsum's output to the model dtype
    up = up.astype(dtype).astype(jnp.float32)
    plgpu_triton.store(o_ref.at[rows, :], (gelu_tanh(gate) * up).astype(o_ref.dtype), mask=row_ok)


def _check(x, w_t, name):
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K]; got {x.shape=}")
    if w_t.shape[-1] != x.shape[1]:
        raise ValueError(f"{name} is stored [..., N, K] and its K must match x's: {x.shape=}, {w_t.shape=}")
    if x.dtype != w_t.dtype:
        raise ValueError(f"x and {name} must share a dtype; got {x.dtype=}, {w_t.dtype=}")


def _tiles(m, k, n, bs: SkinnyBlockSizes, k_splits: int, *, weights: int, itemsize: int):
    """(block_m, block_n, block_k, K steps per program) for `weights` weight tiles per K step."""
    if k_splits < 1 or k % k_splits:
        raise ValueError(f"k_splits must divide K; got {k_splits=}, K={k}")
    bn = min(bs.block_n, n)
    while bn > 16 and n % bn:  # the largest power of two <= block_n that divides N (e.g. 32 for N = 160)
        bn //= 2
    if n % bn:
        raise ValueError(f"N={n} must be a multiple of block_n={bn}")
    bm = min(bs.block_m, pow2_at_least(m, 16))
    per_split = k // k_splits
    bk = min(bs.block_k, per_split)
    while bk > 16 and bs.num_stages * (bm + weights * bn) * bk * itemsize > SHARED_MEMORY_BUDGET:
        bk //= 2
    if per_split % bk or bk < 16:
        raise ValueError(f"each K split ({per_split}) must be a multiple of block_k={bk} (>= 16)")
    return bm, bn, bk, per_split // bk


def skinny_matmul(x: jax.Array, w_t: jax.Array, *, k_splits: int = 1, block_sizes: SkinnyBlockSizes | None = None,
                  interpret: bool | None = None) -> jax.Array:
    """x [M, K] @ w_t [N, K]^T as float32 partial sums [k_splits, M, N] (sum over axis 0 for the product)."""
    _check(x, w_t, "w_t")
    if w_t.ndim != 2:
        raise ValueError(f"w_t must be [N, K]; got {w_t.shape=}")
    m, k = x.shape
    n = w_t.shape[0]
    bs = block_sizes or SkinnyBlockSizes()
    bm, bn, bk, k_steps = _tiles(m, k, n, bs, k_splits, weights=1, itemsize=x.dtype.itemsize)
    kernel = functools.partial(_split_kernel, m=m, bm=bm, bk=bk, k_steps=k_steps, precision=dot_precision(x.dtype))
    return pl.pallas_call(
        kernel,
        grid=(n // bn, pl.cdiv(m, bm), k_splits),
        in_specs=[pl.BlockSpec((m, k), lambda j, i, s: (0, 0)),
                  pl.BlockSpec((bn, k // k_splits), lambda j, i, s: (j, s))],
        out_specs=pl.BlockSpec((None, m, bn), lambda j, i, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((k_splits, m, n), jnp.float32),
        compiler_params=triton_params(bs),
        interpret=resolve_interpret(interpret),
        name="skinny_matmul",
    )(x, w_t)


def skinny_matmul_reference(x: jax.Array, w_t: jax.Array, *, k_splits: int = 1) -> jax.Array:
    """`skinny_matmul` in plain JAX: the K splits' products in float32 (HIGHEST), [k_splits, M, N]."""
    _check(x, w_t, "w_t")
    m, k = x.shape
    xs = x.astype(jnp.float32).reshape(m, k_splits, k // k_splits)
    ws = w_t.astype(jnp.float32).reshape(w_t.shape[0], k_splits, k // k_splits)
    return jnp.einsum("MSK,NSK->SMN", xs, ws, precision=lax.Precision.HIGHEST)


def geglu_matmul(x: jax.Array, w_t: jax.Array, *, block_sizes: SkinnyBlockSizes | None = None,
                 interpret: bool | None = None) -> jax.Array:
    """gelu_tanh(x @ w_t[0]^T) * (x @ w_t[1]^T): x [M, K], w_t [2, F, K] (gating_einsum [2, K, F] transposed).
    Returns [M, F] in x's dtype."""
    _check(x, w_t, "w_t")
    if w_t.ndim != 3 or w_t.shape[0] != 2:
        raise ValueError(f"w_t must be [2, F, K] (gate, up); got {w_t.shape=}")
    m, k = x.shape
    f = w_t.shape[1]
    bs = block_sizes or SkinnyBlockSizes()
    bm, bn, bk, k_steps = _tiles(m, k, f, bs, 1, weights=2, itemsize=x.dtype.itemsize)
    kernel = functools.partial(_geglu_kernel, m=m, bm=bm, bk=bk, k_steps=k_steps, precision=dot_precision(x.dtype),
                               dtype=x.dtype)
    return pl.pallas_call(
        kernel,
        grid=(f // bn, pl.cdiv(m, bm)),
        in_specs=[pl.BlockSpec((m, k), lambda j, i: (0, 0)),
                  pl.BlockSpec((None, bn, k), lambda j, i: (0, j, 0)),
                  pl.BlockSpec((None, bn, k), lambda j, i: (1, j, 0))],
        out_specs=pl.BlockSpec((m, bn), lambda j, i: (0, j)),
        out_shape=jax.ShapeDtypeStruct((m, f), x.dtype),
        compiler_params=triton_params(bs),
        interpret=resolve_interpret(interpret),
        name="geglu_matmul",
    )(x, w_t, w_t)


def geglu_matmul_reference(x: jax.Array, w_t: jax.Array) -> jax.Array:
    """`geglu_matmul` in plain JAX: float32 (HIGHEST) products rounded to x's dtype, then the GeGLU in float32."""
    _check(x, w_t, "w_t")
    gate, up = (jnp.einsum("MK,FK->MF", x.astype(jnp.float32), w_t[i].astype(jnp.float32),
                           precision=lax.Precision.HIGHEST).astype(x.dtype).astype(jnp.float32) for i in (0, 1))
    return (gelu_tanh(gate) * up).astype(x.dtype)

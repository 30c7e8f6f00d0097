"""The action expert's gate/up matmul + GeGLU (M = 50 tokens) against its weight stored transposed, [2, F, K].

Axis legend: M rows (tokens), K contracted (width), F mlp dim (output columns).

At M = 50 the expert's GEMMs read their weights for 0.1% of the tensor cores' work: they are bound by how fast the
programs stream weights (docs/PERF.md has XLA's GEMMs' figures there). A weight stored as openpi keeps
it, [K, F], gives each program a [block_k, block_n] tile made of block_k row segments of block_n * 2 bytes, each from
another DRAM page. Stored transposed, [F, K], the block_n columns a program owns are one contiguous slab
(block_n * K * 2 bytes), streamed front to back over its K loop. (That is our reading of why this kernel streams
faster than XLA's GEMM on the [K, F] weight, docs/PERF.md session 3; the layout was not isolated as the only
cause.)

`geglu_matmul(x, w_t)`: gelu_tanh(x @ w_t[0]^T) * (x @ w_t[1]^T) for openpi's gating_einsum stored as [2, F, K]
(upstream's rounding: each product rounded to x's dtype before the GeGLU, which runs in float32); no K split (the
GeGLU needs whole sums), F / block_n programs.

Rows past M (the 64-row block over 50 tokens) are masked on load and store; no padded copies. More rows than
block_m (batches) add row blocks on a second grid axis, each streaming the weights again. float32 accumulation;
float32 inputs use exact (non-TF32) dots. On the CPU the kernel runs in Pallas interpret mode.
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
    """Tiles of `geglu_matmul` (powers of two). block_m caps the rows per program (M = 50 is one 64-row block; more
    rows add programs along a second grid axis); block_k is clamped to K and halved until num_stages copies of the
    tiles fit SHARED_MEMORY_BUDGET (batch 2's 128-row blocks and float32 inputs need smaller K steps)."""

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
    """jax.nn.gelu(approximate=True) in float32, x * 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))."""
    return x * (0.5 * (1.0 + jnp.tanh(jnp.float32(0.7978845608028654) * (x + 0.044715 * (x * x * x)))))


def _accumulate(x_ref, w_refs, *, m, bm, bk, k_steps, precision):
    """sum over K of x[rows, k] @ w[:, k]^T for each w ref ([bn, K]), rows the block of grid axis 1; float32
    [bm, bn] each, and the row-validity mask of the block."""
    row_start = pl.program_id(1) * bm
    row_ok = (row_start + jnp.arange(bm) < m)[:, None]
    rows = pl.ds(row_start, bm)

    def k_step(i, accs):
        local = pl.multiple_of(i * bk, bk)
        xt = plgpu_triton.load(x_ref.at[rows, pl.ds(local, bk)], mask=row_ok, other=0.0)
        return tuple(acc + plgpu_triton.dot(xt, w_ref[:, pl.ds(local, bk)], trans_b=True, precision=precision)
                     for acc, w_ref in zip(accs, w_refs, strict=True))

    zeros = jnp.zeros((bm, w_refs[0].shape[0]), jnp.float32)
    return lax.fori_loop(0, k_steps, k_step, tuple(zeros for _ in w_refs)), row_ok, rows


def _geglu_kernel(x_ref, wg_ref, wu_ref, o_ref, *, m, bm, bk, k_steps, precision, dtype):
    (gate, up), row_ok, rows = _accumulate(x_ref, (wg_ref, wu_ref), m=m, bm=bm, bk=bk, k_steps=k_steps,
                                           precision=precision)
    gate = gate.astype(dtype).astype(jnp.float32)  # upstream rounds each einsum's output to the model dtype
    up = up.astype(dtype).astype(jnp.float32)
    plgpu_triton.store(o_ref.at[rows, :], (gelu_tanh(gate) * up).astype(o_ref.dtype), mask=row_ok)


def _check(x, w_t):
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K]; got {x.shape=}")
    if w_t.ndim != 3 or w_t.shape[0] != 2 or w_t.shape[2] != x.shape[1]:
        raise ValueError(f"w_t must be [2, F, K] (gate, up; K as x's); got {x.shape=}, {w_t.shape=}")
    if x.dtype != w_t.dtype:
        raise ValueError(f"x and w_t must share a dtype; got {x.dtype=}, {w_t.dtype=}")


def _tiles(m, k, f, bs: SkinnyBlockSizes, *, itemsize: int):
    """(block_m, block_n, block_k, K steps per program) for the x tile and the two weight tiles of a K step."""
    bn = min(bs.block_n, f)
    while bn > 16 and f % bn:  # the largest power of two <= block_n that divides F (e.g. 32 for F = 160)
        bn //= 2
    if f % bn:
        raise ValueError(f"F={f} must be a multiple of block_n={bn}")
    bm = min(bs.block_m, pow2_at_least(m, 16))
    bk = min(bs.block_k, k)
    while bk > 16 and bs.num_stages * (bm + 2 * bn) * bk * itemsize > SHARED_MEMORY_BUDGET:
        bk //= 2
    if k % bk or bk < 16:
        raise ValueError(f"K={k} must be a multiple of block_k={bk} (>= 16)")
    return bm, bn, bk, k // bk


def geglu_matmul(x: jax.Array, w_t: jax.Array, *, block_sizes: SkinnyBlockSizes | None = None,
                 interpret: bool | None = None) -> jax.Array:
    """gelu_tanh(x @ w_t[0]^T) * (x @ w_t[1]^T): x [M, K], w_t [2, F, K] (gating_einsum [2, K, F] transposed).
    Returns [M, F] in x's dtype."""
    _check(x, w_t)
    m, k = x.shape
    f = w_t.shape[1]
    bs = block_sizes or SkinnyBlockSizes()
    bm, bn, bk, k_steps = _tiles(m, k, f, bs, itemsize=x.dtype.itemsize)
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
    _check(x, w_t)
    gate, up = (jnp.einsum("MK,FK->MF", x.astype(jnp.float32), w_t[i].astype(jnp.float32),
                           precision=lax.Precision.HIGHEST).astype(x.dtype).astype(jnp.float32) for i in (0, 1))
    return (gelu_tanh(gate) * up).astype(x.dtype)


def main():
    """Micro-benchmark on a GPU (`python -m pallas_kernels.skinny_matmul`): `geglu_matmul` at the action expert's
    shapes (M = 50 tokens, width 1024, mlp 4096, bf16) on the transposed [2, F, K] weight against XLA's einsum and
    GeGLU on openpi's [2, K, F] one. 18 layers chained in one jit, each with its own weight (so weights stream from
    HBM, as in the model) and its input nudged by the previous output; median of interleaved calls after warm-up,
    per layer, with the weight bandwidth it implies."""
    import sys
    import time

    import numpy as np

    if jax.default_backend() != "gpu":
        sys.exit("pallas_kernels.skinny_matmul main(): a GPU micro-benchmark; JAX sees no GPU")
    layers, m, d, f, repeats = 18, 50, 1024, 4096, 30
    keys = jax.random.split(jax.random.key(0), layers + 1)
    ws = [(jax.random.normal(k, (2, d, f), jnp.float32) * d**-0.5).astype(jnp.bfloat16) for k in keys[1:]]
    x = jax.random.normal(keys[0], (m, d), jnp.float32).astype(jnp.bfloat16)

    def xla_geglu(x, w):
        gate, up = jnp.einsum("MK,CKF->CMF", x, w)
        return (gelu_tanh(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype)

    def chain(op):
        def run(x, weights):
            for w in weights:
                x = (x.astype(jnp.float32) + 1e-2 * op(x, w)[:, :d].astype(jnp.float32)).astype(x.dtype)
            return x
        return jax.jit(run)

    fns = {"XLA einsum + GeGLU, [2, K, F]": (chain(xla_geglu), ws),
           "Pallas geglu_matmul, [2, F, K]": (chain(functools.partial(geglu_matmul, interpret=False)),
                                              [jnp.swapaxes(w, 1, 2) for w in ws])}
    outs = {name: np.asarray(jax.block_until_ready(fn(x, w)), np.float64) for name, (fn, w) in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(3 + repeats):
        for name, (fn, w) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, w))
            times[name].append(time.perf_counter() - t0)
    ref = outs["XLA einsum + GeGLU, [2, K, F]"]
    print(f"{jax.devices()[0].device_kind}: gate/up + GeGLU, M={m} K={d} F={f}, bf16, {layers} layers chained")
    for name in fns:
        per_layer = float(np.median(times[name][3:])) / layers
        err = np.linalg.norm(outs[name] - ref) / np.linalg.norm(ref)
        print(f"  {name:32s} {per_layer * 1e6:7.2f} us per layer  {2 * d * f * 2 / per_layer / 1e9:6.0f} GB/s of "
              f"weights  rel err vs XLA {err:.1e}")


if __name__ == "__main__":
    main()

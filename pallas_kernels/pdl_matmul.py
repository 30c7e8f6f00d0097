"""Skinny matmuls that load their weights before waiting for their input (Hopper Programmatic Dependent Launch).

Axis legend: M rows (tokens), K contracted (width), N output columns, F mlp dim, S K splits, G weight groups (1, or
2 for the GeGLU's gate and up).

The action expert's GEMMs (M = 50) are latency-bound, not bandwidth-bound: each reads 4-17 MB of weights in
4-8 us where the bytes alone need 1-3.5 us (docs/PERF.md), and each waits for the kernel before it to finish before
its first weight byte leaves DRAM. The weights do not depend on that kernel. With PDL (sm_90+) a kernel may be
launched while its predecessor still runs: these kernels issue every TMA copy of their weight slab into shared
memory first, then `griddepcontrol.wait` (which returns once the predecessor has finished and its writes are
visible), then stream x through a TMA pipeline into wgmma. They also call `griddepcontrol.launch_dependents` at
their start, so the kernel after them may start its own prologue early; that kernel still waits for this one's
completion before reading anything this one writes (PTX ISA: griddepcontrol.wait waits for the prerequisite grids
to complete and their memory to be flushed), so correctness never depends on the overlap.

The contract that makes the early weight reads safe: **w must be a buffer nothing in the same executable writes**
(a parameter of the jit, e.g. a weight packed once at load). A weight computed inside the jit (a cast, a transpose)
may still be in flight in an earlier kernel when these read it; with `pdl=False` the kernels have no such contract.

Each program owns an output tile of block_n columns and one K split; its whole weight slab ([block_n, K / S] per
group) sits in shared memory, so the grid is sized to one wave at the expert's shapes (QKV 1024 x 2560: 40 x 4
programs of 32 KiB; attention out 2048 x 1024 and down 4096 x 1024: 16 x 8 programs of 32 / 64 KiB; gate/up
1024 x 2 x 4096: 128 programs of 128 KiB).

Weights are stored transposed, [N, K] (K contiguous), as `pi05_jax.weight_packing` already stores them for the
Triton skinny kernels: a program's slab is block_n contiguous rows, and the wgmma B operand is K-major with a
128-byte swizzle at any block_n. (openpi's [K, N] layout as an N-major B operand lowered only for block_n >= 64 in
jax 0.11.2's Mosaic layout inference, which the GeGLU's shared memory cannot afford.)

- `pdl_matmul(x, w_t, k_splits=S)`: x [M, K] @ w_t [N, K]^T as float32 partial sums [S, M, N]; the caller sums the
  splits (XLA fuses the sum into the consumer, as with its own split-K GEMMs).
- `pdl_geglu_matmul(x, w_t)`: gelu_tanh(x @ w_t[0]^T) * (x @ w_t[1]^T) for the gating weight stored [2, F, K]; no K
  split (the GeGLU needs whole sums); [M, F] in x's dtype, each product rounded to x's dtype first (upstream's
  rounding).

Rows are padded to the 64-row wgmma tile by the wrapper (zeros) and sliced off after. bfloat16 operands, float32
accumulation. On the CPU the kernels run in Mosaic GPU interpret mode, where the two griddepcontrol instructions
(scheduling hints without a CPU meaning) are left out; everything else is the kernel the GPU runs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels.skinny_matmul import gelu_tanh

_WGMMA_M = 64  # Hopper wgmma's M per warpgroup instruction
# Shared memory one program may take (the H100/H200 allow 227 KiB per block): the weight slab, the x pipeline's
# buffers and the output tile. Tiles that do not fit are rejected with the figure, not shrunk silently.
SHARED_MEMORY_BUDGET = 220 * 1024


@dataclasses.dataclass(frozen=True)
class PdlMatmulBlockSizes:
    """Tiles. block_n: output columns per program (16, 32, 64 or a multiple of 64); block_k: contracted elements
    per wgmma step (64: one 128-byte swizzle row of bfloat16 x and of the weight tile); k_splits:
    programs sharing one output tile along K; max_concurrent_steps: x tiles in flight after the wait (capped at the
    program's K steps; each round trip to L2 is latency the program waits out, each buffer 8 KiB); pdl: issue the
    griddepcontrol instructions (False: the same kernel without them, to measure what they buy)."""

    block_n: int = 64
    block_k: int = 64
    k_splits: int = 1
    max_concurrent_steps: int = 2
    pdl: bool = True

    def __post_init__(self):
        if self.block_n not in (16, 32) and self.block_n % 64:
            raise ValueError(f"block_n must be 16, 32 or a multiple of 64, got {self.block_n=}")
        if self.block_n > 256:
            raise ValueError(f"block_n must be <= 256 (wgmma N), got {self.block_n=}")
        if self.block_k not in (16, 32, 64):
            raise ValueError(f"block_k must be 16, 32 or 64 (a bfloat16 swizzle row), got {self.block_k=}")
        if self.k_splits < 1 or self.max_concurrent_steps < 2:
            raise ValueError(f"need k_splits >= 1 and max_concurrent_steps >= 2, got {self.k_splits=}, "
                             f"{self.max_concurrent_steps=}")


def _swizzle_transforms(minor_elems: int, itemsize: int):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    swizzle = min(128, minor_elems * itemsize)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def smem_bytes(k: int, bs: PdlMatmulBlockSizes, *, groups: int, itemsize: int, out_itemsize: int) -> int:
    """Shared memory of one program: weight slab + x pipeline buffers + output tile."""
    slab = groups * (k // bs.k_splits) * bs.block_n * itemsize
    k_steps = k // (bs.block_k * bs.k_splits)
    x_buffers = max(2, min(bs.max_concurrent_steps, k_steps)) * _WGMMA_M * bs.block_k * itemsize
    return slab + x_buffers + _WGMMA_M * bs.block_n * out_itemsize


def _check_tiles(k, n, bs: PdlMatmulBlockSizes, *, groups, itemsize, out_itemsize):
    if n % bs.block_n:
        raise ValueError(f"N must be a multiple of block_n: N={n}, {bs.block_n=}")
    if k % (bs.block_k * bs.k_splits):
        raise ValueError(f"K must be a multiple of block_k * k_splits: K={k}, {bs.block_k=}, {bs.k_splits=}")
    need = smem_bytes(k, bs, groups=groups, itemsize=itemsize, out_itemsize=out_itemsize)
    if need > SHARED_MEMORY_BUDGET:
        raise ValueError(f"tiles need {need} bytes of shared memory per program (budget {SHARED_MEMORY_BUDGET}): "
                         f"K={k}, N={n}, groups={groups}, {bs}; raise k_splits or lower block_n")


def _call(x, w, bs: PdlMatmulBlockSizes, *, geglu: bool, out_dtype, interpret: bool, name: str):
    """x [Mp, K] (Mp a multiple of 64), w [G, N, K] -> [S, Mp, N] float32 partials (geglu: [1, Mp, N] GeGLU in
    out_dtype)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m_pad, k = x.shape
    groups, n, _ = w.shape
    bn, bk, ks = bs.block_n, bs.block_k, bs.k_splits
    k_steps = k // (bk * ks)
    part_dtype = jnp.dtype(out_dtype) if geglu else jnp.dtype(jnp.float32)
    x_transforms = _swizzle_transforms(bk, x.dtype.itemsize)
    w_transforms = _swizzle_transforms(bk, w.dtype.itemsize)
    use_pdl = bs.pdl and not interpret

    def kernel(x_gmem, w_gmem, o_gmem, w_smem, o_smem, w_barriers):
        pid_n, pid_s, pid_m = lax.axis_index("n"), lax.axis_index("s"), lax.axis_index("m")
        if use_pdl:
            plgpu.griddepcontrol_launch_dependents()
        n_slice = pl.ds(pid_n * bn, bn)
        k_base = pid_s * (k_steps * bk)
        # 1. the weight slab: every copy in flight at once, before anything that depends on the previous kernel
        for g in range(groups):
            for t in range(k_steps):
                plgpu.copy_gmem_to_smem(w_gmem.at[g, n_slice, pl.ds(k_base + t * bk, bk)], w_smem.at[g, t],
                                        w_barriers.at[g * k_steps + t])
        # 2. x is the previous kernel's output
        if use_pdl:
            plgpu.griddepcontrol_wait()

        def accumulate(*acc_refs):
            def step(idx, x_smem):
                (t,) = idx
                for g in range(groups):
                    plgpu.barrier_wait(w_barriers.at[g * k_steps + t])
                    plgpu.wgmma(acc_refs[g], x_smem, w_smem.at[g, t].transpose((1, 0)))  # [64, bk] @ [bk, bn]
                plgpu.wgmma_wait(1)  # one step's wgmmas in flight (delay_release=1 keeps its x buffer alive)

            plgpu.emit_pipeline(
                step,
                grid=(k_steps,),
                in_specs=[plgpu.BlockSpec((_WGMMA_M, bk), lambda t: (pid_m, pid_s * k_steps + t),
                                          transforms=x_transforms, delay_release=1)],
                max_concurrent_steps=max(2, min(bs.max_concurrent_steps, k_steps)),
            )(x_gmem)
            plgpu.wgmma_wait(0)
            return tuple(a[...] for a in acc_refs)

        accs = pl.run_scoped(accumulate, *(plgpu.ACC((_WGMMA_M, bn), jnp.float32) for _ in range(groups)))
        if geglu:
            gate, up = (a.astype(out_dtype).astype(jnp.float32) for a in accs)  # upstream rounds each product
            y = gelu_tanh(gate) * up
        else:
            (y,) = accs
        o_smem[...] = y.astype(part_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pid_s, pl.ds(pid_m * _WGMMA_M, _WGMMA_M), n_slice])
        plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((ks, m_pad, n), part_dtype),
        scratch_types=dict(
            w_smem=plgpu.SMEM((groups, k_steps, bn, bk), w.dtype, transforms=w_transforms),
            o_smem=plgpu.SMEM((_WGMMA_M, bn), part_dtype),
            w_barriers=plgpu.Barrier(num_barriers=groups * k_steps),
        ),
        grid=(n // bn, ks, m_pad // _WGMMA_M),
        grid_names=("n", "s", "m"),
        kernel_name=name,
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    return call(x, w)


def _check(x, w, geglu: bool, what: str):
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K]; got {x.shape=}")
    if w.ndim != (3 if geglu else 2) or w.shape[-1] != x.shape[1] or (geglu and w.shape[0] != 2):
        raise ValueError(f"{what}; got {x.shape=}, {w.shape=}")
    if x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        raise ValueError(f"the PDL matmuls take bfloat16 x and w (wgmma operands); got {x.dtype=}, {w.dtype=}")


def _pad_rows(x):
    m = x.shape[0]
    m_pad = -(-m // _WGMMA_M) * _WGMMA_M
    return (x if m_pad == m else jnp.pad(x, ((0, m_pad - m), (0, 0)))), m


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _pdl_matmul(x, w, *, block_sizes, interpret):
    xp, m = _pad_rows(x)
    parts = _call(xp, w[None], block_sizes, geglu=False, out_dtype=jnp.float32, interpret=interpret,
                  name="pdl_matmul")
    return parts[:, :m]


def pdl_matmul(x: jax.Array, w: jax.Array, *, k_splits: int = 1, block_sizes: PdlMatmulBlockSizes | None = None,
               interpret: bool | None = None) -> jax.Array:
    """x [M, K] @ w [N, K]^T as float32 partial sums [k_splits, M, N] (sum over axis 0 for the product).
    block_sizes.k_splits is replaced by `k_splits`."""
    _check(x, w, False, "pdl_matmul wants x [M, K] and w [N, K] (stored transposed) with the same K")
    bs = dataclasses.replace(block_sizes or PdlMatmulBlockSizes(), k_splits=k_splits)
    k = x.shape[1]
    _check_tiles(k, w.shape[0], bs, groups=1, itemsize=2, out_itemsize=4)
    return _pdl_matmul(x, w, block_sizes=bs, interpret=resolve_interpret(interpret))


def pdl_matmul_reference(x: jax.Array, w: jax.Array, *, k_splits: int = 1) -> jax.Array:
    """`pdl_matmul` in plain JAX: each K split's product in float32 (HIGHEST), [k_splits, M, N]."""
    m, k = x.shape
    xs = x.astype(jnp.float32).reshape(m, k_splits, k // k_splits)
    ws = w.astype(jnp.float32).reshape(w.shape[0], k_splits, k // k_splits)
    return jnp.einsum("MSK,NSK->SMN", xs, ws, precision=lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "padded_rows"))
def _pdl_geglu_matmul(x, w, *, block_sizes, interpret, padded_rows):
    xp, m = _pad_rows(x)
    out = _call(xp, w, block_sizes, geglu=True, out_dtype=x.dtype, interpret=interpret, name="pdl_geglu_matmul")
    return out[0] if padded_rows else out[0, :m]


def pdl_geglu_matmul(x: jax.Array, w: jax.Array, *, block_sizes: PdlMatmulBlockSizes | None = None,
                     interpret: bool | None = None, padded_rows: bool = False) -> jax.Array:
    """gelu_tanh(x @ w[0]^T) * (x @ w[1]^T): x [M, K], w [2, F, K] (gating_einsum [2, K, F] stored transposed).
    [M, F] in x's dtype; with padded_rows, [M rounded up to 64, F] as the kernel wrote it, the rows past M exactly
    zero (x's padding rows are zeros and gelu(0) * 0 = 0), ready for another PDL matmul without a pad or a slice."""
    _check(x, w, True, "pdl_geglu_matmul wants x [M, K] and w [2, F, K] (gate, up; stored transposed), same K")
    bs = dataclasses.replace(block_sizes or PdlMatmulBlockSizes(block_n=32), k_splits=1)
    k = x.shape[1]
    _check_tiles(k, w.shape[1], bs, groups=2, itemsize=2, out_itemsize=2)
    return _pdl_geglu_matmul(x, w, block_sizes=bs, interpret=resolve_interpret(interpret), padded_rows=padded_rows)


def pdl_geglu_matmul_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """`pdl_geglu_matmul` in plain JAX: float32 (HIGHEST) products rounded to x's dtype, the GeGLU in float32."""
    gate, up = (jnp.einsum("MK,FK->MF", x.astype(jnp.float32), w[i].astype(jnp.float32),
                           precision=lax.Precision.HIGHEST).astype(x.dtype).astype(jnp.float32) for i in (0, 1))
    return (gelu_tanh(gate) * up).astype(x.dtype)


def runs_here() -> bool:
    """Whether these kernels run on this process's default backend: a Hopper GPU (sm_90: wgmma, TMA and
    griddepcontrol as written here; Blackwell, e.g. Jetson Thor, has other MMA instructions), or the CPU, where they
    run in interpret mode. Callers pick another kernel elsewhere."""
    backend = jax.default_backend()
    if backend == "cpu":
        return True
    capability = getattr(jax.devices(backend)[0], "compute_capability", None)
    return backend == "gpu" and capability is not None and str(capability).split(".")[0] == "9"


# x tiles in flight by default: all of a projection's K steps up to 4; 2 for the GeGLU, whose 128 KiB weight slab
# leaves room beside it for one program of the down projection that follows it (pi05_jax.expert_kernels).
DEFAULT_X_IN_FLIGHT = {1: 4, 2: 2}


def fit_block_sizes(k: int, n: int, *, k_splits: int, block_n: int, groups: int = 1, pdl: bool = True,
                    x_in_flight: int | None = None) -> PdlMatmulBlockSizes | None:
    """Tiles for a [M, K] x [G, N, K]^T problem near the requested (k_splits, block_n): block_n halves (down to 16)
    until it divides N, k_splits halves until each split is a whole number of 16-element steps, block_k is the
    largest of 64 / 32 / 16 dividing a split; x_in_flight (None: DEFAULT_X_IN_FLIGHT) is max_concurrent_steps.
    None when nothing fits (the caller runs another kernel instead)."""
    bn = block_n
    while bn > 16 and n % bn:
        bn //= 2
    splits = k_splits
    while splits > 1 and (k % splits or (k // splits) % 16):
        splits //= 2
    if n % bn or k % splits or (k // splits) % 16:
        return None
    per_split = k // splits
    bk = next(b for b in (64, 32, 16) if per_split % b == 0)
    in_flight = DEFAULT_X_IN_FLIGHT.get(groups, 2) if x_in_flight is None else x_in_flight
    bs = PdlMatmulBlockSizes(block_n=bn, block_k=bk, k_splits=splits, max_concurrent_steps=in_flight, pdl=pdl)
    out_itemsize = 2 if groups == 2 else 4
    if smem_bytes(k, bs, groups=groups, itemsize=2, out_itemsize=out_itemsize) > SHARED_MEMORY_BUDGET:
        return None
    return bs

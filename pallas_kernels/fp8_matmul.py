"""FP8 (e4m3) matmul with per-row and per-column scales: fp32 accumulation, scales applied in the epilogue.

    y[m, n] = (sum_k x_q[m, k] * w_q[n, k]) * x_scale[m] * w_scale[n]        (then cast to out_dtype)

Axis legend: M rows (activation tokens), N output channels, K contracted elements, S K-splits.
Operands: x_q e4m3 [M, K] row-major; w_q e4m3 [N, K] "K-major" (the layout FP8 wgmma and cuBLASLt's FP8 GEMM
need for the right-hand operand; `pi05_jax.quantized.fp8_weight.Fp8Weight` stores weights this way);
x_scale float32 [M] (one per token, or a scalar broadcast for a static per-tensor scale); w_scale float32 [N].

Three implementations of the same math, to time per shape class (this module's `main()`):
- `fp8_matmul(..., backend="mosaic")`: a Mosaic GPU kernel (the Hopper path): grid over (M, N, K-split) tiles,
  a TMA pipeline over K feeding wgmma with both e4m3 operands from swizzled SMEM (the weight tile transposed in
  SMEM so K is its fastest axis, as 8-bit wgmma requires), the fp32 accumulator scaled by the row and column
  scales in registers, stored through SMEM.
- `fp8_matmul(..., backend="triton")`: the same tiling as a `pallas_call` with the Triton lowering (fp8 tl.dot).
- `fp8_matmul_xla`: `lax.dot_general` on the e4m3 arrays with the output dtype as its result, which XLA lowers to
  cuBLASLt's FP8 GEMM (`__cublas$lt$matmul$f8`) on Hopper; the scales are an elementwise multiply after it, fused
  downstream.
- `fp8_matmul_reference`: dequantize to float32, then a float32 matmul (HIGHEST precision): the ground truth.
Both Pallas backends run on the CPU in interpret mode (chosen automatically when the default backend is the CPU).

K-splits: at the denoise shapes (M = 50) one CTA per output tile leaves most of the 132 SMs idle, so the K axis
may be split across CTAs: each writes scaled float32 partial sums [S, M, N], reduced (and cast) by XLA after.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._interpret import resolve_interpret

E4M3 = jnp.float8_e4m3fn
BACKENDS = ("mosaic", "triton")
_WGMMA_M = 64  # Hopper wgmma's fixed M per warpgroup instruction
_SWIZZLES = (128, 64, 32)  # bytes; for e4m3 the K tile equals the swizzle


@dataclasses.dataclass(frozen=True)
class Fp8MatmulBlockSizes:
    """Tile sizes. M is padded up to block_m; N must be a multiple of block_n and K of block_k * k_splits
    (`Fp8Weight` pads N and K of stored weights once, at load, so real weights always fit)."""

    block_m: int = 64  # rows per CTA (Mosaic: a multiple of 64, the wgmma M)
    block_n: int = 128  # output channels per CTA (Mosaic: a multiple of 8, at most 256)
    block_k: int = 128  # contracted elements per pipeline step (Mosaic: 32, 64 or 128 = the SMEM swizzle)
    k_splits: int = 1  # CTAs sharing one output tile along K (partial sums reduced after the kernel)
    max_concurrent_steps: int = 3  # Mosaic: TMA pipeline stages in flight
    num_warps: int = 4  # Triton
    num_stages: int = 3  # Triton

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "k_splits", "max_concurrent_steps", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# Hopper's FP8 wgmma accumulates in reduced precision (about 14 mantissa bits, not float32; DeepSeek-V3 technical
# report, section 3.3.2). Measured on the H200 (docs/PERF.md): one accumulator over K = 16384 (the prefix LLM's MLP
# down projection) gives 1.25e-2 max relative error against float32, over the 8e-3 the tests allow. The kernels add
# their K-split partials in float32, so the default tiles split K until one accumulator sums at most this many.
MAX_K_PER_ACCUMULATOR = 4096

# (m_bucket, n, k) -> block sizes measured best on a card (this module's `main()`); m_bucket = M padded to 64.
# Empty until the measurement fills it; `default_block_sizes` is the fallback.
TUNED: dict[tuple[int, int, int], Fp8MatmulBlockSizes] = {}


def _largest_divisor(n: int, candidates) -> int | None:
    return next((c for c in candidates if n % c == 0), None)


def default_block_sizes(m: int, n: int, k: int, *, num_sms: int = 132) -> Fp8MatmulBlockSizes:
    """Tiles for an [M, K] x [N, K]^T problem: 64-row tiles for small M (denoise, vision per view), 128 above;
    narrower N tiles and a K split when the output tiles alone would leave most SMs idle (memory-bound M = 50), and
    at least enough K splits that no accumulator sums more than MAX_K_PER_ACCUMULATOR products."""
    m_pad = -(-m // _WGMMA_M) * _WGMMA_M
    tuned = TUNED.get((m_pad, n, k))
    if tuned is not None:
        return tuned
    block_m = 64 if m <= 64 else 128
    block_k = _largest_divisor(k, (128, 64, 32))
    if block_k is None:
        raise ValueError(f"K must be a multiple of 32 for the FP8 kernel, got {k=}")
    widths = (128, 64, 32, 16, 8) if m > 64 else (64, 32, 16, 8)
    block_n = _largest_divisor(n, widths)
    if block_n is None:
        raise ValueError(f"N must be a multiple of 8 for the FP8 kernel, got {n=}")
    tiles = (-(-m // block_m)) * (n // block_n)
    k_steps = k // block_k
    k_splits = 1
    # Split K while the grid is under one wave and each split keeps >= 2 pipeline steps.
    while tiles * k_splits * 2 <= num_sms and k_steps % (k_splits * 2) == 0 and k_steps // (k_splits * 2) >= 2:
        k_splits *= 2
    # Precision: no accumulator sums more than MAX_K_PER_ACCUMULATOR products (see there).
    while k // k_splits > MAX_K_PER_ACCUMULATOR and k_steps % (k_splits * 2) == 0:
        k_splits *= 2
    return Fp8MatmulBlockSizes(block_m=block_m, block_n=block_n, block_k=block_k, k_splits=k_splits)


# --- reference and XLA ---------------------------------------------------------------------------------------------


def _broadcast_scale(scale, size: int, name: str):
    scale = jnp.asarray(scale, jnp.float32)
    if scale.shape not in ((), (size,)):
        raise ValueError(f"{name} must be a scalar or have shape ({size},), got {scale.shape=}")
    return jnp.broadcast_to(scale, (size,))


def fp8_matmul_reference(x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.float32):
    """Dequantize both operands to float32, matmul in float32 (HIGHEST), cast: the ground truth."""
    m, n = x_q.shape[0], w_q.shape[0]
    x = x_q.astype(jnp.float32) * _broadcast_scale(x_scale, m, "x_scale")[:, None]
    w = w_q.astype(jnp.float32) * _broadcast_scale(w_scale, n, "w_scale")[:, None]
    y = lax.dot_general(x, w, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def fp8_matmul_xla(x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.bfloat16):
    """XLA's own FP8 path: dot_general on the e4m3 arrays asking for `out_dtype` (cuBLASLt's FP8 GEMM on Hopper, the
    operands already in its TN layout; it accumulates in fp32 and writes `out_dtype`), then the row and column scales
    in float32 as an elementwise epilogue that XLA fuses into the consumer. With a bfloat16 result that is one more
    rounding than scaling the fp32 accumulator, and half the bytes out; a float32 result (the "direct" form, and
    dot on bfloat16 converts, "converted": tag fp8-xla-forms) was slower end to end on an H200 (docs/PERF.md)."""
    _check_operands(x_q, x_scale, w_q, w_scale)
    m, n = x_q.shape[0], w_q.shape[0]
    acc = lax.dot_general(x_q, w_q, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)
    xs = _broadcast_scale(x_scale, m, "x_scale")
    ws = _broadcast_scale(w_scale, n, "w_scale")
    return (acc.astype(jnp.float32) * xs[:, None] * ws[None, :]).astype(out_dtype)


# --- Pallas ----------------------------------------------------------------------------------------------------------


def _check_operands(x_q, x_scale, w_q, w_scale):
    if x_q.ndim != 2 or w_q.ndim != 2:
        raise ValueError(f"fp8_matmul wants x_q [M, K] and w_q [N, K], got {x_q.shape=} {w_q.shape=}")
    if x_q.dtype != E4M3 or w_q.dtype != E4M3:
        raise ValueError(f"fp8_matmul wants float8_e4m3fn operands, got {x_q.dtype=} {w_q.dtype=}")
    if x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"contracted sizes differ: {x_q.shape=} {w_q.shape=} (w_q is [N, K], K-major)")
    _broadcast_scale(x_scale, x_q.shape[0], "x_scale")
    _broadcast_scale(w_scale, w_q.shape[0], "w_scale")


def _mosaic_call(x_q, x_scale, w_q, w_scale, bs: Fp8MatmulBlockSizes, part_dtype, interpret: bool):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x_q.shape
    n = w_q.shape[0]
    bm, bn, bk, ks = bs.block_m, bs.block_n, bs.block_k, bs.k_splits
    if bm % _WGMMA_M:
        raise ValueError(f"mosaic backend: block_m must be a multiple of {_WGMMA_M}, got {bs.block_m=}")
    if bn % 8 or bn > 256:
        raise ValueError(f"mosaic backend: block_n must be a multiple of 8 and <= 256, got {bs.block_n=}")
    if bk not in _SWIZZLES:
        raise ValueError(f"mosaic backend: block_k must be one of {_SWIZZLES} (the SMEM swizzle), got {bs.block_k=}")
    k_steps = k // (bk * ks)
    delay = 1 if k_steps >= 2 else 0  # one wgmma in flight needs two SMEM stages
    transforms = (plgpu.TilingTransform((8, bk)), plgpu.SwizzleTransform(bk))  # e4m3: bk elements = bk bytes

    def kernel(x_gmem, xs_gmem, w_gmem, ws_gmem, o_gmem, o_smem, xs_smem, ws_smem, barriers):
        pid_m, pid_n, pid_s = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("s")
        m_slice, n_slice = pl.ds(pid_m * bm, bm), pl.ds(pid_n * bn, bn)
        # The scales travel while the K pipeline runs.
        plgpu.copy_gmem_to_smem(xs_gmem.at[m_slice], xs_smem, barriers.at[0])
        plgpu.copy_gmem_to_smem(ws_gmem.at[n_slice], ws_smem, barriers.at[1])

        def accumulate(acc_ref):
            def step(_, x_smem, w_smem):
                plgpu.wgmma(acc_ref, x_smem, w_smem.transpose((1, 0)))  # [bm, bk] @ [bk, bn], K fastest in both
                plgpu.wgmma_wait(delay)  # keep one wgmma in flight (delay_release=1 keeps its buffers alive)

            plgpu.emit_pipeline(
                step,
                grid=(k_steps,),
                in_specs=[
                    plgpu.BlockSpec((bm, bk), lambda i: (pid_m, pid_s * k_steps + i), transforms=transforms,
                                    delay_release=delay),
                    plgpu.BlockSpec((bn, bk), lambda i: (pid_n, pid_s * k_steps + i), transforms=transforms,
                                    delay_release=delay),
                ],
                max_concurrent_steps=max(bs.max_concurrent_steps, delay + 1),
            )(x_gmem, w_gmem)
            return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((bm, bn), jnp.float32))
        plgpu.barrier_wait(barriers.at[0])
        plgpu.barrier_wait(barriers.at[1])
        xs = plgpu.load(xs_smem, layout=plgpu.Layout.WGMMA.reduce(1))
        ws = plgpu.load(ws_smem, layout=plgpu.Layout.WGMMA.reduce(0))
        y = acc * lax.broadcast_in_dim(xs, (bm, bn), [0]) * lax.broadcast_in_dim(ws, (bm, bn), [1])
        o_smem[...] = y.astype(part_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pid_s, m_slice, n_slice])
        plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((ks, m, n), part_dtype),
        scratch_types=dict(
            o_smem=plgpu.SMEM((bm, bn), part_dtype),
            xs_smem=plgpu.SMEM((bm,), jnp.float32),
            ws_smem=plgpu.SMEM((bn,), jnp.float32),
            barriers=plgpu.Barrier(num_barriers=2),
        ),
        grid=(m // bm, n // bn, ks),
        grid_names=("m", "n", "s"),
        kernel_name="fp8_matmul_mosaic",
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    return call(x_q, x_scale, w_q, w_scale)


def _triton_call(x_q, x_scale, w_q, w_scale, bs: Fp8MatmulBlockSizes, part_dtype, interpret: bool):
    from jax.experimental.pallas import triton as plgpu_triton

    m, k = x_q.shape
    n = w_q.shape[0]
    bm, bn, bk, ks = bs.block_m, bs.block_n, bs.block_k, bs.k_splits
    k_chunk = k // ks

    def kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref):
        def step(i, acc):
            xk = x_ref[:, pl.ds(i * bk, bk)]
            wk = w_ref[:, pl.ds(i * bk, bk)]
            return acc + lax.dot_general(xk, wk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, k_chunk // bk, step, jnp.zeros((bm, bn), jnp.float32))
        y = acc * xs_ref[...][:, None] * ws_ref[...][None, :]
        o_ref[...] = y.astype(o_ref.dtype)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((ks, m, n), part_dtype),
        grid=(m // bm, n // bn, ks),
        in_specs=[
            pl.BlockSpec((bm, k_chunk), lambda i, j, s: (i, s)),
            pl.BlockSpec((bm,), lambda i, j, s: (i,)),
            pl.BlockSpec((bn, k_chunk), lambda i, j, s: (j, s)),
            pl.BlockSpec((bn,), lambda i, j, s: (j,)),
        ],
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        compiler_params=plgpu_triton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="fp8_matmul_triton",
    )(x_q, x_scale, w_q, w_scale)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "backend", "interpret"))
def _fp8_matmul(x_q, x_scale, w_q, w_scale, *, out_dtype, block_sizes, backend, interpret):
    m = x_q.shape[0]
    bs = block_sizes
    m_pad = -(-m // bs.block_m) * bs.block_m
    xs = _broadcast_scale(x_scale, m, "x_scale")
    ws = _broadcast_scale(w_scale, w_q.shape[0], "w_scale")
    if m_pad != m:  # zero rows with unit scales; sliced off below
        x_q = jnp.pad(x_q, ((0, m_pad - m), (0, 0)))
        xs = jnp.pad(xs, (0, m_pad - m), constant_values=1.0)
    part_dtype = jnp.dtype(out_dtype) if bs.k_splits == 1 else jnp.float32
    call = _mosaic_call if backend == "mosaic" else _triton_call
    parts = call(x_q, xs, w_q, ws, bs, part_dtype, interpret)
    y = parts[0] if bs.k_splits == 1 else jnp.sum(parts, axis=0)
    return y[:m].astype(out_dtype)


def fp8_matmul(x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.bfloat16, block_sizes: Fp8MatmulBlockSizes | None = None,
               backend: str = "mosaic", interpret: bool | None = None):
    """y [M, N] = (x_q [M, K] @ w_q [N, K]^T) * x_scale[:, None] * w_scale[None, :], fp32 accumulation, in out_dtype.

    backend "mosaic" (Mosaic GPU wgmma, the Hopper path) or "triton" (Triton lowering); `interpret=None` runs
    Pallas interpret mode when the default backend is the CPU.
    """
    _check_operands(x_q, x_scale, w_q, w_scale)
    if backend not in BACKENDS:
        raise ValueError(f"unknown fp8_matmul backend {backend!r}; choose one of {BACKENDS}")
    m, k = x_q.shape
    n = w_q.shape[0]
    bs = block_sizes or default_block_sizes(m, n, k)
    if n % bs.block_n:
        raise ValueError(f"N must be a multiple of block_n: {n=} {bs.block_n=}")
    if k % (bs.block_k * bs.k_splits):
        raise ValueError(f"K must be a multiple of block_k * k_splits: {k=} {bs.block_k=} {bs.k_splits=}")
    return _fp8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=jnp.dtype(out_dtype), block_sizes=bs,
                       backend=backend, interpret=resolve_interpret(interpret))


def main():
    """Micro-benchmark on a GPU (`python -m pallas_kernels.fp8_matmul [--shapes vision,prefill,denoise]`): the FP8
    GEMM at the model's shapes (SigLIP at M = 512: two views; the prefix LLM at M = 576: its 2-view + 60-token bucket;
    the action expert at M = 50) through XLA (cuBLASLt), the Mosaic GPU
    and Triton kernels (default tiles), beside the bf16 GEMM the bf16 model runs (bf16 in, bf16 out, no scales).
    18 GEMMs chained in one jit, each with its own weight (so weights stream from HBM) and ordered after the one
    before by an optimization barrier; median of interleaved calls after warm-up (device time by CUPTI), per GEMM;
    errors against the float32 reference. First: the card's dense matmul rate at 8192^3 in bf16 and in e4m3 (XLA),
    the ceiling the achieved TFLOP/s are read against."""
    import sys

    import numpy as np
    from jax.experimental.mosaic.gpu import profiler

    if jax.default_backend() != "gpu":
        sys.exit("pallas_kernels.fp8_matmul main(): a GPU micro-benchmark; JAX sees no GPU")
    groups = {"vision": (("siglip qkv", 512, 1152, 3456), ("siglip out", 512, 1152, 1152),
                         ("siglip mlp up", 512, 1152, 4352), ("siglip mlp down", 512, 4352, 1152)),
              "prefill": (("prefix qkv", 576, 2048, 2560), ("prefix attn out", 576, 2048, 2048),
                          ("prefix gate/up", 576, 2048, 32768), ("prefix down", 576, 16384, 2048)),
              "denoise": (("expert gate/up", 50, 1024, 8192), ("expert down", 50, 4096, 1024))}
    chosen = sys.argv[1].split("=", 1)[-1].split(",") if len(sys.argv) > 1 else list(groups)
    layers, repeats, e4m3 = 18, 30, jnp.float8_e4m3fn

    def device_seconds(fn, *args) -> float:
        """One call's summed kernel time by CUPTI (no launch or host gaps: a launch-bound chain of small GEMMs
        timed by the wall clock reads its dispatch, not its GEMMs)."""
        return profiler.measure(fn)(*args)[1] / 1e3

    def timed(fn, *args, reps=repeats):
        jax.block_until_ready(fn(*args))
        return float(np.median([device_seconds(fn, *args) for _ in range(3 + reps)][3:]))

    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    big = 8192
    a = jax.random.normal(jax.random.key(0), (big, big), jnp.float32)
    for name, dt, pref in (("bf16", jnp.bfloat16, jnp.bfloat16), ("e4m3", e4m3, jnp.bfloat16)):
        x8, w8 = a.astype(dt), a.T.astype(dt)
        mm = jax.jit(lambda x, w, pref=pref: lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                                             preferred_element_type=pref))
        sec = timed(mm, x8, w8, reps=10)
        print(f"  dense {big}^3 {name:5s} (XLA): {2 * big**3 / sec / 1e12:6.0f} TFLOP/s")
    del a

    def bf16(x, x_scale, w, w_scale):  # what the bf16 model runs: bf16 operands and result, no scales
        return lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)

    variants = {"bf16 GEMM (XLA)": bf16,
                "XLA FP8 GEMM": fp8_matmul_xla,
                "Pallas Mosaic GPU": functools.partial(fp8_matmul, backend="mosaic", interpret=False),
                "Pallas Triton": functools.partial(fp8_matmul, backend="triton", interpret=False)}

    def chain(op):
        def run(x_q, x_scale, ws):  # x_q: e4m3, or bf16 for the bf16 GEMM
            # Every GEMM's output is returned: an output nothing uses is dropped by XLA (the barrier orders the
            # GEMMs, it does not keep them alive), which made an earlier version of this loop time one GEMM of 18.
            outs = []
            for w_q, w_scale in ws:
                if outs:
                    _, x_q = lax.optimization_barrier((outs[-1], x_q))
                outs.append(op(x_q, x_scale, w_q, w_scale))
            return outs
        return jax.jit(run)

    print(f"FP8 (e4m3) GEMMs, {layers} chained, each its own weight; us per GEMM")
    for label, m, k, n in [shape for g in chosen for shape in groups[g]]:
        keys = jax.random.split(jax.random.key(m + k + n), layers + 1)
        x_q = jax.random.normal(keys[0], (m, k), jnp.float32).astype(e4m3)
        x_scale = jnp.full((m,), 0.05, jnp.float32)
        ws = [(jax.random.normal(kk, (n, k), jnp.float32).astype(e4m3), jnp.full((n,), k**-0.5, jnp.float32))
              for kk in keys[1:]]
        want = np.asarray(fp8_matmul_reference(x_q, x_scale, *ws[-1]), np.float64)
        as_bf16 = (x_q.astype(jnp.bfloat16), x_scale, [(w.astype(jnp.bfloat16), s) for w, s in ws])
        args = {name: as_bf16 if op is bf16 else (x_q, x_scale, ws) for name, op in variants.items()}
        fns, outs = {}, {}
        for name, op in variants.items():
            try:
                fns[name] = chain(op)
                outs[name] = np.asarray(jax.block_until_ready(fns[name](*args[name]))[-1], np.float64)
            except Exception as e:  # e.g. a backend that does not lower on this card: report it, time the others
                fns.pop(name)
                print(f"  {label:16s} {name:20s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
        times = {name: [] for name in fns}
        for _ in range(3 + repeats):
            for name, fn in fns.items():
                times[name].append(device_seconds(fn, *args[name]))
        base = float(np.median(times["bf16 GEMM (XLA)"][3:])) if "bf16 GEMM (XLA)" in times else None
        for name in fns:
            per = float(np.median(times[name][3:])) / layers
            ref = want if name != "bf16 GEMM (XLA)" else want / (0.05 * k**-0.5)  # bf16 runs without the scales
            err = np.linalg.norm(outs[name] - ref) / np.linalg.norm(ref)
            vs = f"  x{base / layers / per:4.2f} vs bf16" if base else ""
            print(f"  {label:16s} M={m:3d} K={k:5d} N={n:5d}  {name:18s} {per * 1e6:8.2f} us  "
                  f"{2 * m * k * n / per / 1e12:6.1f} TFLOP/s  rel err {err:.1e}{vs}")


if __name__ == "__main__":
    main()

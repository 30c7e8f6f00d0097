"""FP4 weight-only matmul: y[g] = x @ dequant(w[g]) with NVFP4-style weights dequantized in registers.

Axis legend: M rows of x (tokens), K contracted, N output columns, G weights sharing one x (the gate and up
halves of a GeGLU MLP), S splits of K.

Weights use `checkpoints.fp4_format`'s layout with the contracted axis second to last:
    w_packed      uint8 [G?, K/2, N]   byte r holds elements 2r (low nibble) and 2r+1 (high nibble) of column n
    block_scales  e4m3  [G?, K/16, N]  (float8_e4m3fn or its uint8 bytes), scale b covers elements 16b..16b+15;
                                       non-negative (the decoding ignores the sign bit)
    tensor_scale  float32 scalar
The kernel streams the packed bytes and scales (a quarter of bf16's bytes plus 1/16 byte per element), expands
each nibble to a float with integer shifts and masks plus a bitcast (no table lookups), multiplies by its block
scale, and feeds the tensor cores (see DEQUANT_VARIANTS for the operand dtype), accumulating in float32; the
tensor scale and the power-of-two factors of the bit tricks are applied once in the epilogue. Because the two
nibbles of a byte are consecutive K elements, x is split into its even and odd columns outside the kernel (cheap:
x is small) and each K step does two dots, `x_even @ w_low + x_odd @ w_high`.

Denoising (M = 50) is memory-bound, so the tiles cover all rows at once and K can be split across programs
(`k_splits`; partial sums reduced after the kernel or with float32 atomics, `split_reduce`) to put enough programs
on the GPU; prefill (M ~ 600) tiles M.
On the CPU the same kernel runs in Pallas interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels._tiles import pow2_at_least, triton_params

BLOCK = 16  # contracted elements per block scale (checkpoints.fp4_format.BLOCK)
DEQUANT_VARIANTS = ("f32", "bf16", "f16", "f16asm")
# How a tile of packed bytes becomes matmul operands (all exact: an e2m1 value times an e4m3 scale has <= 6
# significant bits, so every variant computes the same products; they differ in instructions per weight):
# "f32":    nibble -> float16 bits (value * 2^-14) -> float32, times the float32 block scale, cast to x's dtype.
# "bf16":   nibble -> bfloat16 bits of twice its value (integer select), times (block scale / 2) in bfloat16.
#           Only for bfloat16 activations.
# "f16":    nibble -> float16 bits (value * 2^-14), times (block scale * 2^7) in float16; the dot runs in float16
#           with x * 2^-4 cast to float16 outside the kernel (|x| < 2^20; |x| < 2^-10 loses relative precision
#           into float16 subnormals, at most 2^-21 absolute). Only for bfloat16 activations.
# "f16asm": "f16" with the nibble decode in inline PTX on 4 bytes per 32-bit register (prmt + shifts + lop3,
#           ~2 instructions per weight); interpret mode runs the same bit operations in plain JAX.
X_PRESCALE = {"f16": 2.0**-4, "f16asm": 2.0**-4}
SPLIT_REDUCE = ("sum", "atomic")

# e2m1 magnitudes of codes 0..7, for the plain-JAX reference.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclasses.dataclass(frozen=True)
class Fp4MatmulBlockSizes:
    """Tile sizes (powers of two for the Triton lowering; clamped to the problem)."""

    block_m: int = 64  # rows of x per program (M = 50 pads to 64: one row block)
    block_n: int = 128  # output columns per program
    block_k: int = 128  # contracted elements per inner step (a multiple of 32)
    k_splits: int = 1  # programs along K, combined as `split_reduce` says
    num_warps: int = 4
    num_stages: int = 3
    dequant: str = "f32"  # one of DEQUANT_VARIANTS
    # k_splits > 1: "sum" writes float32 partials [S, G, M, N] that XLA sums after the kernel (deterministic, but
    # S x the output's bytes go through HBM twice); "atomic" adds into one zero-initialized float32 output with
    # atomics (L2 traffic only; the order of the float additions, hence the last bits, may vary run to run).
    split_reduce: str = "sum"

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "k_splits"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {name}={v}")
        if self.block_k < 2 * BLOCK:
            raise ValueError(f"block_k must be >= {2 * BLOCK}, got block_k={self.block_k}")
        if self.dequant not in DEQUANT_VARIANTS:
            raise ValueError(f"dequant must be one of {DEQUANT_VARIANTS}, got dequant={self.dequant!r}")
        if self.split_reduce not in SPLIT_REDUCE:
            raise ValueError(f"split_reduce must be one of {SPLIT_REDUCE}, got split_reduce={self.split_reduce!r}")


def default_block_sizes(m: int, k: int, n: int, g: int = 1, x_dtype=jnp.bfloat16) -> Fp4MatmulBlockSizes:
    """Tiles measured on the H100 (docs/PERF.md, "FP4 expert MLPs", 2026-11-26).

    M <= 128 (denoise): one row block, 64-wide N tiles, and K split until there are >= 128 programs with >= 2
    pipelined K steps each: the expert's gate/up (K=1024, N=4096, G=2) -> 128 programs, no split; down (K=4096,
    N=1024) -> 8 K splits (the 128-wide tiles measured slower).
    Larger M (prefill): 128 x 128 tiles. bfloat16 activations use the "f16" dequant, float32 ones "f32"."""
    dequant = "f16" if jnp.dtype(x_dtype) == jnp.bfloat16 else "f32"
    if m > 128:
        return Fp4MatmulBlockSizes(block_m=128, block_n=math.gcd(n, 128), block_k=64, k_splits=1, num_warps=8,
                                   num_stages=3, dequant=dequant)
    block_n = math.gcd(n, 64)  # the largest power of two <= 64 dividing N
    block_k = 128
    programs = g * max(1, n // block_n)
    k_splits = 1
    while programs * k_splits < 128 and k // (2 * k_splits) >= 2 * block_k:
        k_splits *= 2
    return Fp4MatmulBlockSizes(block_m=64, block_n=block_n, block_k=block_k, k_splits=k_splits, dequant=dequant)


def _scale_bytes(block_scales):
    if block_scales.dtype == jnp.uint8:
        return block_scales
    if block_scales.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"block_scales must be float8_e4m3fn or uint8, got {block_scales.dtype=}")
    return lax.bitcast_convert_type(block_scales, jnp.uint8)


def _e4m3_f16_times_2m8(b):
    """Non-negative e4m3 bytes (uint8, sign bit 0) -> float16 value * 2^-8, exactly, subnormals included: e4m3's
    exponent and mantissa bits shifted into float16's (one shift; block scales are never negative)."""
    return lax.bitcast_convert_type(b.astype(jnp.uint16) << 7, jnp.float16)


def _nibbles_f16_times_2m14(p):
    """uint8 packed bytes -> (low, high) float16 values * 2^-14: e2m1 bits placed in float16's exponent/mantissa."""
    p = p.astype(jnp.uint16)
    lo = ((p & 0x7) << 9) | ((p & 0x8) << 12)
    hi = ((p & 0x70) << 5) | ((p & 0x80) << 8)
    return lax.bitcast_convert_type(lo, jnp.float16), lax.bitcast_convert_type(hi, jnp.float16)


def _nibble_bf16_twice(c, sign_bit):
    """3-bit e2m1 magnitude codes c (uint16) and sign bits (0 or 0x8000) -> bfloat16 of twice the value."""
    # 2v = 2^e * (1 + m/2) for e >= 1: bfloat16 exponent field e + 127 (c << 6 puts e, m in place); 2v = c if e == 0.
    bits = jnp.where(c < 2, c * jnp.uint16(0x3F80), (c << 6) + jnp.uint16(0x3F80)) | sign_bit
    return lax.bitcast_convert_type(bits, jnp.bfloat16)


# Inline PTX for "f16asm": operand $2 holds 4 packed bytes b0..b3 (Triton packs 4 uint8 elements per register,
# element j in byte j); results $0, $1 are the chosen nibbles of (b0, b1) and (b2, b3) as float16 pairs. prmt spreads
# the bytes into 16-bit lanes, then per lane: the 3 magnitude bits -> float16 bits 9..11, the sign -> bit 15.
# (Two asm calls, low and high nibbles, because Pallas' lowering of a multi-result inline asm is broken in jax 0.11.)
_NIBBLES_TO_F16_PTX = """{
.reg .b32 t0, t1, a, b, z, sgn;
mov.b32 z, 0;
mov.b32 sgn, 0x80008000;
prmt.b32 t0, $2, z, 0x4140;
prmt.b32 t1, $2, z, 0x4342;
shl.b32 a, t0, MAG;
and.b32 a, a, 0x0E000E00;
shl.b32 b, t0, SGN;
lop3.b32 $0, b, sgn, a, 0xEA;
shl.b32 a, t1, MAG;
and.b32 a, a, 0x0E000E00;
shl.b32 b, t1, SGN;
lop3.b32 $1, b, sgn, a, 0xEA;
}"""
_LOW_NIBBLE_PTX = _NIBBLES_TO_F16_PTX.replace("MAG", "9").replace("SGN", "12")  # bits 0-2 -> 9-11, bit 3 -> 15
_HIGH_NIBBLE_PTX = _NIBBLES_TO_F16_PTX.replace("MAG", "5").replace("SGN", "8")  # bits 4-6 -> 9-11, bit 7 -> 15


def _nibbles_f16_asm(p):
    from jax.experimental.pallas import triton as pl_triton

    out = [jax.ShapeDtypeStruct(p.shape, jnp.float16)]
    (lo,) = pl_triton.elementwise_inline_asm(_LOW_NIBBLE_PTX, args=[p], constraints="=r,=r,r", pack=4,
                                             result_shape_dtypes=out)
    (hi,) = pl_triton.elementwise_inline_asm(_HIGH_NIBBLE_PTX, args=[p], constraints="=r,=r,r", pack=4,
                                             result_shape_dtypes=out)
    return lo, hi


def _expand_rows(s, hk):
    """[hk/8, bn] block scales -> [hk, bn]: packed row r uses scale row r // 8."""
    rows, bn = s.shape
    return jnp.broadcast_to(s[:, None, :], (rows, BLOCK // 2, bn)).reshape(hk, bn)


def _dequant_tile(p, s_bytes, dequant, dtype, interpret):
    """Packed tile [hk, bn] uint8 and its scale bytes [hk/8, bn] -> (w_low, w_high) in `dtype`, each [hk, bn],
    equal to the true weights times 2^-_WEIGHT_EXPONENT[dequant]."""
    hk = p.shape[0]
    if dequant == "f32":
        s = _expand_rows(_e4m3_f16_times_2m8(s_bytes).astype(jnp.float32), hk)
        lo, hi = _nibbles_f16_times_2m14(p)
        return (lo.astype(jnp.float32) * s).astype(dtype), (hi.astype(jnp.float32) * s).astype(dtype)
    if dequant == "bf16":
        s = _expand_rows((_e4m3_f16_times_2m8(s_bytes).astype(jnp.float32) * 128.0).astype(jnp.bfloat16), hk)
        p = p.astype(jnp.uint16)
        lo = _nibble_bf16_twice(p & 0x7, (p & 0x8) << 12)
        hi = _nibble_bf16_twice((p >> 4) & 0x7, (p & 0x80) << 8)
        return lo * s, hi * s
    # "f16" / "f16asm": block scale * 2^7 in float16 (<= 448 * 2^7 = 57344, exact); products v * s * 2^-7.
    s = _expand_rows(_e4m3_f16_times_2m8(s_bytes) * jnp.float16(2.0**15), hk)
    lo, hi = _nibbles_f16_asm(p) if dequant == "f16asm" and not interpret else _nibbles_f16_times_2m14(p)
    return lo * s, hi * s


# The dequantized tiles are the true weights times 2^-e: the epilogue multiplies by 2^e (and undoes x's prescale).
_WEIGHT_EXPONENT = {"f32": 22, "bf16": 0, "f16": 7, "f16asm": 7}


def _epilogue_factor(dequant: str) -> float:
    return 2.0 ** _WEIGHT_EXPONENT[dequant] / X_PRESCALE.get(dequant, 1.0)


def _fp4_matmul_kernel(xe_ref, xo_ref, w_ref, s_ref, ts_ref, *rest, hk, steps, dequant, interpret, atomic):
    o_ref = rest[-1]  # with atomic=True, rest = (zero-initialized input aliased to the output, output)
    bm, bn = o_ref.shape
    dtype = xe_ref.dtype

    def step(i, acc):
        rows = pl.ds(pl.multiple_of(i * hk, hk), hk)
        srows = pl.ds(pl.multiple_of(i * (hk // 8), hk // 8), hk // 8)
        w_lo, w_hi = _dequant_tile(w_ref[rows, :], s_ref[srows, :], dequant, dtype, interpret)
        acc += jnp.dot(xe_ref[:, rows], w_lo, preferred_element_type=jnp.float32)
        acc += jnp.dot(xo_ref[:, rows], w_hi, preferred_element_type=jnp.float32)
        return acc

    acc = lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
    scale = ts_ref[()] * jnp.float32(_epilogue_factor(dequant))
    if atomic:
        from jax.experimental.pallas import triton as pl_triton

        pl_triton.atomic_add(o_ref, (slice(None), slice(None)), acc * scale)
    else:
        o_ref[...] = (acc * scale).astype(o_ref.dtype)


def _check(x, w_packed, block_scales, tensor_scale):
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got {x.shape=}")
    if w_packed.dtype != jnp.uint8:
        raise ValueError(f"w_packed must be uint8 (two e2m1 codes per byte), got {w_packed.dtype=}")
    if w_packed.ndim not in (2, 3):
        raise ValueError(f"w_packed must be [K/2, N] or [G, K/2, N], got {w_packed.shape=}")
    k = x.shape[1]
    *g, half_k, n = w_packed.shape
    if 2 * half_k != k:
        raise ValueError(f"x's K must be twice w_packed's packed rows: {x.shape=} {w_packed.shape=}")
    if k % BLOCK:
        raise ValueError(f"K must be a multiple of {BLOCK}: {x.shape=}")
    want = (*g, k // BLOCK, n)
    if tuple(block_scales.shape) != want:
        raise ValueError(f"block_scales must be {want} for {w_packed.shape=}, got {block_scales.shape=}")
    if jnp.shape(tensor_scale) != ():
        raise ValueError(f"tensor_scale must be a scalar, got {jnp.shape(tensor_scale)=}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float array, got {x.dtype=}")


def fp4_matmul(x, w_packed, block_scales, tensor_scale, *, block_sizes: Fp4MatmulBlockSizes | None = None,
               out_dtype=None, interpret: bool | None = None):
    """x [M, K] @ dequant(w) for w [K, N] (or [G, K, N] -> [G, M, N]) stored as FP4; result in `out_dtype`
    (default x's dtype), float32 accumulation. `interpret=None` picks interpret mode on a CPU backend."""
    _check(x, w_packed, block_scales, tensor_scale)
    grouped = w_packed.ndim == 3
    if not grouped:
        w_packed, block_scales = w_packed[None], block_scales[None]
    g, n = w_packed.shape[0], w_packed.shape[2]
    m, k = x.shape
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    bs = block_sizes or default_block_sizes(m, k, n, g, x.dtype)
    if bs.dequant != "f32" and x.dtype != jnp.bfloat16:
        raise ValueError(f"dequant={bs.dequant!r} needs bfloat16 activations, got {x.dtype=} (use 'f32')")
    interpret = resolve_interpret(interpret)

    bm = min(bs.block_m, pow2_at_least(m, 16))
    bn = min(bs.block_n, n)
    if n % bn:
        raise ValueError(f"N={n} must be a multiple of block_n={bn} (w_packed.shape={w_packed.shape})")
    splits = bs.k_splits
    if k % splits or (k // splits) % (2 * BLOCK):
        raise ValueError(f"K={k} must split into k_splits={splits} parts that are multiples of {2 * BLOCK}")
    k_split = k // splits
    bk = min(bs.block_k, k_split)
    if k_split % bk:
        raise ValueError(f"K/k_splits={k_split} must be a multiple of block_k={bk}")
    m_pad = -(-m // bm) * bm
    xp = jnp.pad(x, ((0, m_pad - m), (0, 0))) if m_pad != m else x
    if bs.dequant in X_PRESCALE:
        xp = (xp.astype(jnp.float32) * X_PRESCALE[bs.dequant]).astype(jnp.float16)
    xe, xo = xp[:, 0::2], xp[:, 1::2]
    scales = _scale_bytes(block_scales)
    ts = jnp.asarray(tensor_scale, jnp.float32)
    hk, hs = k_split // 2, k_split // BLOCK

    atomic = splits > 1 and bs.split_reduce == "atomic"
    kernel = functools.partial(_fp4_matmul_kernel, hk=bk // 2, steps=k_split // bk, dequant=bs.dequant,
                               interpret=interpret, atomic=atomic)
    # Grid (M blocks, G, N blocks, K splits): the Triton lowering makes the first axis the fastest-varying, so
    # the row blocks that share a weight tile run side by side and read it through L2 once.
    grid = (m_pad // bm, g, n // bn, splits)
    in_specs = [
        pl.BlockSpec((bm, hk), lambda i, gi, j, s: (i, s)),
        pl.BlockSpec((bm, hk), lambda i, gi, j, s: (i, s)),
        pl.BlockSpec((None, hk, bn), lambda i, gi, j, s: (gi, s, j)),
        pl.BlockSpec((None, hs, bn), lambda i, gi, j, s: (gi, s, j)),
        pl.BlockSpec((), lambda i, gi, j, s: ()),
    ]
    operands = [xe, xo, w_packed, scales, ts]
    if atomic:  # every K split adds into the same output block
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, gi, j, s: (gi, i, j))
        in_specs.append(out_spec)
        operands.append(jnp.zeros((g, m_pad, n), jnp.float32))
        out_shape = jax.ShapeDtypeStruct((g, m_pad, n), jnp.float32)
    else:
        out_spec = pl.BlockSpec((None, None, bm, bn), lambda i, gi, j, s: (s, gi, i, j))
        out_shape = jax.ShapeDtypeStruct((splits, g, m_pad, n), out_dtype if splits == 1 else jnp.float32)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        input_output_aliases={len(operands) - 1: 0} if atomic else {},
        compiler_params=triton_params(bs),
        interpret=interpret,
        name="fp4_matmul",
    )(*operands)
    if not atomic:
        out = out[0] if splits == 1 else jnp.sum(out, axis=0)
    out = out[:, :m].astype(out_dtype)
    return out if grouped else out[0]



def dequantize_reference(w_packed, block_scales, tensor_scale, dtype=jnp.float32):
    """Plain-JAX dequantization of [..., K/2, N] packed weights -> [..., K, N] in `dtype`."""
    codes = jnp.stack([w_packed & 0xF, w_packed >> 4], axis=-2)  # [..., K/2, 2, N]
    codes = codes.reshape(*w_packed.shape[:-2], 2 * w_packed.shape[-2], w_packed.shape[-1])
    mag = jnp.asarray(_E2M1, jnp.float32)[(codes & 7).astype(jnp.int32)]
    vals = jnp.where((codes & 8) != 0, -mag, mag)
    scales = lax.bitcast_convert_type(_scale_bytes(block_scales), jnp.float8_e4m3fn).astype(jnp.float32)
    scales = jnp.repeat(scales, BLOCK, axis=-2)
    return (vals * scales * jnp.asarray(tensor_scale, jnp.float32)).astype(dtype)


def fp4_matmul_reference(x, w_packed, block_scales, tensor_scale, *, out_dtype=None):
    """Dequantize then matmul, all in float32: the ground truth for `fp4_matmul`."""
    _check(x, w_packed, block_scales, tensor_scale)
    w = dequantize_reference(w_packed, block_scales, tensor_scale)
    y = jnp.einsum("MK,...KN->...MN", x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(out_dtype or x.dtype)


def main():
    """Micro-benchmark on a GPU (`python -m pallas_kernels.fp4_matmul`): the FP4 weight-only matmul at the MLP
    shapes (the action expert's gate/up [2, 1024, 4096] and down [4096, 1024] at M = 50, the prefix LLM's gate/up
    [2, 2048, 16384] at M = 600) with its default tiles, against XLA's bf16 einsum on the same weights dequantized.
    18 layers chained in one jit, each with its own random FP4 weight (codes, e4m3 block scales) so weights stream
    from HBM, ordered by an optimization barrier; median of interleaved calls after warm-up, per layer; errors
    against the float32 reference."""
    import sys
    import time

    import numpy as np

    if jax.default_backend() != "gpu":
        sys.exit("pallas_kernels.fp4_matmul main(): a GPU micro-benchmark; JAX sees no GPU")
    layers, repeats = 18, 30

    def bf16(x, w, scales, tensor_scale):
        return jnp.einsum("MK,...KN->...MN", x, w)  # w: the dequantized bf16 weight

    variants = {"XLA bf16 einsum": bf16,
                "Pallas fp4_matmul": functools.partial(fp4_matmul, interpret=False)}

    def chain(op):
        def run(x, ws, tensor_scale):
            # Every matmul's output is returned: one nothing uses is dropped by XLA (the barrier only orders them).
            outs = []
            for w, s in ws:
                if outs:
                    _, x = lax.optimization_barrier((outs[-1], x))
                outs.append(op(x, w, s, tensor_scale))
            return outs
        return jax.jit(run)

    print(f"{jax.devices()[0].device_kind}: FP4 weight-only matmuls, bf16 activations, {layers} layers chained")
    for label, m, g, k, n in (("expert gate/up", 50, 2, 1024, 4096), ("expert down", 50, 1, 4096, 1024),
                              ("prefill gate/up", 600, 2, 2048, 16384)):
        keys = jax.random.split(jax.random.key(m + k + n), 2 * layers + 1)
        lead = (g,) if g > 1 else ()
        x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(jnp.bfloat16)
        tensor_scale = jnp.float32(k**-0.5)
        fp4 = [(jax.random.randint(keys[2 * i + 1], (*lead, k // 2, n), 0, 256, jnp.int32).astype(jnp.uint8),
                jax.random.uniform(keys[2 * i + 2], (*lead, k // BLOCK, n), jnp.float32, 0.25, 2.0)
                .astype(jnp.float8_e4m3fn)) for i in range(layers)]
        dense = [(dequantize_reference(w, s, tensor_scale).astype(jnp.bfloat16), s) for w, s in fp4]
        want = np.asarray(fp4_matmul_reference(x, *fp4[-1], tensor_scale, out_dtype=jnp.float32), np.float64)
        fns = {name: chain(op) for name, op in variants.items()}
        args = {"XLA bf16 einsum": (x, dense, tensor_scale), "Pallas fp4_matmul": (x, fp4, tensor_scale)}
        outs = {name: np.asarray(jax.block_until_ready(fn(*args[name]))[-1], np.float64) for name, fn in fns.items()}
        times = {name: [] for name in fns}
        for _ in range(3 + repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args[name]))
                times[name].append(time.perf_counter() - t0)
        for name in fns:
            per = float(np.median(times[name][3:])) / layers
            weight_bytes = g * k * n * (2 if name.startswith("XLA") else 0.5 + 1 / BLOCK)
            err = np.linalg.norm(outs[name] - want) / np.linalg.norm(want)
            print(f"  {label:16s} M={m:3d} {g}x[{k}, {n}]  {name:18s} {per * 1e6:8.2f} us  "
                  f"{weight_bytes / per / 1e9:6.0f} GB/s of weights  rel err {err:.1e}")


if __name__ == "__main__":
    main()

"""GPU check and timing of the two attention kernels (pallas_kernels/) against their plain-JAX (XLA) references.

Run on the GPU machine from the repo root:  python scripts/gpu_attention_kernels.py
(about 1-3 minutes, mostly compilation). Prints:
  1. correctness at the real shapes (8 q heads : 1 kv head, head_dim 256, batch 1, 50 action tokens): bf16 at
     prefix lengths 572 and 968 and float32 at 572, as max-abs and relative error against the reference;
  2. a timing table: microseconds per call for the XLA reference and 3 block-size / num_warps variants of each
     kernel, on the padded 968-slot prefix (lengths 572 and 968) and on a compacted 576-slot bucket (length 572),
     with achieved TFLOP/s (prefill, valid region only) or GB/s (cross-attention, valid bytes), and the best variant.

Timing: one jitted executable runs the op on R distinct random input sets one after another (chained by
optimization barriers, no host round trip between calls); per-call time = (median(t[R=24]) - median(t[R=8])) / 16
over 20 repeats after warm-up, which cancels the fixed dispatch cost of an executable.
"""

from __future__ import annotations

import functools
import pathlib
import statistics
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import gqa_cross_attention as cross
from pallas_kernels import ragged_prefill_attention as prefill

warnings.filterwarnings("ignore", category=DeprecationWarning)

HEADS, KV_HEADS, HEAD_DIM, ACTIONS = 8, 1, 256, 50
R_SMALL, R_LARGE, REPEATS = 8, 24, 20
DEADLINE_S = 165.0
START = time.perf_counter()

PREFILL_VARIANTS = {
    "r64k64w8s2": prefill.BlockSizes(block_rows=64, block_k=64, num_warps=8, num_stages=2),  # default
    "r64k32w8s3": prefill.BlockSizes(block_rows=64, block_k=32, num_warps=8, num_stages=3),
    "r128k32w8s2": prefill.BlockSizes(block_rows=128, block_k=32, num_warps=8, num_stages=2),
}
CROSS_VARIANTS = {
    "r64k64s128w8s2": cross.BlockSizes(block_rows=64, block_k=64, split_k=128, num_warps=8, num_stages=2),  # default
    "r64k32s64w8s3": cross.BlockSizes(block_rows=64, block_k=32, split_k=64, num_warps=8, num_stages=3),
    "r64k64s256w8s2": cross.BlockSizes(block_rows=64, block_k=64, split_k=256, num_warps=8, num_stages=2),
}
# (prefix slots S, valid length): upstream's padded prefix, and a compacted bucket as the ragged path uses.
CASES = [(576, 572), (968, 572), (968, 968)]


def rng_arrays(seed, shapes, dtype):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s) * scale, dtype) for s, scale in shapes]


def prefill_inputs(seed, slots, length, dtype=jnp.bfloat16):
    q, k, v = rng_arrays(
        seed,
        [((1, slots, HEADS, HEAD_DIM), HEAD_DIM**-0.5), ((1, slots, KV_HEADS, HEAD_DIM), 2.0),
         ((1, slots, KV_HEADS, HEAD_DIM), 1.0)],
        dtype,
    )  # fmt: skip
    return q, k, v, jnp.asarray([length], jnp.int32)


def cross_inputs(seed, slots, length, dtype=jnp.bfloat16):
    q, kp, vp, ks, vs = rng_arrays(
        seed,
        [((1, ACTIONS, HEADS, HEAD_DIM), HEAD_DIM**-0.5), ((1, slots, KV_HEADS, HEAD_DIM), 2.0),
         ((1, slots, KV_HEADS, HEAD_DIM), 1.0), ((1, ACTIONS, KV_HEADS, HEAD_DIM), 2.0),
         ((1, ACTIONS, KV_HEADS, HEAD_DIM), 1.0)],
        dtype,
    )  # fmt: skip
    return q, kp, vp, jnp.asarray([length], jnp.int32), ks, vs


def errors(out, ref, valid_rows=None):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if valid_rows is not None:
        out, ref = out[:, :valid_rows], ref[:, :valid_rows]
    finite = bool(np.all(np.isfinite(out)))
    return float(np.max(np.abs(out - ref))), float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), finite


def check_correctness():
    print("== correctness vs reference (default block sizes) ==")
    ok = True
    limits = {"bf16": 2e-2, "f32": 1e-4}  # relative error: bf16 rounding / float32 parity target of the issues
    for dtype_name, dtype, lengths in (("bf16", jnp.bfloat16, (572, 968)), ("f32", jnp.float32, (572,))):
        for length in lengths:
            args = prefill_inputs(1, 968, length, dtype)
            out = jax.jit(functools.partial(prefill.ragged_prefill_attention, interpret=False))(*args)
            ref = jax.jit(prefill.ragged_prefill_attention_reference)(*args)
            mx, rel, finite = errors(out, ref, valid_rows=length)
            good = finite and rel <= limits[dtype_name]
            ok &= good
            print(f"  prefill {dtype_name} S=968 L={length:4d}: max|d|={mx:.2e} rel={rel:.2e} finite={finite} "
                  f"{'OK' if good else 'FAIL'}")  # fmt: skip
            args = cross_inputs(2, 968, length, dtype)
            out = jax.jit(functools.partial(cross.gqa_cross_attention, interpret=False))(*args)
            ref = jax.jit(cross.gqa_cross_attention_reference)(*args)
            mx, rel, finite = errors(out, ref)
            good = finite and rel <= limits[dtype_name]
            ok &= good
            print(f"  cross   {dtype_name} S=968 L={length:4d}: max|d|={mx:.2e} rel={rel:.2e} finite={finite} "
                  f"{'OK' if good else 'FAIL'}")  # fmt: skip
    return ok


def _chained(fn, sets):
    """fn over each input set in order; an optimization barrier makes call i+1 wait for call i, so XLA can neither
    fuse independent calls together (horizontal fusion) nor overlap them, and no extra kernel is launched."""
    outs = []
    for args in sets:
        if outs:
            _, args = jax.lax.optimization_barrier((outs[-1], args))
        outs.append(fn(*args))
    return outs


def time_per_call_us(fn, arg_sets):
    """Per-call microseconds of fn over distinct input sets run back to back inside one executable."""
    medians = {}
    for r in (R_SMALL, R_LARGE):
        run = jax.jit(functools.partial(_chained, fn))
        sets = arg_sets[:r]
        jax.block_until_ready(run(sets))  # compile
        for _ in range(3):
            jax.block_until_ready(run(sets))
        samples = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            jax.block_until_ready(run(sets))
            samples.append(time.perf_counter() - t0)
        medians[r] = statistics.median(samples)
    return (medians[R_LARGE] - medians[R_SMALL]) / (R_LARGE - R_SMALL) * 1e6


def timing_rows(kind, case, make_inputs, reference, kernel, variants, work):
    slots, length = case
    arg_sets = [make_inputs(10 + i, slots, length) for i in range(R_LARGE)]
    impls = {"xla_reference": reference}
    for variant, block_sizes in variants.items():
        impls[f"pallas_{variant}"] = functools.partial(kernel, block_sizes=block_sizes, interpret=False)
    rows = []
    for name, fn in impls.items():
        if time.perf_counter() - START > DEADLINE_S:
            rows.append((kind, slots, length, name, None, "skipped: time budget"))
            continue
        try:
            us = time_per_call_us(fn, arg_sets)
            rows.append((kind, slots, length, name, us, work(length, us)))
        except Exception as e:  # a variant that does not compile is reported, not fatal
            rows.append((kind, slots, length, name, None, f"ERROR {type(e).__name__}: {str(e)[:80]}"))
    return rows


def prefill_work(length, us):
    flops = 4 * length * length * HEADS * HEAD_DIM  # QK^T and PV over the valid region
    return f"{flops / (us * 1e-6) / 1e12:6.1f} TFLOP/s"


def cross_work(length, us):
    nbytes = 2 * (2 * (length + ACTIONS) * KV_HEADS * HEAD_DIM + 2 * ACTIONS * HEADS * HEAD_DIM)  # K,V + q,out bf16
    return f"{nbytes / (us * 1e-6) / 1e9:6.0f} GB/s"


def main():
    if jax.default_backend() != "gpu":
        sys.exit(f"needs a GPU; default backend is {jax.default_backend()}")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    ok = check_correctness()
    rows = []
    for case in CASES:  # most relevant case first, in case the time budget runs out
        rows += timing_rows(
            "prefill", case, prefill_inputs, prefill.ragged_prefill_attention_reference,
            prefill.ragged_prefill_attention, PREFILL_VARIANTS, prefill_work,
        )  # fmt: skip
        rows += timing_rows(
            "cross", case, cross_inputs, cross.gqa_cross_attention_reference, cross.gqa_cross_attention,
            CROSS_VARIANTS, cross_work,
        )  # fmt: skip
    print(f"== timing, bf16, batch 1, us per call (median, R={R_LARGE} minus R={R_SMALL}) ==")
    print(f"  {'kernel':8s} {'S':>4s} {'L':>4s}  {'impl':24s} {'us':>8s}  {'speedup':>7s}  achieved")
    for kind, slots, length in sorted({(r[0], r[1], r[2]) for r in rows}, key=lambda x: (x[0] != "prefill", -x[1])):
        group = [r for r in rows if r[:3] == (kind, slots, length)]
        ref_us = next((r[4] for r in group if r[3] == "xla_reference"), None)
        timed = [r for r in group if r[4] is not None and r[3] != "xla_reference"]
        best = min(timed, key=lambda r: r[4])[3] if timed else None
        for _, _, _, name, us, note in group:
            us_s = f"{us:8.1f}" if us is not None else "       -"
            speed = f"{ref_us / us:6.2f}x" if (us and ref_us) else "       "
            mark = "  <- best" if name == best else ""
            print(f"  {kind:8s} {slots:4d} {length:4d}  {name:24s} {us_s}  {speed}  {note}{mark}")
    print(f"correctness: {'OK' if ok else 'FAIL'}; total {time.perf_counter() - START:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

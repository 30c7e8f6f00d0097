"""GPU check and timing of the denoise GQA cross-attention: the split (flash-decoding) kernel with the XLA or the
Pallas combine of its partials, and other tiles.

Run on the GPU machine from the repo root:  python scripts/gpu_cross_attention_variants.py   (about 1-2 minutes)

Real shapes, bfloat16, batch 1: q [1,50,8,256] over a prefix [1,S,1,256] with valid length L plus the 50 tokens'
own K/V, for (S, L) = (576, 572) (the compacted prefix the sampler uses) and (968, 968).
For each variant (the XLA reference, the current default BlockSizes(), the Pallas combine, other tiles):
  - correctness: one call against gqa_cross_attention_reference, relative error max|out-ref| / max|ref| (<= 2e-2);
  - timing: one jitted executable chains 18 calls (as the 18 layers of a denoise step: each call its own K/V buffers,
    each call's output is the next call's q, so nothing overlaps or is elided); median of 20 runs after warm-up,
    reported per call (chain / 18, which includes 1/18 of one executable dispatch) and as GB/s of valid bytes.
    The 18 K/V sets (~11-18 MB) stay in the 50 MB L2 here; in the sampler the weights evict them, so absolute
    numbers are optimistic for every variant alike.
Prints one table row per variant, marks the fastest correct one per case (`*`), and the BlockSizes to make the default.
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

from pallas_kernels.gqa_cross_attention import BlockSizes, gqa_cross_attention, gqa_cross_attention_reference

warnings.filterwarnings("ignore", category=DeprecationWarning)

HEADS, KV_HEADS, HEAD_DIM, ACTIONS = 8, 1, 256, 50
LAYERS, REPEATS, WARMUP = 18, 20, 3
MAX_REL_ERR = 2e-2
CASES = [(576, 572), (968, 968)]  # (prefix slots S, valid length L)
DEADLINE_S = 150.0  # later variants are skipped (and reported) past this
START = time.perf_counter()

REFERENCE = "xla_reference"
VARIANTS: dict[str, BlockSizes | None] = {
    REFERENCE: None,
    "split_default": BlockSizes(),
    "split + Pallas combine": BlockSizes(combine="pallas"),
    "split + Pallas combine r32": BlockSizes(combine="pallas", combine_rows=32),
    "r32_k64_s128_w4 + Pallas combine": BlockSizes(block_rows=32, block_k=64, split_k=128, num_warps=4,
                                                   combine="pallas"),
}


def make_layer_inputs(seed, slots):
    """q and LAYERS distinct (k_prefix, v_prefix, k_self, v_self) sets, random normal (never zeros), bfloat16."""
    rng = np.random.default_rng(seed)

    def normal(shape, scale):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.bfloat16)

    q = normal((1, ACTIONS, HEADS, HEAD_DIM), HEAD_DIM**-0.5)
    layers = [
        (
            normal((1, slots, KV_HEADS, HEAD_DIM), 2.0),
            normal((1, slots, KV_HEADS, HEAD_DIM), 1.0),
            normal((1, ACTIONS, KV_HEADS, HEAD_DIM), 2.0),
            normal((1, ACTIONS, KV_HEADS, HEAD_DIM), 1.0),
        )
        for _ in range(LAYERS)
    ]
    return q, layers


def op_for(block_sizes):
    if block_sizes is None:
        return gqa_cross_attention_reference
    return functools.partial(gqa_cross_attention, block_sizes=block_sizes, interpret=False)


def chain_for(op):
    @jax.jit
    def chain(q, layers, lengths):
        for kp, vp, ks, vs in layers:
            q = op(q, kp, vp, lengths, ks, vs)
        return q

    return chain


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def time_chain(chain, *args):
    for _ in range(WARMUP):
        jax.block_until_ready(chain(*args))
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(chain(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def valid_bytes(length):
    item = 2  # bfloat16
    q_and_out = 2 * ACTIONS * HEADS * HEAD_DIM * item
    kv = 2 * (length + ACTIONS) * KV_HEADS * HEAD_DIM * item
    return q_and_out + kv


def main():
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
    results = {}  # (variant, case) -> (us per call, rel err) or a reason string
    for slots, length in CASES:
        q, layers = make_layer_inputs(slots, slots)
        lengths = jnp.asarray([length], jnp.int32)
        kp, vp, ks, vs = layers[0]
        ref = jax.jit(gqa_cross_attention_reference)(q, kp, vp, lengths, ks, vs)
        for name, block_sizes in VARIANTS.items():
            key = (name, (slots, length))
            if time.perf_counter() - START > DEADLINE_S:
                results[key] = "skipped (time)"
                continue
            try:
                op = op_for(block_sizes)
                err = rel_err(jax.jit(op)(q, kp, vp, lengths, ks, vs), ref)
                seconds = time_chain(chain_for(op), q, layers, lengths)
                results[key] = (seconds / LAYERS * 1e6, err)
            except Exception as exc:  # a variant that fails to compile or run is reported, not fatal
                results[key] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            print(f"  S={slots} L={length} {name}: {results[key]}", file=sys.stderr, flush=True)

    best = {}
    for case in CASES:
        ok = {
            name: r[0] for (name, c), r in results.items() if c == case and isinstance(r, tuple) and r[1] <= MAX_REL_ERR
        }
        best[case] = min(ok, key=ok.get) if ok else None

    header = f"{'variant':<20}" + "".join(
        f" | {f'S={s} L={ln}':<11} {'us/call':>8} {'GB/s':>7} {'rel_err':>8}" for s, ln in CASES
    )
    print("\nGQA cross-attention, bf16, q [1,50,8,256], chain of 18 calls, median of 20")
    print(header)
    print("-" * len(header))
    for name in VARIANTS:
        row = f"{name:<20}"
        for case in CASES:
            r = results[(name, case)]
            if isinstance(r, tuple):
                us, err = r
                mark = "*" if best[case] == name else (" " if err <= MAX_REL_ERR else "!")
                gbs = valid_bytes(case[1]) / (us * 1e-6) / 1e9
                row += f" | {mark:<11} {us:8.2f} {gbs:7.1f} {err:8.1e}"
            else:
                row += f" | {r[:37]:<37}"
        print(row)
    print("(* fastest with rel_err <= 2e-2; ! rel_err too large)")

    kernel_best = {}
    for case in CASES:
        ok = {
            name: r[0]
            for (name, c), r in results.items()
            if c == case and name != REFERENCE and isinstance(r, tuple) and r[1] <= MAX_REL_ERR
        }
        kernel_best[case] = min(ok, key=ok.get) if ok else None
    main_case = CASES[0]
    choice = kernel_best[main_case]
    if choice is None:
        print("no kernel variant passed: keep the XLA reference")
        return
    print(f"fastest kernel at S={main_case[0]} L={main_case[1]}: {choice}; at S={CASES[1][0]}: {kernel_best[CASES[1]]}")
    print(f"set default: {VARIANTS[choice]!r}")
    if best[main_case] == REFERENCE:
        print("note: the XLA reference beat every kernel variant at the main case")


if __name__ == "__main__":
    main()

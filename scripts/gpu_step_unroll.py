"""H100: the Euler loop's iteration count vs the host gap. Times `pallas` with lax.fori_loop(unroll=U) for U in
1, 2, 5 (10 steps), and prints the median, compile time and cosine vs U=1. Usage: python scripts/gpu_step_unroll.py"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import numpy as np

from pi05_jax import fast_path, sampler
from pi05_jax.bench.selection import Selection, build
from pi05_jax.commands.common import Progress


def main() -> int:
    say = Progress()
    preset = sys.argv[1] if len(sys.argv) > 1 else "full"
    from pi05_jax.config import preset as arch

    sel = Selection(config=arch(preset), source=f"preset:{preset}", checkpoint=None, preset=preset, views=2,
                    prompt_len=60, steps=10, batch=1, dtype="bfloat16", kernels=("pallas",), runs=20, device="auto",
                    platform=jax.default_backend(), seed=0)
    built = build(sel, say)
    base = None
    for u in (1, 2, 5):
        name = f"pallas_u{u}"
        sampler.register(fast_path.make_implementation(name, fast_path.FastPathOptions(attention="pallas",
                                                                                       step_unroll=u)))
        t0 = time.perf_counter()
        a = np.asarray(sampler.sample_actions(built.params, built.obs, noise=built.noise, num_steps=10, kernels=name))
        first = time.perf_counter() - t0
        times = []
        for _ in range(3 + sel.runs):
            t0 = time.perf_counter()
            jax.block_until_ready(sampler.sample_actions(built.params, built.obs, noise=built.noise, num_steps=10,
                                                         kernels=name))
            times.append(time.perf_counter() - t0)
        med = statistics.median(times[3:])
        base = a if base is None else base
        cos = float((a.ravel() @ base.ravel()) / np.linalg.norm(a) / np.linalg.norm(base))
        print(f"{name:10s} median {med * 1e3:7.2f} ms  first call {first:6.1f} s  cos vs u1 {cos:.6f}", flush=True)

    # FP4 (NVFP4-style) expert MLPs on the same fast path: end to end and the denoise phase alone.
    from pi05_jax.bench.implementations import phased
    from pi05_jax.quantized.fp4_weight import quantize_params_fp4

    p4 = jax.block_until_ready(quantize_params_fp4(built.params, scope="expert"))

    def median_ms(fn, *args):
        ts = []
        for _ in range(3 + sel.runs):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts[3:]) * 1e3

    for label, params in (("bf16", built.params), ("fp4-expert", p4)):
        ph = phased(sampler.IMPLEMENTATIONS["pallas"], params, built.obs, 10)
        vision, prefill, denoise = jax.jit(ph.vision), jax.jit(ph.prefill), jax.jit(ph.denoise)
        prefix = prefill(ph.params, built.obs, vision(ph.params, built.obs))
        a = np.asarray(sampler.sample_actions(params, built.obs, noise=built.noise, num_steps=10, kernels="pallas"))
        total = median_ms(lambda p: sampler.sample_actions(p, built.obs, noise=built.noise, num_steps=10,
                                                           kernels="pallas"), params)
        den = median_ms(denoise, ph.params, prefix, built.noise)
        cos = float((a.ravel() @ base.ravel()) / np.linalg.norm(a) / np.linalg.norm(base))
        print(f"{label:10s} pallas end to end {total:7.2f} ms  denoise alone {den:7.2f} ms  cos vs bf16 {cos:.6f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

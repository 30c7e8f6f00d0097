"""GPU timing of the layer layouts: stacked layers (lax.scan, per-layer weight slice + copy before each GEMM) vs
unstacked layers (pi05_jax.layer_stack: per-layer buffers, layers unrolled), and unrolled vs fori_loop Euler steps.

Full-size random bf16 weights drawn on the device (pi05_jax.bench.selection.random_weights), 2 views + 60-token
prompt, batch 1, 10 steps. Per variant: first call (compile + run, printed as compile_s = first - median), then
warm-up, then --repeats timed calls with block_until_ready (median, min), XLA compilations during the timed calls
(must be 0), and cosine / relative error of the actions vs the reference implementation (cosine must be >= 0.9999).
The stacked params are converted to the unstacked layout once up front (timed: "unstack_s"), as prepare() would.
One line per variant is printed as soon as it is measured, then a summary table.

    python scripts/gpu_layers.py                     # ~4-5 minutes on an H100 (mostly compiles)
    python scripts/gpu_layers.py --only compact      # fewer variants
    python scripts/gpu_layers.py --preset tiny --repeats 3   # a smoke test on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax
import numpy as np
from gpu_common import cosine, rel_err, say, time_sample

from pi05_jax import fast_path, layer_stack, sampler
from pi05_jax.bench.selection import random_weights
from pi05_jax.config import preset
from pi05_jax.observation import observation_from_arrays
from pi05_jax.synthetic import synthetic_arrays, synthetic_noise

BF16_MIN_COSINE = 0.9999








def variants(only: str | None) -> list[tuple[str, str, bool]]:
    """(label, registered kernels name, whether it gets the unstacked params)."""
    out = [("reference", "reference", False)]
    for attention, base in (("xla", "compact"), ("pallas", "pallas")):
        if only and only not in ("reference", base):
            continue
        for unstack in (False, True):
            for unroll in (True, False):
                label = f"{base}-{'unstacked' if unstack else 'stacked'}-{'unrolled' if unroll else 'fori'}"
                options = fast_path.FastPathOptions(attention=attention, unstack_layers=unstack, unroll_steps=unroll)
                sampler.register(fast_path.make_implementation(label, options))
                out.append((label, label, unstack))
    return out




def time_impl(params, obs, noise, kernels, *, steps, repeats, warmup=3):
    actions, first, times, compiles = time_sample(params, obs, noise, kernels, steps=steps, repeats=repeats,
                                                  warmup=warmup)
    median = statistics.median(times)
    return {"actions": actions, "first_s": first, "compile_s": first - median, "median_ms": median * 1e3,
            "min_ms": times[0] * 1e3, "compiles": compiles}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="full", choices=["full", "tiny"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--only", choices=["compact", "pallas"], default=None, help="time reference + this one only")
    args = p.parse_args()

    config = preset(args.preset)
    say(f"devices: {jax.devices()}; drawing {args.preset}-size random bf16 params on the device")
    stacked = random_weights(config, seed=0, dtype="bfloat16")
    jax.block_until_ready(stacked)
    t = time.perf_counter()
    unstacked = layer_stack.unstack_layers_cached(stacked)  # what prepare() does, once per checkpoint
    jax.block_until_ready(unstacked)
    unstack_s = time.perf_counter() - t
    say(f"unstacked the layers in {unstack_s:.2f}s")

    arrays = synthetic_arrays(config, batch=1, views=2, prompt_len=60, seed=0)
    obs = observation_from_arrays(arrays, config, where="gpu_layers")
    obs = dataclasses.replace(obs, images={k: jax.device_put(v) for k, v in obs.images.items()},
                              state=jax.device_put(obs.state))
    noise = synthetic_noise(config, batch=1, seed=0)

    rows, ref, ok = [], None, True
    for label, kernels, unstack in variants(args.only):
        say(f"{label}: compiling + timing")
        # stacked variants get the stacked params (their prepare keeps them); unstacked ones the converted copy
        r = time_impl(unstacked if unstack else stacked, obs, noise, kernels, steps=args.steps,
                      repeats=args.repeats)
        if ref is None:
            ref = r["actions"]
        r["cos"], r["rel"] = cosine(r["actions"], ref), rel_err(r["actions"], ref)
        good = r["cos"] >= BF16_MIN_COSINE and r["compiles"] == 0 and np.isfinite(r["actions"]).all()
        ok &= good
        rows.append((label, r, good))
        print(f"{label:28s} median {r['median_ms']:8.2f} ms  min {r['min_ms']:8.2f} ms  compile {r['compile_s']:6.1f} s"
              f"  cos {r['cos']:.6f}  rel {r['rel']:.2e}  recompiles {r['compiles']}  {'OK' if good else 'FAIL'}",
              flush=True)

    print(f"\n== gpu_layers: {jax.devices()[0].device_kind}, preset {args.preset}, bf16, batch 1, 2 views + 60 tokens, "
          f"{args.steps} steps, {args.repeats} repeats; unstack conversion {unstack_s:.2f}s ==")
    base = {label: r["median_ms"] for label, r, _ in rows}
    for label, r, good in rows:
        old = base.get(label.replace("unstacked", "stacked").replace("-fori", "-unrolled"))
        speed = f"x{old / r['median_ms']:.2f} vs stacked-unrolled" if old and "unstacked" in label else ""
        print(f"{label:28s} {r['median_ms']:8.2f} ms  compile {r['compile_s']:6.1f} s  cos {r['cos']:.6f}  "
              f"{'OK' if good else 'FAIL'}  {speed}")
    print("ALL OK" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""GPU timing of the prepare-time weight packing (pi05_jax.weight_packing) on the `pallas` fast path: each option
alone on top of the unpacked baseline, then all of them; per-phase times for the baseline and the default packing.

Full-size random bf16 weights drawn on the device (pi05_jax.bench.selection.random_weights, as scripts/gpu_layers.py),
2 views + 60-token prompt, batch 1, 10 steps. Every variant runs `prepare` (unstack + pack, cached per checkpoint
and options; the first call is timed as pack_s), then its one-jit sample: first call (compile_s = first - median),
warm-up, --repeats timed calls with block_until_ready (median, min), recompiles during the timed calls (must be 0),
cosine / relative error of the actions vs the reference implementation (cosine must be >= 0.9999).
Per-phase medians (vision, prefill, denoise jitted separately, as pi05_jax.bench does) for `baseline` and `default`.

    python scripts/gpu_packing.py                     # ~4 minutes on an H100 (mostly compiles)
    python scripts/gpu_packing.py --no-phases         # one-jit times only
    python scripts/gpu_packing.py --preset tiny --repeats 3   # a smoke test on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from gpu_common import cosine, rel_err, say

from pi05_jax import compile_cache, fast_path, sampler
from pi05_jax.bench.implementations import phased
from pi05_jax.bench.selection import random_weights
from pi05_jax.config import preset
from pi05_jax.observation import observation_from_arrays
from pi05_jax.synthetic import synthetic_arrays, synthetic_noise

BF16_MIN_COSINE = 0.9999
OFF = dict(fuse_gemma_qkv=False, fuse_siglip_qkv=False, pad_siglip_mlp=False, pad_siglip_heads=False)
# label -> packing fields (over FastPathOptions(attention="pallas")); "default" is FastPathOptions' defaults
VARIANTS = {
    "baseline": OFF,
    "gemma_qkv": {**OFF, "fuse_gemma_qkv": True},
    "siglip_qkv": {**OFF, "fuse_siglip_qkv": True},
    "siglip_mlp_pad": {**OFF, "pad_siglip_mlp": True},
    "siglip_qkv+heads": {**OFF, "fuse_siglip_qkv": True, "pad_siglip_heads": True},
    "default": {},
    "default+heads": {"pad_siglip_heads": True},
}
PHASED = ("baseline", "default")








def timed(fn, args, repeats: int, warmup: int = 3) -> dict:
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    with compile_cache.count_compilations() as compiles:
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return {"out": out, "compile_s": first - median, "median_ms": median * 1e3, "min_ms": min(times) * 1e3,
            "compiles": compiles.count}


def run_variant(label, fields, params, obs, noise, steps, repeats, with_phases):
    impl = fast_path.make_implementation(f"pack-{label}", fast_path.FastPathOptions(attention="pallas", **fields))
    t = time.perf_counter()
    jax.block_until_ready(impl.prepare(params, obs, steps)[0])  # unstack (cached) + pack (once per options)
    pack_s = time.perf_counter() - t
    ph = phased(impl, params, obs, steps)
    r = timed(jax.jit(ph.sample), (ph.params, obs, noise), repeats)
    r["pack_s"] = pack_s
    if with_phases:
        vision, prefill, denoise = jax.jit(ph.vision), jax.jit(ph.prefill), jax.jit(ph.denoise)
        views = vision(ph.params, obs)
        prefix = prefill(ph.params, obs, views)
        r["phases"] = {name: timed(fn, args, repeats)["median_ms"] for name, fn, args in (
            ("vision", vision, (ph.params, obs)), ("prefill", prefill, (ph.params, obs, views)),
            ("denoise", denoise, (ph.params, prefix, noise)))}
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="full", choices=["full", "tiny"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-phases", action="store_true", help="skip the per-phase timings")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), default=None, help="a subset of the variants")
    args = p.parse_args()

    config = preset(args.preset)
    say(f"devices: {jax.devices()}; drawing {args.preset}-size random bf16 params on the device")
    params = random_weights(config, seed=0, dtype="bfloat16")
    jax.block_until_ready(params)
    arrays = synthetic_arrays(config, batch=1, views=2, prompt_len=60, seed=0)
    obs = observation_from_arrays(arrays, config, where="gpu_packing")
    obs = dataclasses.replace(obs, images={k: jax.device_put(v) for k, v in obs.images.items()},
                              state=jax.device_put(obs.state))
    noise = jnp.asarray(synthetic_noise(config, batch=1, seed=0))

    say("reference implementation: compiling + running once")
    ref = np.asarray(sampler.sample_actions(params, obs, noise=noise, num_steps=args.steps, kernels="reference"),
                     np.float32)

    rows, ok = [], True
    for label, fields in VARIANTS.items():
        if args.only and label not in args.only:
            continue
        say(f"{label}: prepare + compile + timing")
        r = run_variant(label, fields, params, obs, noise, args.steps, args.repeats,
                        with_phases=not args.no_phases and label in PHASED)
        actions = np.asarray(r["out"], np.float32)
        r["cos"], r["rel"] = cosine(actions, ref), rel_err(actions, ref)
        good = r["cos"] >= BF16_MIN_COSINE and r["compiles"] == 0 and np.isfinite(actions).all()
        ok &= good
        rows.append((label, r, good))
        phases = "  ".join(f"{k} {v:6.2f}" for k, v in r.get("phases", {}).items())
        print(f"{label:18s} median {r['median_ms']:7.2f} ms  min {r['min_ms']:7.2f}  compile {r['compile_s']:5.1f} s  "
              f"pack {r['pack_s']:5.2f} s  cos {r['cos']:.6f}  rel {r['rel']:.2e}  recompiles {r['compiles']}  "
              f"{'OK' if good else 'FAIL'}  {phases}", flush=True)

    print(f"\n== gpu_packing: {jax.devices()[0].device_kind}, preset {args.preset}, pallas, bf16, batch 1, "
          f"2 views + 60 tokens, {args.steps} steps, {args.repeats} repeats ==")
    base = next((r["median_ms"] for label, r, _ in rows if label == "baseline"), None)
    print(f"{'variant':18s} {'one-jit ms':>10s} {'vs base':>8s} {'vision':>7s} {'prefill':>8s} {'denoise':>8s}  cos")
    for label, r, good in rows:
        ph = r.get("phases", {})
        cols = [f"{ph[k]:7.2f}" if k in ph else f"{'-':>7s}" for k in ("vision", "prefill", "denoise")]
        speed = f"x{base / r['median_ms']:.3f}" if base else "-"
        print(f"{label:18s} {r['median_ms']:10.2f} {speed:>8s} {cols[0]} {cols[1]:>8s} {cols[2]:>8s}  "
              f"{r['cos']:.6f} {'OK' if good else 'FAIL'}")
    print("ALL OK" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

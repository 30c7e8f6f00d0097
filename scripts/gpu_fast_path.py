"""GPU check and timing of the fast paths `compact` and `pallas` against `reference` (full-size pi0.5, random weights).

What it does (one process, params generated once, nothing written to disk):
1. bf16, batch 1, 10 steps, full-size random weights (preset "full"): for (2 views, 60-token prompt) and
   (3 views, 200-token prompt), end-to-end `sampler.sample_actions` time of reference / compact / pallas
   (first call = compile + run, then warm-up, then --repeats timed calls with block_until_ready; median and p90),
   XLA compilations during the timed calls (must be 0), and the cosine / relative error of the actions vs reference.
2. Bucket sizes: `pallas` with prefix buckets of 64 (default) and --buckets (default 128; 572 valid tokens give
   prefixes of 576 / 640 / 768 for buckets 64 / 128 / 256) on the 2-view case; with --loop-variants also
   `pallas` with a fori_loop over the steps and with the expert's layers unrolled.
3. float32 parity at real widths but 2 layers per stack (full model in fp32 is 13 GB and slow to compile),
   matmul precision "highest", batch 2 with mixed rows (3 views + 200 tokens, 1 view + 37 tokens), 3 steps:
   compact and pallas vs reference, relative error (the tolerance is 1e-4).

Images are device-resident (the model is timed, not the host->device copy of 1.8 MB of pixels); masks and prompt
are numpy, as a server receives them (the host-side plan reads them).

    python scripts/gpu_fast_path.py                 # ~3-4 minutes on an H100 (mostly compiles)
    python scripts/gpu_fast_path.py --buckets 128,256 --loop-variants --no-fp32
    python scripts/gpu_fast_path.py --preset tiny --repeats 3   # a smoke test on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from gpu_common import cosine, rel_err, say, time_sample

from checkpoints.random_init import random_params
from pi05_jax import compact_prefix, fast_path, sampler
from pi05_jax.config import preset
from pi05_jax.observation import observation_from_arrays
from pi05_jax.synthetic import synthetic_arrays, synthetic_noise

FP32_REL_TOL = 1e-4
BF16_MIN_COSINE = 0.9999  # vs reference in bf16: the project's bf16 bar (README: vs upstream bf16)
T0 = time.perf_counter()








def make_obs(config, *, batch=1, views=2, prompt_len=60, seed=0, row_overrides=None):
    arrays = synthetic_arrays(config, batch=batch, views=views, prompt_len=prompt_len, seed=seed)
    for row, (row_views, row_len) in (row_overrides or {}).items():
        for i, view in enumerate(config.image_keys):
            arrays[f"image_masks/{view}"][row] = i < row_views
            if i >= row_views:
                arrays[f"images/{view}"][row] = 0.0
        arrays["tokenized_prompt_mask"][row] = np.arange(config.max_token_len) < row_len
        arrays["tokenized_prompt"][row, row_len:] = 0
    obs = observation_from_arrays(arrays, config, where="gpu_fast_path")
    images = {k: jax.device_put(v) for k, v in obs.images.items()}
    return dataclasses.replace(obs, images=images, state=jax.device_put(obs.state))




def time_impl(params, obs, noise, kernels, *, steps, repeats, warmup=3):
    actions, first, times, compiles = time_sample(params, obs, noise, kernels, steps=steps, repeats=repeats,
                                                  warmup=warmup)
    return {"actions": actions, "first_s": first, "median_ms": statistics.median(times) * 1e3,
            "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3, "min_ms": times[0] * 1e3, "compiles": compiles}


def register_variants(args) -> list[str]:
    """Extra `pallas` variants timed on the 2-view case: bucket sizes, and with --loop-variants the loop options."""
    variants = {f"pallas-bucket{size}": fast_path.FastPathOptions(attention="pallas", bucket_size=size)
                for size in args.buckets}
    if args.loop_variants:
        variants["pallas-fori"] = fast_path.FastPathOptions(attention="pallas", unroll_steps=False)
        variants["pallas-layers"] = fast_path.FastPathOptions(attention="pallas", unroll_layers=True)
    for name, options in variants.items():
        sampler.register(fast_path.make_implementation(name, options))
    return list(variants)


def bf16_section(args, rows):
    config = preset(args.preset)
    say(f"generating {args.preset}-size random bf16 params on the host")
    params = jax.device_put(random_params(config, seed=0, dtype=ml_dtypes.bfloat16))
    jax.block_until_ready(params)
    say(f"params on {jax.devices()[0].device_kind}")
    noise = jnp.asarray(synthetic_noise(config))
    cases = [(2, 60), (3, 200)]
    for views, prompt_len in cases:
        obs = make_obs(config, views=views, prompt_len=prompt_len)
        plan = compact_prefix.plan_for(params, obs)
        ref = None
        kernels = ["reference", "compact", "pallas"]
        if views == 2:
            kernels += register_variants(args)
        for k in kernels:
            say(f"bf16 {views} views + {prompt_len} tokens: {k} (compiling)")
            try:
                r = time_impl(params, obs, noise, k, steps=10, repeats=args.repeats)
            except Exception as e:  # report and keep going: one failing variant must not hide the others
                rows.append((f"bf16 v{views} t{prompt_len}", k, f"FAILED {type(e).__name__}: {str(e)[:150]}"))
                say(f"  {k} failed: {type(e).__name__}: {e}")
                continue
            if k == "reference":
                ref = r
            plan_txt = "padded 968" if k == "reference" else (
                f"prefix {sampler.IMPLEMENTATIONS[k].prepare(params, obs, 10)[1].prefix_len}")
            cmp = "" if ref is None or k == "reference" else (
                f"cos {cosine(r['actions'], ref['actions']):.6f} rel {rel_err(r['actions'], ref['actions']):.2e}")
            speed = "" if ref is None else f"x{ref['median_ms'] / r['median_ms']:.2f}"
            finite = bool(np.all(np.isfinite(r["actions"])))
            timing = f"median {r['median_ms']:7.2f} ms  p90 {r['p90_ms']:7.2f}  min {r['min_ms']:7.2f} {speed:>6}"
            rows.append((f"bf16 v{views} t{prompt_len}", k,
                         f"{timing}  compile+1st {r['first_s']:5.1f}s  recompiles {r['compiles']}  {plan_txt}  {cmp}"
                         f"{'' if finite else '  NON-FINITE'}"))
            if ref is not None and k != "reference" and cosine(r["actions"], ref["actions"]) < BF16_MIN_COSINE:
                rows.append((f"bf16 v{views} t{prompt_len}", k, f"CHECK FAILED: cosine < {BF16_MIN_COSINE}"))
        say(f"  plan for {views} views + {prompt_len} tokens: {plan}")
    del params


def fp32_section(args, rows):
    full = preset(args.preset)
    config = dataclasses.replace(full, llm=dataclasses.replace(full.llm, depth=2),
                                 expert=dataclasses.replace(full.expert, depth=2),
                                 siglip=dataclasses.replace(full.siglip, depth=2))
    say("generating 2-layer full-width float32 params")
    params = jax.device_put(random_params(config, seed=1, dtype=np.float32))
    obs = make_obs(config, batch=2, views=3, prompt_len=200, seed=3, row_overrides={1: (1, 37)})
    noise = jnp.asarray(synthetic_noise(config, batch=2, seed=3))
    with jax.default_matmul_precision("highest"):
        out = {}
        for k in ("reference", "compact", "pallas"):
            say(f"fp32 2-layer batch 2 mixed rows: {k}")
            try:
                out[k] = np.asarray(sampler.sample_actions(params, obs, noise=noise, num_steps=3, kernels=k))
            except Exception as e:
                rows.append(("fp32 2-layer mixed", k, f"FAILED {type(e).__name__}: {str(e)[:150]}"))
        for k in ("compact", "pallas"):
            if k in out and "reference" in out:
                e = rel_err(out[k], out["reference"])
                verdict = "ok" if e <= FP32_REL_TOL else f"CHECK FAILED (> {FP32_REL_TOL})"
                rows.append(("fp32 2-layer mixed", k, f"rel err vs reference {e:.2e}  {verdict}"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--preset", default="full", choices=["full", "tiny"], help="tiny: a quick smoke test on the CPU")
    p.add_argument("--buckets", type=lambda t: [int(x) for x in t.split(",") if x], default=[128],
                   help="extra prefix bucket sizes to time with pallas, comma separated ('' for none; default 128)")
    p.add_argument("--loop-variants", action="store_true",
                   help="also time pallas with a fori_loop over steps and with the expert's layers unrolled")
    p.add_argument("--no-fp32", action="store_true", help="skip the float32 parity section")
    p.add_argument("--no-bf16", action="store_true", help="skip the full-size bf16 timing section")
    args = p.parse_args()
    say(f"jax {jax.__version__}, devices {jax.devices()}")
    rows: list[tuple[str, str, str]] = []
    try:
        if not args.no_fp32:
            fp32_section(args, rows)
        if not args.no_bf16:
            bf16_section(args, rows)
    finally:
        print(f"\n== fast path on {jax.devices()[0].device_kind} (jax {jax.__version__}), "
              f"{time.perf_counter() - T0:.0f} s in all ==")
        for case, k, text in rows:
            print(f"{case:<18} {k:<16} {text}")
    failed = [r for r in rows if "FAILED" in r[2]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Weight-only FP8 (`Fp8Options(activations="none")`) on the fast path vs bfloat16 and vs FP8 with quantized
activations, full size, random weights, 2 views + 60 prompt tokens, 10 steps, batch 1.

    python scripts/gpu_fp8_weight_only.py [--kernels pallas] [--preset full] [--only "dynamic act."]

One process: the bf16 params, then FP8 copies quantized in memory (`checkpoints.quantize.quantize_params`) for the
parts listed in VARIANTS; for each variant the sampler's first call (compile + run), the median of 20 warm calls
(p10 / p90), compilations during the timed calls, and the actions' cosine / relative error against bf16.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np
from gpu_common import cosine, random_model, rel_err, say, time_sample

from checkpoints.quantize import Plan, quantize_params
from pi05_jax.quantized import fp8_weight as f8

# label -> (parts quantized, activation scaling)
VARIANTS = {
    "fp8 weight-only, expert": (("expert",), "none"),
    "fp8 weight-only, all": (("siglip", "prefix", "expert"), "none"),
    # the compute-bound phases only (M ~ 576 prefill, M = 256 per view SigLIP); the expert stays bf16
    "fp8 dynamic act., prefix": (("prefix",), "dynamic"),
    "fp8 dynamic act., siglip + prefix": (("siglip", "prefix"), "dynamic"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="pallas")
    ap.add_argument("--preset", default="full")
    ap.add_argument("--only", default="", metavar="TEXT",
                    help="run only the variants whose label contains TEXT (and skip the mixed one)")
    args = ap.parse_args()
    _, built, noise = random_model(args.preset, args.kernels)

    def run(label, params):
        actions, first, times, compiles = time_sample(params, built.obs, noise, args.kernels, steps=10, repeats=20)
        say(f"{label:48s} first {first:5.1f} s  median {np.median(times) * 1e3:6.2f} ms [p10 {times[2] * 1e3:.2f} - "
            f"p90 {times[17] * 1e3:.2f}]  compiles {compiles}  finite {bool(np.isfinite(actions).all())}")
        return actions

    base = run("bf16", built.params)
    quantized = {}
    for label, spec in VARIANTS.items():
        if args.only and args.only not in label:
            continue
        parts, activations = spec
        if parts not in quantized:
            quantized[parts] = jax.block_until_ready(quantize_params(built.params, Plan(parts=parts)))
        params = f8.with_options(quantized[parts], activations=activations)
        actions = run(label, params)
        say(f"{'':48s} vs bf16: cosine {cosine(actions, base):.6f}, rel err {rel_err(actions, base):.2e}")
        del params
    if args.only:
        return
    # dynamic-activation FP8 for the compute-bound prefix (M ~ 576) with weight-only FP8 for the expert (M = 50)
    expert_prefix = jax.block_until_ready(quantize_params(built.params, Plan(parts=("expert", "prefix"))))
    mixed = jax.tree_util.tree_map_with_path(_expert_weight_only, expert_prefix,
                                             is_leaf=lambda x: isinstance(x, f8.Fp8Weight))
    actions = run("fp8 dynamic act., prefix; weight-only expert", mixed)
    say(f"{'':48s} vs bf16: cosine {cosine(actions, base):.6f}, rel err {rel_err(actions, base):.2e}")


def _expert_weight_only(path, leaf):
    """FP8 weights of the expert (keys with the suffix _1) weight-only, the others with dynamic activations."""
    if not isinstance(leaf, f8.Fp8Weight):
        return leaf
    expert = any(str(getattr(k, "key", "")).endswith("_1") for k in path)
    return f8.with_options(leaf, activations="none" if expert else "dynamic")


if __name__ == "__main__":
    main()

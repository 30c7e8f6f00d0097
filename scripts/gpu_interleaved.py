#!/usr/bin/env python3
"""Fast-path options timed interleaved on the GPU, so drift and run-to-run noise hit every variant alike.

Each entry of the chosen variant set is a FastPathOptions; each is prepared once (host plan, packed weights), its
one-jit sample compiled, then timed the way `pi05 bench` times the total (the specialized jitted sample, host prep
excluded, block_until_ready): --rounds rounds, each timing --per-round calls of every variant in turn. Reports per
variant the median and p10 / p90 over all timed calls, the median of its per-round medians, and the actions' cosine
/ relative error against the first variant (full size, random bf16 weights, 2 views + 60 prompt tokens, 10 steps).

    python scripts/gpu_interleaved.py [--set pdl] [--rounds 10] [--per-round 10]

--set picks one of VARIANT_SETS: "pdl" (the expert's matmuls as Mosaic GPU PDL kernels, pallas_kernels.pdl_matmul,
with and without their griddepcontrol instructions), "tiles" (the cross-attention's and the prefill attention's
tiles, SigLIP's attention in Pallas: options the noisier script harness could not separate).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from gpu_common import VersusFirst, random_model, say

from pallas_kernels import gqa_cross_attention, ragged_prefill_attention
from pi05_jax import fast_path

P = dict(attention="pallas")
TILES = gqa_cross_attention.BlockSizes()
VARIANT_SETS = {
    "pdl": {
        "default": fast_path.FastPathOptions(**P),
        "Mosaic PDL projections": fast_path.FastPathOptions(**P, expert_projections="mosaic"),
        "Mosaic PDL GeGLU": fast_path.FastPathOptions(**P, expert_geglu="mosaic"),
        "Mosaic PDL projections + GeGLU": fast_path.FastPathOptions(**P, expert_projections="mosaic",
                                                                    expert_geglu="mosaic"),
        "Mosaic projections + GeGLU, no PDL": fast_path.FastPathOptions(**P, expert_projections="mosaic",
                                                                        expert_geglu="mosaic", expert_pdl=False),
        "Mosaic PDL all + fused residual norm": fast_path.FastPathOptions(**P, expert_projections="mosaic",
                                                                          expert_geglu="mosaic",
                                                                          expert_residual_norm="pallas"),
        "Mosaic PDL all, action rows not padded": fast_path.FastPathOptions(**P, expert_projections="mosaic",
                                                                            expert_geglu="mosaic", pad_action_rows=0),
        "default, action rows padded to 64": fast_path.FastPathOptions(**P, pad_action_rows=64),
        "default, again": fast_path.FastPathOptions(**P, bucket_size=64),
    },
    "tiles": {
        "default": fast_path.FastPathOptions(**P),
        "prefill attention 32-row blocks": fast_path.FastPathOptions(
            **P, prefill_attention_tiles=ragged_prefill_attention.BlockSizes(block_rows=32)),
        "prefill attention 128-key blocks, 1 stage": fast_path.FastPathOptions(
            **P, prefill_attention_tiles=ragged_prefill_attention.BlockSizes(block_k=128, num_stages=1)),
        "SigLIP attention in Pallas (heads padded 72 -> 128)": fast_path.FastPathOptions(
            **P, vision_attention="pallas", pad_siglip_heads=True),
        "cross-attention 64-key blocks, 2 stages (session 3 default)": fast_path.FastPathOptions(
            **P, cross_attention_tiles=TILES),
        "cross-attention 128-key blocks, 256-key splits, 1 stage": fast_path.FastPathOptions(
            **P, cross_attention_tiles=dataclasses.replace(TILES, block_k=128, split_k=256, num_stages=1)),
        "default, again": fast_path.FastPathOptions(**P, bucket_size=64),
    },
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="full")
    ap.add_argument("--set", default="pdl", choices=sorted(VARIANT_SETS), help="which variants to time")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=10)
    args = ap.parse_args()
    sel, built, noise = random_model(args.preset, "pallas")
    noise = jnp.asarray(noise)
    steps = sel.steps
    runs = {}
    for i, (label, options) in enumerate(VARIANT_SETS[args.set].items()):
        impl = fast_path.make_implementation(f"interleaved{i}", options)
        prepared, plan = impl.prepare(built.params, built.obs, steps)
        fn = jax.jit(impl.specialize(plan).sample, static_argnums=3)
        t = time.perf_counter()
        try:
            actions = np.asarray(jax.block_until_ready(fn(prepared, built.obs, noise, steps)), np.float32)
        except Exception as e:  # e.g. tiles over the shared-memory limit: report it, time the others
            say(f"{label}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        say(f"{label}: compiled and ran in {time.perf_counter() - t:.1f} s")
        for _ in range(3):
            jax.block_until_ready(fn(prepared, built.obs, noise, steps))
        runs[label] = (fn, prepared, actions, [], [])
    for _ in range(args.rounds):
        for fn, prepared, _, times, medians in runs.values():
            mine = []
            for _ in range(args.per_round):
                t = time.perf_counter()
                jax.block_until_ready(fn(prepared, built.obs, noise, steps))
                mine.append(time.perf_counter() - t)
            times.extend(mine)
            medians.append(float(np.median(mine)))
    first = VersusFirst()
    for label, (_, _, actions, times, medians) in runs.items():
        ts = np.sort(np.asarray(times)) * 1e3
        line = (f"{label:42s} median {np.median(ts):6.2f} ms [p10 {np.percentile(ts, 10):.2f} - p90 "
                f"{np.percentile(ts, 90):.2f}]  median of round medians {np.median(medians) * 1e3:6.2f}  "
                f"({len(ts)} calls)")
        line += first.suffix(actions)
        say(line)


if __name__ == "__main__":
    main()

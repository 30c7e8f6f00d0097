#!/usr/bin/env python3
"""Fast-path options side by side on the GPU: each VARIANTS entry is a FastPathOptions registered as its own
implementation and timed through `sampler.sample_actions` in one process (full size, random bf16 weights,
2 views + 60 prompt tokens, 10 steps, batch 1): first call (compile + run), median of 20 warm calls with p10 / p90,
compilations during the timed calls, and the actions' cosine / relative error against the first variant.

    python scripts/gpu_fast_path_options.py [--preset full] [--runs 20]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
from gpu_common import VersusFirst, random_model, say, time_sample

from pi05_jax import fast_path, sampler

VARIANTS = {
    "pallas (default)": fast_path.FastPathOptions(attention="pallas"),
    "cross-attention Pallas combine": fast_path.FastPathOptions(attention="pallas", cross_attention_combine="pallas"),
    "SigLIP heads padded 72->128": fast_path.FastPathOptions(attention="pallas", pad_siglip_heads=True),
    "padded heads + Pallas combine": fast_path.FastPathOptions(attention="pallas", pad_siglip_heads=True,
                                                               cross_attention_combine="pallas"),
    "pallas (default), again": fast_path.FastPathOptions(attention="pallas", bucket_size=64),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="full")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    _, built, noise = random_model(args.preset, "pallas")
    first_actions = VersusFirst()
    for i, (label, options) in enumerate(VARIANTS.items()):
        impl = fast_path.make_implementation(f"variant{i}", options)
        sampler.register(impl)
        actions, first, times, compiles = time_sample(built.params, built.obs, noise, impl.name, steps=10,
                                                      repeats=args.runs)
        p10, p90 = (times[min(len(times) - 1, int(f * len(times)))] * 1e3 for f in (0.1, 0.9))
        line = (f"{label:34s} first {first:5.1f} s  median {np.median(times) * 1e3:6.2f} ms [p10 {p10:.2f} - "
                f"p90 {p90:.2f}]  compiles {compiles}")
        line += first_actions.suffix(actions)
        say(line)


if __name__ == "__main__":
    main()

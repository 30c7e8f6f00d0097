#!/usr/bin/env python3
"""`pi05 profile` of the default `pallas` next to a FastPathOptions variant registered for this process only.

    python scripts/gpu_profile_variant.py prefetch [pi05 profile args...]

VARIANTS names the options; the variant is registered as `pallas-<name>` and profiled with the given arguments
(`--kernels` is set to `pallas,pallas-<name>`).
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pi05_jax import fast_path, sampler
from pi05_jax.cli import main

VARIANTS = {
    "prefetch": fast_path.FastPathOptions(attention="pallas", cross_attention_prefetch=True),
    "mosaic-no-pdl": fast_path.FastPathOptions(attention="pallas", expert_projections="mosaic", expert_geglu="mosaic",
                                               expert_pdl=False),
}

if __name__ == "__main__":
    name, rest = sys.argv[1], sys.argv[2:]
    sampler.register(fast_path.make_implementation(f"pallas-{name}", VARIANTS[name]))
    sys.exit(main(["profile", *rest, "--kernels", f"pallas,pallas-{name}"]))

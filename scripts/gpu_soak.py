"""H100 soak for the fast path (issue 6): N consecutive `pallas` inferences at full size (random bf16 weights), each
with new noise; counts NaN/Inf and reports device memory in use after the first call and after the last.
With `deployed`, the random stacked weights are first converted to per-layer buffers freeing each stacked leaf and then
packed for the fast path (the originals dropped), as `runtime.Model.load` does, so the memory figures are those of a
deployment (plus the allocator's peak).
Usage: python scripts/gpu_soak.py [N] [kernels] [deployed]"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from pi05_jax import fast_path, layer_stack, sampler
from pi05_jax.bench.selection import Selection, build
from pi05_jax.commands.common import Progress
from pi05_jax.config import preset
from pi05_jax.synthetic import synthetic_noise


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    kernels = sys.argv[2] if len(sys.argv) > 2 else "pallas"
    say = Progress()
    name = "full" if jax.default_backend() == "gpu" else "tiny"
    sel = Selection(config=preset(name), source=f"preset:{name}", checkpoint=None, preset=name, views=2,
                    prompt_len=60, steps=10, batch=1, dtype="bfloat16", kernels=(kernels,), runs=1, device="auto",
                    platform=jax.default_backend(), seed=0)
    built = build(sel, say)
    params, obs = built.params, built.obs
    if len(sys.argv) > 3 and sys.argv[3] == "deployed":
        params = fast_path.pack_for(kernels, layer_stack.unstack_layers(params, consume=True))
        built = None  # drop the stacked tree's last reference
    noises = [jax.device_put(synthetic_noise(sel.config, seed=i)) for i in range(16)]

    def in_use(key="bytes_in_use"):
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get(key, 0) / 2**30

    bad, first_mem, t0 = 0, None, time.perf_counter()
    for i in range(n):
        a = sampler.sample_actions(params, obs, noise=noises[i % len(noises)], num_steps=10,
                                   kernels=kernels)
        bad += int(not np.all(np.isfinite(np.asarray(a))))
        if i == 0:
            first_mem = in_use()
    last_mem = in_use()
    print(f"{n} consecutive {kernels} inferences ({name}, bf16, 2 views + 60 tokens, 10 steps): {bad} with NaN/Inf; "
          f"device memory in use after call 1: {first_mem:.3f} GiB, after call {n}: {last_mem:.3f} GiB; "
          f"{(time.perf_counter() - t0) / n * 1e3:.2f} ms per call including the copy to the host; allocator peak "
          f"{in_use('peak_bytes_in_use'):.3f} GiB", flush=True)
    return 1 if bad or last_mem > first_mem + 0.01 else 0


if __name__ == "__main__":
    sys.exit(main())

"""Device time of a jitted call on the GPU, by CUPTI (jax.experimental.mosaic.gpu.profiler): the kernels' own time,
no launch or host gaps. Shared by the probe and comparison scripts in this folder."""

from __future__ import annotations

import statistics

import jax


def device_us(fn, *args, repeats: int = 20) -> float:
    """Median over `repeats` calls of the summed kernel time of fn(*args), in microseconds, after 3 warm-up calls."""
    from jax.experimental.mosaic.gpu import profiler

    for _ in range(3):
        jax.block_until_ready(fn(*args))
    return statistics.median(profiler.measure(fn)(*args)[1] for _ in range(repeats)) * 1e3

"""Helpers shared by the GPU measurement scripts (run as `python scripts/<name>.py`, so this is importable as
`gpu_common`): progress lines, the two accuracy metrics, and the warm timing of one `sample_actions` setup."""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from pi05_jax import compile_cache, sampler

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def median_seconds(fn, *args, repeats: int = 30, warmup: int = 3) -> float:
    """Median wall time of `fn(*args)` with block_until_ready, after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def time_sample(params, obs, noise, kernels, *, steps, repeats, warmup=3):
    """First call (compile + run), `warmup` calls, then `repeats` timed calls with block_until_ready.
    Returns (actions float32, first-call seconds, sorted timed seconds, XLA compilations during the timed calls)."""

    def call():
        return jax.block_until_ready(sampler.sample_actions(params, obs, noise=noise, num_steps=steps,
                                                            kernels=kernels))

    t = time.perf_counter()
    actions = call()
    first = time.perf_counter() - t
    for _ in range(warmup):
        call()
    times = []
    with compile_cache.count_compilations() as compiles:
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
    return np.asarray(actions, np.float32), first, sorted(times), compiles.count

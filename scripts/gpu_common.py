"""Helpers shared by the GPU measurement scripts (run as `python scripts/<name>.py`, so this is importable as
`gpu_common`): progress lines, the random model and inputs they time, the two accuracy metrics, and the warm timing
of one `sample_actions` setup."""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from pi05_jax import compile_cache, sampler

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def random_model(preset_name: str, kernels: str = "pallas"):
    """`pi05 bench`'s inputs for a preset: random weights (real architecture, never zeros), batch 1, 2 valid views +
    60 prompt tokens, 10 steps, bf16. Returns (selection, built: .params / .obs, noise [1, T, A])."""
    from pi05_jax.bench.selection import Selection, build
    from pi05_jax.commands.common import Progress
    from pi05_jax.config import preset
    from pi05_jax.synthetic import synthetic_noise

    say(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    sel = Selection(config=preset(preset_name), source=f"preset:{preset_name}", checkpoint=None, preset=preset_name,
                    views=2, prompt_len=60, steps=10, batch=1, dtype="bfloat16", kernels=(kernels,), runs=1,
                    device="auto", platform=jax.default_backend(), seed=0)
    return sel, build(sel, Progress()), synthetic_noise(sel.config, seed=0)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def versus(actions, base, label: str = "first") -> str:
    """The two accuracy metrics of `actions` against `base`, for a result line."""
    return f"  vs {label}: cos {cosine(actions, base):.6f} rel {rel_err(actions, base):.1e}"


class VersusFirst:
    """Accuracy against the first variant reported: `suffix(actions)` is "" for the first (kept as the base), then
    `versus(actions, base)` for every later one."""

    def __init__(self):
        self.base = None

    def suffix(self, actions) -> str:
        if self.base is None:
            self.base = actions
            return ""
        return versus(actions, self.base)


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

"""Random-weight pi0.5 params in openpi's exact layout (for `pi05 demo` and benchmarks; never zeros).

Scales follow each layer's fan-in so activations stay O(1) through the stack, and norm/adaRMS weights are small
non-zero values, so every code path (gates, shifts, scales) does real work.
"""

from __future__ import annotations

import pathlib

import numpy as np

from checkpoints.demo_tokenizer import write_demo_tokenizer
from checkpoints.layout import param_shapes, unflatten
from checkpoints.openpi_io import save_params
from pi05_jax.config import Pi05Config


def _fan_in(path: str, shape: tuple[int, ...]) -> int:
    parent = path.split("/")[-2]
    last = path.split("/")[-1]
    if parent in ("q_einsum", "q_einsum_1", "kv_einsum", "kv_einsum_1") or last in ("gating_einsum", "linear"):
        return shape[-2]  # [.., D, H] / [.., D, F] / [.., F, D]
    if parent in ("attn_vec_einsum", "attn_vec_einsum_1", "out"):
        return shape[-3] * shape[-2]  # [.., N, H, D]
    if parent in ("query", "key", "value"):
        return shape[-3]  # [.., D, N, H]
    if parent == "embedding":
        return int(np.prod(shape[:3]))  # [p, p, 3, D]
    return shape[-2]  # Dense kernels [.., in, out]


def init_scale(path: str, shape: tuple[int, ...]) -> float:
    """The standard deviation `random_params` draws the parameter at `path` (openpi's key) with."""
    last = path.split("/")[-1]
    if last in ("scale", "bias") or last == "pos_embedding":
        return 0.02
    if last == "input_embedding":
        return 1.0 / np.sqrt(shape[-1])
    if "norm_1/Dense_0" in path:
        return 0.02  # adaRMS modulation: small, so (1 + scale) stays near 1 and gates near 0.02-ish
    return 1.0 / np.sqrt(_fan_in(path, shape))


def random_params(config: Pi05Config, *, seed: int = 0, dtype=np.float32) -> dict:
    """Nested params dict (numpy, host) with openpi's key names; normal(0, 1/sqrt(fan_in)) weights."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in sorted(param_shapes(config).items()):
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(init_scale(path, shape))
        flat[path] = w.astype(dtype)
    return unflatten(flat)


def random_norm_stats(action_dim: int, state_dim: int, *, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def stats(n):
        mean = rng.normal(size=n) * 0.3
        std = 0.2 + rng.random(n)
        return {"mean": mean, "std": std, "q01": mean - 2 * std, "q99": mean + 2 * std}

    return {"state": stats(state_dim), "actions": stats(action_dim)}


def write_random_checkpoint(path: str | pathlib.Path, config: Pi05Config, *, seed: int = 0,
                            value_suffix: bool = False, dtype=np.float32, params=None) -> pathlib.Path:
    """A complete openpi-layout checkpoint directory: params, a 'demo' norm-stats asset and a small tokenizer
    that fits the vocabulary (`<path>/tokenizer.model`, `checkpoints.demo_tokenizer`). `params`: weights drawn
    elsewhere (host arrays of the config's shapes) instead of `random_params(config, seed, dtype)`."""
    if params is None:
        params = random_params(config, seed=seed, dtype=dtype)
    stats = random_norm_stats(config.action_dim, 8, seed=seed)
    root = save_params(path, params, value_suffix=value_suffix, norm_stats={"demo": stats})
    write_demo_tokenizer(root, config.vocab_size)
    return root

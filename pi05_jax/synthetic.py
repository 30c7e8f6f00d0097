"""Synthetic model inputs for demos and benchmarks: smooth random images, a prompt of a chosen length, noise.

Never zeros (timings and numerics on zeros lie). Views are valid in slot order: `views=2` fills base and left wrist.
"""

from __future__ import annotations

import numpy as np

from pi05_jax.config import IMAGE_RESOLUTION, Pi05Config
from pi05_jax.observation import Observation

BOS_ID = 2


def synthetic_arrays(config: Pi05Config, *, batch: int = 1, views: int = 2, prompt_len: int = 60,
                     seed: int = 0) -> dict[str, np.ndarray]:
    if not 1 <= views <= len(config.image_keys):
        raise ValueError(f"views must be in 1..{len(config.image_keys)}, got {views=}")
    if not 1 <= prompt_len <= config.max_token_len:
        raise ValueError(f"prompt_len must be in 1..{config.max_token_len}, got {prompt_len=}")
    rng = np.random.default_rng(seed)
    r = IMAGE_RESOLUTION
    yy, xx = np.meshgrid(np.linspace(-1, 1, r), np.linspace(-1, 1, r), indexing="ij")
    arrays: dict[str, np.ndarray] = {}
    for i, view in enumerate(config.image_keys):
        freq = rng.uniform(1, 4, size=(batch, 1, 1, 3))
        phase = rng.uniform(0, np.pi, size=(batch, 1, 1, 3))
        img = 0.7 * np.sin(freq * (xx[None, :, :, None] + yy[None, :, :, None] * (i + 1)) + phase)
        img += 0.1 * rng.standard_normal(img.shape)
        valid = i < views
        arrays[f"images/{view}"] = np.clip(img, -1, 1).astype(np.float32) if valid else np.zeros_like(img, np.float32)
        arrays[f"image_masks/{view}"] = np.full((batch,), valid)
    tokens = np.zeros((batch, config.max_token_len), np.int32)
    tokens[:, :prompt_len] = rng.integers(4, config.vocab_size, size=(batch, prompt_len))
    tokens[:, 0] = BOS_ID
    mask = np.zeros((batch, config.max_token_len), bool)
    mask[:, :prompt_len] = True
    arrays["tokenized_prompt"] = tokens
    arrays["tokenized_prompt_mask"] = mask
    arrays["state"] = rng.uniform(-1, 1, size=(batch, config.action_dim)).astype(np.float32)
    return arrays


def synthetic_observation(config: Pi05Config, **kwargs) -> Observation:
    from pi05_jax.observation import observation_from_arrays

    return observation_from_arrays(synthetic_arrays(config, **kwargs), config, where="synthetic observation")


def synthetic_noise(config: Pi05Config, batch: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    return rng.standard_normal((batch, config.action_horizon, config.action_dim), dtype=np.float32)

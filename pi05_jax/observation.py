"""The model-level observation (openpi's `Observation` for pi0.5) and its validation.

Every check names the key, the shape or dtype it got and what it expected; nothing is silently broadcast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

from pi05_jax.config import IMAGE_RESOLUTION, Pi05Config


class ObservationError(ValueError):
    """Bad model input; the message names the offending key."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Observation:
    images: dict  # view -> float32 [B, 224, 224, 3] in [-1, 1]
    image_masks: dict  # view -> bool [B]
    state: jax.Array  # float32 [B, action_dim] (pi0.5 reads state through the prompt; kept for parity)
    tokenized_prompt: jax.Array  # int32 [B, max_token_len]
    tokenized_prompt_mask: jax.Array  # bool [B, max_token_len]

    @property
    def batch_size(self) -> int:
        return int(self.state.shape[0])


def _require(arrays: Mapping[str, np.ndarray], key: str, where: str) -> np.ndarray:
    if key not in arrays:
        raise ObservationError(f"{where}: missing key {key!r}")
    return np.asarray(arrays[key])


def _check(value: np.ndarray, key: str, shape: tuple, kinds: str, where: str, dtype_name: str) -> None:
    if value.dtype.kind not in kinds:
        raise ObservationError(f"{where}: key {key!r} has dtype {value.dtype}, expected {dtype_name}")
    if value.shape != shape:
        raise ObservationError(f"{where}: key {key!r} has shape {value.shape}, expected {shape}")


def observation_from_arrays(
    arrays: Mapping[str, np.ndarray], config: Pi05Config, *, where: str = "observation"
) -> Observation:
    """Build and validate an Observation from flat keys `images/<view>`, `image_masks/<view>`, `state`,
    `tokenized_prompt`, `tokenized_prompt_mask` (the layout of the shared `model_cases.npz` under `<case>/in/`)."""
    state = _require(arrays, "state", where)
    if state.ndim != 2:
        raise ObservationError(f"{where}: key 'state' has shape {state.shape}, expected [batch, {config.action_dim}]")
    b = state.shape[0]
    _check(state, "state", (b, config.action_dim), "f", where, "float32")
    if not np.all(np.isfinite(state)):
        raise ObservationError(f"{where}: key 'state' holds NaN or Inf")
    r = IMAGE_RESOLUTION
    images, masks = {}, {}
    for view in config.image_keys:
        img = _require(arrays, f"images/{view}", where)
        _check(img, f"images/{view}", (b, r, r, 3), "f", where, "float32 in [-1, 1]")
        if not np.all(np.isfinite(img)):
            raise ObservationError(f"{where}: key 'images/{view}' holds NaN or Inf")
        mask = _require(arrays, f"image_masks/{view}", where)
        _check(mask, f"image_masks/{view}", (b,), "b", where, "bool")
        images[view] = img.astype(np.float32)
        masks[view] = mask
    extra = sorted(
        k.split("/", 1)[1] for k in arrays if k.startswith(("images/", "image_masks/"))
        if k.split("/", 1)[1] not in config.image_keys
    )
    if extra:
        raise ObservationError(f"{where}: unknown camera view {extra[0]!r}; this model has {list(config.image_keys)}")
    if not any(np.any(m) for m in masks.values()):
        raise ObservationError(f"{where}: every image mask is False; at least one view must be valid")
    if not np.all(np.any(np.stack(list(masks.values()), axis=1), axis=1)):
        raise ObservationError(f"{where}: some batch row has no valid view (keys 'image_masks/*')")
    tok = _require(arrays, "tokenized_prompt", where)
    _check(tok, "tokenized_prompt", (b, config.max_token_len), "iu", where, "int32")
    tmask = _require(arrays, "tokenized_prompt_mask", where)
    _check(tmask, "tokenized_prompt_mask", (b, config.max_token_len), "b", where, "bool")
    if tok.min(initial=0) < 0 or tok.max(initial=0) >= config.vocab_size:
        raise ObservationError(
            f"{where}: key 'tokenized_prompt' has ids outside [0, {config.vocab_size}) "
            f"(min {tok.min()}, max {tok.max()})"
        )
    return Observation(
        images=images,
        image_masks=masks,
        state=state.astype(np.float32),
        tokenized_prompt=tok.astype(np.int32),
        tokenized_prompt_mask=tmask,
    )


def check_noise(noise: np.ndarray, batch: int, config: Pi05Config, *, key: str = "noise") -> np.ndarray:
    noise = np.asarray(noise)
    want = (batch, config.action_horizon, config.action_dim)
    if noise.dtype.kind != "f":
        raise ObservationError(f"key {key!r} has dtype {noise.dtype}, expected float32")
    if noise.shape != want:
        raise ObservationError(f"key {key!r} has shape {noise.shape}, expected {want}")
    if not np.all(np.isfinite(noise)):
        raise ObservationError(f"key {key!r} holds NaN or Inf")
    return noise.astype(np.float32)


def concat_observations(observations) -> Observation:
    """Validated observations (host arrays) concatenated along the batch axis, in order: the batched call of a
    server that groups requests. Rows stay independent: each keeps its own views, image masks and prompt."""
    observations = list(observations)
    if not observations:
        raise ObservationError("concat_observations needs at least one observation")
    views = list(observations[0].images)
    for i, obs in enumerate(observations[1:], 1):
        if list(obs.images) != views or list(obs.image_masks) != views:
            raise ObservationError(f"observation {i} has camera views {list(obs.images)}, observation 0 has {views}")

    def cat(get):
        return np.concatenate([np.asarray(get(obs)) for obs in observations], axis=0)

    return Observation(
        images={v: cat(lambda o, v=v: o.images[v]) for v in views},
        image_masks={v: cat(lambda o, v=v: o.image_masks[v]) for v in views},
        state=cat(lambda o: o.state),
        tokenized_prompt=cat(lambda o: o.tokenized_prompt),
        tokenized_prompt_mask=cat(lambda o: o.tokenized_prompt_mask),
    )

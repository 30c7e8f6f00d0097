"""Upstream openpi's `Pi0.sample_actions` (pi05=True) as functions over the params pytree: the `reference`
implementation's phases, and the pieces of it the fast path reuses (Euler times, time conditioning).

It pushes every camera slot through SigLIP and all padded prefix slots through the LLM, and uses the masked einsum
attention. It is the ground truth every fast path is compared against (`pi05_jax.implementations`).

Axis legend: B batch, P patches per view, S prefix len, T action tokens (horizon), A action dim, D width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pi05_jax.model import gemma, siglip
from pi05_jax.model.linear import promoted_dense
from pi05_jax.observation import Observation

TIME_MIN_PERIOD = 4e-3
TIME_MAX_PERIOD = 4.0


def params_dtype(params) -> jnp.dtype:
    return params["PaliGemma"]["llm"]["embedder"]["input_embedding"].dtype


def euler_times(num_steps: int) -> np.ndarray:
    """The times upstream's while-loop visits: t starts at 1.0 and adds dt = -1/num_steps in float32 while
    t >= -dt/2. Simulated here in float32 so the unrolled/fori loop sees bit-identical times."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps=}")
    dt = np.float32(-1.0 / num_steps)
    t, times = np.float32(1.0), []
    while t >= -dt / 2:
        times.append(t)
        t = np.float32(t + dt)
    return np.asarray(times, np.float32)


def posemb_sincos(pos, embedding_dim: int, min_period: float, max_period: float):
    fraction = jnp.linspace(0.0, 1.0, embedding_dim // 2)
    period = min_period * (max_period / min_period) ** fraction
    x = jnp.einsum("i,j->ij", pos, 1.0 / period * 2 * jnp.pi, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


def time_conditioning(params, time):
    """adaRMS conditioning of the expert for times [B]: sincos -> Linear -> swish -> Linear -> swish."""
    width = params["action_in_proj"]["kernel"].shape[-1]
    emb = posemb_sincos(time, width, TIME_MIN_PERIOD, TIME_MAX_PERIOD)
    emb = jax.nn.swish(promoted_dense(emb, params["time_mlp_in"]["kernel"], params["time_mlp_in"]["bias"]))
    return jax.nn.swish(promoted_dense(emb, params["time_mlp_out"]["kernel"], params["time_mlp_out"]["bias"]))


def encode_views(params, obs: Observation, dtype) -> dict:
    """Upstream's vision phase: every camera slot through SigLIP, masked or not -> {view: [B,P,D]}."""
    img_params = params["PaliGemma"]["img"]
    return {view: siglip.encode_images(img_params, images, dtype=dtype) for view, images in obs.images.items()}


def reference_vision(params, obs: Observation) -> dict:
    return encode_views(params, obs, params_dtype(params))


def embed_prefix_padded(params, obs: Observation, image_tokens: dict, dtype):
    """Upstream's prefix: every view's 256 tokens then the text embeddings -> tokens [B,S,D], mask [B,S]."""
    tokens, masks = [], []
    for view, t in image_tokens.items():
        tokens.append(t)
        masks.append(jnp.repeat(obs.image_masks[view][:, None], t.shape[1], axis=1))
    tokens.append(gemma.embed_tokens(params["PaliGemma"]["llm"], obs.tokenized_prompt, dtype))
    masks.append(obs.tokenized_prompt_mask)
    return jnp.concatenate(tokens, axis=1).astype(dtype), jnp.concatenate(masks, axis=1)


def _reference_prefix_attend(prefix_mask) -> gemma.Attend:
    mask = prefix_mask[:, None, :] & prefix_mask[:, :, None]
    return lambda q, k, v: gemma.masked_attention(q, k, v, mask)


def _reference_suffix_attend(prefix_mask, suffix_len):
    b = prefix_mask.shape[0]
    full = jnp.concatenate(
        [jnp.repeat(prefix_mask[:, None, :], suffix_len, axis=1), jnp.ones((b, suffix_len, suffix_len), bool)],
        axis=-1,
    )

    def attend(q, ck, cv, k, v):
        return gemma.masked_attention(q, jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1), full)

    return attend


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefix:
    """What denoising needs from the prefix: the KV cache, which slots are valid, and where the suffix starts."""

    kv: tuple  # (k, v), each [L, B, S, K, H]
    mask: jax.Array  # bool [B, S]: which cache slots hold valid tokens
    suffix_start: jax.Array  # int32 [B]: number of valid prefix tokens (the first action token's position)


def reference_prefill(params, obs: Observation, image_tokens: dict) -> Prefix:
    dtype = params_dtype(params)
    tokens, mask = embed_prefix_padded(params, obs, image_tokens, dtype)
    positions = jnp.cumsum(mask, axis=1) - 1
    kv = gemma.prefill(params["PaliGemma"]["llm"], tokens, positions, _reference_prefix_attend(mask))
    return Prefix(kv=kv, mask=mask, suffix_start=jnp.sum(mask, axis=-1))


def velocity(params, prefix: Prefix, x_t, time, *, modulations=None, suffix_attend=None):
    """The flow velocity v(x_t, t) [B,T,A] given the prefix cache; time is a scalar or [B]."""
    llm = params["PaliGemma"]["llm"]
    dtype = params_dtype(params)
    b, horizon, _ = x_t.shape
    if modulations is None:
        cond = time_conditioning(params, jnp.broadcast_to(time, (b,)))
        modulations = gemma.expert_modulations(llm, cond, dtype)
    tokens = promoted_dense(x_t, params["action_in_proj"]["kernel"], params["action_in_proj"]["bias"])
    positions = prefix.suffix_start[:, None] + jnp.arange(horizon)[None, :]
    attend = suffix_attend or _reference_suffix_attend(prefix.mask, horizon)
    out = gemma.expert_forward(llm, tokens.astype(dtype), modulations, prefix.kv, positions, attend)
    return promoted_dense(out, params["action_out_proj"]["kernel"], params["action_out_proj"]["bias"])


def euler_loop(step: Callable, noise, num_steps: int):
    """x <- x + dt * v(x, t, i) over upstream's times (dt = -1/num_steps)."""
    times = euler_times(num_steps)
    dt = -1.0 / num_steps

    def body(i, x):
        return x + dt * step(x, jnp.asarray(times)[i], i)

    return jax.lax.fori_loop(0, len(times), body, noise)


def reference_denoise(params, prefix: Prefix, noise, num_steps: int):
    return euler_loop(lambda x, t, _i: velocity(params, prefix, x, t), noise, num_steps)


@jax.jit
def reference_intermediates(params, obs: Observation, noise):
    """Upstream's debugging intermediates: image tokens per view, prefix tokens, prefix K/V, velocity at t=1."""
    dtype = params_dtype(params)
    image_tokens = encode_views(params, obs, dtype)
    tokens, _ = embed_prefix_padded(params, obs, image_tokens, dtype)
    prefix = reference_prefill(params, obs, image_tokens)
    v_t1 = velocity(params, prefix, noise, jnp.float32(1.0))
    return {"image_tokens": image_tokens, "prefix_tokens": tokens, "prefix_k": prefix.kv[0],
            "prefix_v": prefix.kv[1], "velocity_t1": v_t1}


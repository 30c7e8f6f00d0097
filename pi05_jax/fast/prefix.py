"""The fast path's prefix: SigLIP on the valid camera views only, the prefix compacted to a bucket, and prefill.

Upstream runs every view slot through SigLIP and all 3*256 + 200 = 968 padded prefix slots through the LLM, then
masks the invalid ones out of attention (a masked key gets probability exactly 0). Skipping them is therefore exact:
- vision: per batch row the valid views are gathered to the front (slot order kept) and only `num_views` slots go
  through SigLIP, `num_views` = the most valid views of any row (a static int the host reads from the image masks);
  rows with fewer valid views carry padding slots that are masked.
- prefix: the valid image tokens, then the valid text tokens, are packed to the front of each row; the row's length
  n is its number of valid tokens and its positions are 0..n-1, which is exactly upstream's cumsum(mask) - 1 over
  its valid tokens. The array length is the bucket (a static int >= every row's n); slots past n hold zeros, are
  never attended to as keys, and their outputs are never read.

Axis legend: B batch, V view slots run through SigLIP, P patches per view, S prefix len (the bucket), D width,
N q heads, H head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pi05_jax.fast.ops import Ops
from pi05_jax.model import gemma
from pi05_jax.model.weights import weight_einsum
from pi05_jax.observation import Observation

# The prefix length is the longest row's valid-token count rounded up to a multiple of this. 64 is the row tile of
# the Hopper tensor-core matmuls (wgmma M = 64) and a natural block of the attention kernels, so a bucket never ends
# in a partial tile; it wastes at most 63 token rows (< 11% of LIBERO's 2 views + ~60-token prompt = ~572 tokens),
# and prompts of 1..200 tokens map to at most 4 executables per (batch, valid views, num_steps). A larger bucket
# means fewer executables to compile and more padded work. A bucket is capped
# at the valid views' padded length (views * 256 + 200), so it never does more work than that layout.
DEFAULT_BUCKET_SIZE = 64


@dataclasses.dataclass(frozen=True)
class PrefixPlan:
    """The static shape decisions of one executable, made on the host from the observation's masks."""

    num_views: int  # view slots run through SigLIP: the most valid views of any batch row
    prefix_len: int  # compacted prefix length (the bucket): >= every row's valid-token count

    def __post_init__(self):
        if self.num_views < 1 or self.prefix_len < 1:
            raise ValueError(f"PrefixPlan needs num_views >= 1 and prefix_len >= 1, got {self}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ViewTokens:
    """SigLIP output of the gathered view slots."""

    tokens: jax.Array  # [B, V, P, D]: valid views first, in slot order
    valid: jax.Array  # bool [B, V]: which gathered slots hold a valid view


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompactPrefix:
    """What denoising needs from the compacted prefix: the bucket-long KV cache and each row's valid length."""

    # (k, v), each [L, B, S, K, H] (unstacked layers: a tuple of L arrays [B, S, K, H]); rows past a batch row's
    # length are padding
    kv: tuple
    lengths: jax.Array  # int32 [B]: valid prefix tokens per row (also the first action token's position)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tokens_per_view(params, obs: Observation) -> int:
    """SigLIP tokens per view: (image side / patch size)^2, from the patch-embedding kernel and the image shape."""
    patch = params["PaliGemma"]["img"]["embedding"]["kernel"].shape[0]
    _, h, w, _ = next(iter(obs.images.values())).shape
    return (h // patch) * (w // patch)


def host_valid_counts(obs: Observation, tokens_per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """(valid views per row, valid prefix tokens per row) from the observation's masks, on the host."""
    masks = np.stack([np.asarray(obs.image_masks[v]) for v in obs.images], axis=1).astype(bool)  # [B, slots]
    views = masks.sum(axis=1)
    text = np.asarray(obs.tokenized_prompt_mask).astype(bool).sum(axis=1)
    return views, views * tokens_per_image + text


def plan_for(params, obs: Observation, bucket_size: int = DEFAULT_BUCKET_SIZE) -> PrefixPlan:
    """The smallest plan that holds every row of `obs`: its most valid views V and its longest prefix rounded up to
    the bucket, but never longer than V views + the whole prompt (no more work than the padded layout of V views:
    3 views + 200 prompt slots stay 968, not 1024)."""
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size=}")
    per_view = tokens_per_view(params, obs)
    views, lengths = host_valid_counts(obs, per_view)
    num_views = max(1, int(views.max()))
    cap = num_views * per_view + obs.tokenized_prompt_mask.shape[1]
    return PrefixPlan(num_views=num_views, prefix_len=min(round_up(max(1, int(lengths.max())), bucket_size), cap))


def full_plan(params, obs: Observation) -> PrefixPlan:
    """A plan that holds any observation of these shapes (every view slot, every prompt slot): what the phases use
    when called without host-side information, e.g. inside someone else's jit."""
    slots = len(obs.images)
    padded = slots * tokens_per_view(params, obs) + obs.tokenized_prompt_mask.shape[1]
    return PrefixPlan(num_views=slots, prefix_len=padded)


def encode_valid_views(obs: Observation, num_views: int, dtype, *, encode) -> ViewTokens:
    """SigLIP on `num_views` slots per row: each row's valid views gathered to the front, in slot order.

    `encode(images [B*V, h, w, c], dtype) -> tokens [B*V, P, D]` runs the tower (`pi05_jax.fast.vision`, or the
    vision-engine bridge's engine: bridges.vision_bridge)."""
    keys = list(obs.images)
    if not 1 <= num_views <= len(keys):
        raise ValueError(f"num_views must be in 1..{len(keys)}, got {num_views=}")
    images = jnp.stack([obs.images[k] for k in keys], axis=1)  # [B, slots, h, w, c]
    masks = jnp.stack([jnp.asarray(obs.image_masks[k], bool) for k in keys], axis=1)  # [B, slots]
    if num_views < len(keys):
        order = jnp.argsort(~masks, axis=1, stable=True)[:, :num_views]  # valid slots first, slot order kept
        images = jnp.take_along_axis(images, order[:, :, None, None, None], axis=1)
        masks = jnp.take_along_axis(masks, order, axis=1)
    b, v, h, w, c = images.shape
    tokens = encode(images.reshape(b * v, h, w, c), dtype)
    return ViewTokens(tokens=tokens.reshape(b, v, *tokens.shape[1:]), valid=masks)


def compact_prefix_tokens(params, obs: Observation, views: ViewTokens, prefix_len: int, dtype):
    """Pack each row's valid image tokens then valid text tokens to the front -> tokens [B,S,D], lengths [B].

    Slots past a row's length are zeros (finite, so a masked key can never turn 0 * garbage into NaN)."""
    b, v, p, d = views.tokens.shape
    image = views.tokens.reshape(b, v * p, d).astype(dtype)
    image_mask = jnp.repeat(views.valid, p, axis=1)
    text = gemma.embed_tokens(params["PaliGemma"]["llm"], obs.tokenized_prompt, dtype)
    source = jnp.concatenate([image, text], axis=1)  # [B, V*P + text, D]
    mask = jnp.concatenate([image_mask, jnp.asarray(obs.tokenized_prompt_mask, bool)], axis=1)
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
    order = jnp.argsort(~mask, axis=1, stable=True)[:, :prefix_len]  # valid tokens first, in prefix order
    if prefix_len > order.shape[1]:  # a bucket longer than the semi-padded source: pad with any index, zeroed below
        order = jnp.pad(order, ((0, 0), (0, prefix_len - order.shape[1])))
    tokens = jnp.take_along_axis(source, order[:, :, None], axis=1)
    valid = jnp.arange(prefix_len)[None, :] < lengths[:, None]
    return jnp.where(valid[:, :, None], tokens, jnp.zeros((), dtype)), lengths


def prefill(llm_params, tokens, lengths, ops: Ops) -> CompactPrefix:
    """The prefix LLM over the compacted tokens [B,S,D] on packed, unstacked layers: positions 0..S-1 (upstream's
    cumsum(mask) - 1 on the valid slots), attention through `ops.prefix_attend` (keys < lengths[b]); the last layer
    computes K and V only (its attention output and MLP feed nothing). Returns per-layer tuples (k, v)."""
    b, s, _ = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
    layers = llm_params["layers"]
    x, ks, vs = tokens, [], []
    for p in layers[:-1]:
        attn = p["attn"]
        h = gemma.rms_norm(x, p["pre_attention_norm"]["scale"])
        q, k, v = ops.prefix_qkv(h, attn, positions)
        x = x + weight_einsum("BTNH,NHD->BTD", ops.prefix_attend(q, k, v, lengths), attn["attn_vec_einsum"]["w"])
        h = gemma.rms_norm(x, p["pre_ffw_norm"]["scale"])
        x = x + gemma.feed_forward(h, p["mlp"])
        ks.append(k)
        vs.append(v)
    last = layers[-1]
    h = gemma.rms_norm(x, last["pre_attention_norm"]["scale"])
    k, v = gemma.kv_only(h, last["attn"], "", positions)
    return CompactPrefix(kv=((*ks, k), (*vs, v)), lengths=lengths)

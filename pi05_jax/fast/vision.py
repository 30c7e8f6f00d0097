"""The fast path's SigLIP tower: upstream's encoder blocks on packed, unstacked weights (pi05_jax.fast.packing),
the QKV projection and the attention through `Ops`. A zero-padded MLP needs no code of its own: the padded units
contribute exactly 0.

Axis legend: B images, P patches, D width, N heads, H head dim.
"""

from __future__ import annotations

from pi05_jax.fast.ops import Ops
from pi05_jax.model import siglip
from pi05_jax.model.linear import dense


def encode_images(img_params, images, *, dtype, ops: Ops):
    """images float32 [B, 224, 224, 3] in [-1, 1] -> image tokens [B, P, llm_width] in `dtype`."""
    tr = img_params["Transformer"]
    x = siglip.patch_embed(img_params, images).astype(dtype)
    for lp in tr["encoderblock"]:
        y = siglip.layer_norm(x, lp["LayerNorm_0"]["scale"], lp["LayerNorm_0"]["bias"], dtype)
        q, k, v = ops.vision_qkv(y, lp["MultiHeadDotProductAttention_0"], dtype)
        x = siglip.out_proj_and_mlp(x, ops.vision_attend(q, k, v, dtype), lp, dtype)
    x = siglip.layer_norm(x, tr["encoder_norm"]["scale"], tr["encoder_norm"]["bias"], dtype)
    return dense(x, img_params["head"]["kernel"], img_params["head"]["bias"], dtype)

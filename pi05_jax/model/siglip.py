"""SigLIP vision tower (openpi's big_vision port, pool_type="none", head to the LLM width).

Params are `params["PaliGemma"]["img"]` with upstream's key names.
Axis legend: B batch (images), P patches (256), D width, N heads, H head dim, F mlp dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pi05_jax.model.layer_stack import scan_or_unroll
from pi05_jax.model.linear import dense, gelu_tanh
from pi05_jax.model.weights import weight_einsum

LN_EPS = 1e-6


def layer_norm(x, scale, bias, dtype):
    """flax.linen.LayerNorm: float32 statistics (fast variance), output in `dtype`."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(jnp.square(xf), axis=-1, keepdims=True) - jnp.square(mean))
    y = (xf - mean) * (jax.lax.rsqrt(var + LN_EPS) * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y.astype(dtype)


def patch_embed(img_params, images):
    """Conv(patch, stride=patch, VALID) as a matmul over flattened patches, in float32 as upstream. -> [B,P,D]."""
    kernel = img_params["embedding"]["kernel"].astype(jnp.float32)  # [p, p, 3, D]
    p = kernel.shape[0]
    b, h, w, c = images.shape
    x = images.astype(jnp.float32).reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
    x = jnp.einsum("BPC,CD->BPD", x, kernel.reshape(p * p * c, -1), precision=jax.lax.Precision.HIGHEST)
    x = x + img_params["embedding"]["bias"].astype(jnp.float32)
    return x + img_params["pos_embedding"].astype(jnp.float32)


def out_proj_and_mlp(x, o, lp, dtype):
    """The rest of a block after attention: output projection + residual, then LayerNorm -> MLP + residual."""
    mha = lp["MultiHeadDotProductAttention_0"]
    x = x + (weight_einsum("BTNH,NHD->BTD", o, mha["out"]["kernel"]) + mha["out"]["bias"].astype(dtype))
    y = layer_norm(x, lp["LayerNorm_1"]["scale"], lp["LayerNorm_1"]["bias"], dtype)
    mlp = lp["MlpBlock_0"]
    y = gelu_tanh(dense(y, mlp["Dense_0"]["kernel"], mlp["Dense_0"]["bias"], dtype))
    y = dense(y, mlp["Dense_1"]["kernel"], mlp["Dense_1"]["bias"], dtype)
    return x + y


def qkv(y, mha, dtype):
    """q (scaled by 1/sqrt(H)), k, v [B,P,N,H] from the normed input and openpi's query / key / value weights."""

    def proj(name):
        return weight_einsum("BPD,DNH->BPNH", y, mha[name]["kernel"]) + mha[name]["bias"].astype(dtype)

    q, k, v = proj("query"), proj("key"), proj("value")
    return q / jnp.sqrt(q.shape[-1]).astype(dtype), k, v


def encoder_block(x, lp, dtype):
    """One pre-LN transformer block; `lp` is one layer's slice of `Transformer/encoderblock`."""
    y = layer_norm(x, lp["LayerNorm_0"]["scale"], lp["LayerNorm_0"]["bias"], dtype)
    q, k, v = qkv(y, lp["MultiHeadDotProductAttention_0"], dtype)
    o = attention(q, k, v, dtype)
    return out_proj_and_mlp(x, o, lp, dtype)


def attention(q, k, v, dtype):
    """Upstream's SigLIP attention on pre-scaled q: einsum logits, softmax, einsum. q/k/v [B,P,N,H] -> [B,P,N,H]."""
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("BNTS,BSNH->BTNH", probs, v)


def encode_images(img_params, images, *, dtype):
    """images float32 [B, 224, 224, 3] in [-1, 1] -> image tokens [B, 256, llm_width] in `dtype`."""
    x = patch_embed(img_params, images).astype(dtype)
    tr = img_params["Transformer"]

    def body(x, xs):
        return encoder_block(x, xs[0], dtype), None

    # Stacked encoder blocks: a lax.scan; unstacked (pi05_jax.model.layer_stack): unrolled over the per-layer dicts.
    x, _ = scan_or_unroll(body, x, tr["encoderblock"])
    x = layer_norm(x, tr["encoder_norm"]["scale"], tr["encoder_norm"]["bias"], dtype)
    return dense(x, img_params["head"]["kernel"], img_params["head"]["bias"], dtype)

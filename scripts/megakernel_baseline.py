"""The megakernel's card baseline: today's `pallas` expert over the same operands as
pallas_kernels.expert_megakernel's main() (imported from there at run time, with scripts/ on sys.path, as
device_time is). It lives here, not in the kernel module, because it runs the product's fast path
(pi05_jax.fast), which imports the kernel module: the package keeps no import cycle."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import gqa_cross_attention, ragged_prefill_attention
from pallas_kernels.expert_megakernel import (
    ATTN_GATE,
    ATTN_SCALE,
    ATTN_SHIFT,
    FFW_GATE,
    FFW_SCALE,
    FFW_SHIFT,
    HEAD,
    TOKENS,
)
from pallas_kernels.skinny_matmul import SkinnyBlockSizes
from pi05_jax.fast import denoise, ops
from pi05_jax.model import gemma


def pallas_expert_chain(x, wqkv, wo, w_t, wd, kp, vp, mods, final, length):
    """Today's `pallas` expert, the product's own code: pi05_jax.fast.denoise.expert_layer with the `pallas` Ops
    (fused QKV GEMM + RoPE, the Pallas GQA cross-attention, XLA out-proj and residual, upstream's adaRMS norms, the
    Pallas geglu_matmul on w_t [L, 2, F, D] + XLA down), chained over the layers on the 50 real rows in bf16 as the
    model runs them (x bf16 between ops) -> (final-normed h bf16 [T, D], x float32 [T, D])."""
    layout = ops.Layout(gemma_qkv="fused", expert_qkv="fused", expert_gating="transposed", siglip_qkv="fused")
    chosen = ops.ops_for("pallas", layout, ragged_prefill_attention.BlockSizes(), gqa_cross_attention.BlockSizes(),
                         SkinnyBlockSizes())
    layers, d, q_cols = wqkv.shape
    heads = q_cols // HEAD - 2
    lengths = jnp.asarray(length, jnp.int32).reshape(1)
    positions = lengths[:, None] + jnp.arange(TOKENS, dtype=jnp.int32)[None, :]

    def mod(layer, row):
        return mods[layer, row].astype(jnp.bfloat16)[None, None, :]

    xb = x[None, :TOKENS].astype(jnp.bfloat16)
    h = gemma.ada_rms_norm(xb, mod(0, ATTN_SCALE), mod(0, ATTN_SHIFT))
    for layer in range(layers):
        p = {"attn": {"qkv_einsum_1": {"w": wqkv[layer].reshape(d, 1, heads + 2, HEAD)},
                      "attn_vec_einsum_1": {"w": wo[layer].reshape(heads, HEAD, d)}},
             "mlp_1": {"gating_einsum_t": w_t[layer], "linear": wd[layer]}}
        nxt = ((mod(layer + 1, ATTN_SCALE), mod(layer + 1, ATTN_SHIFT)) if layer + 1 < layers else
               (final[0].astype(jnp.bfloat16)[None, None, :], final[1].astype(jnp.bfloat16)[None, None, :]))
        xb, h = denoise.expert_layer(
            xb, h, p, kp[layer][None, :, None], vp[layer][None, :, None],
            tuple(mod(layer, r) for r in (ATTN_SCALE, ATTN_SHIFT, ATTN_GATE)),
            tuple(mod(layer, r) for r in (FFW_SCALE, FFW_SHIFT, FFW_GATE)), nxt, positions, lengths, chosen)
    return h[0], xb[0].astype(jnp.float32)

"""The fast path's weight layout: exact restructurings of the per-layer weights (the unstacked layout of
`pi05_jax.model.layer_stack`), made once per checkpoint so each layer launches fewer and better-shaped GEMMs.

- Gemma QKV fusion (prefix stream and expert): `q_einsum` [N,D,H] and `kv_einsum` [2,K,D,H] -> one weight
  `qkv_einsum{suffix}/w` [D, K, G+2, H] (per kv head k: its G query heads, then k's key, then k's value), so a layer
  runs one GEMM [D, (N+2K)*H]. Query head n = k*G + g, as `gemma.masked_attention` groups them. Every output column
  is the same dot product as before (only the GEMM's shape changes): exact up to the GEMM's float32 accumulation
  order. The prefix stream's last layer is left unfused: prefill computes only its K and V.
- SigLIP QKV fusion: `query`/`key`/`value` kernels [D,N,H] and biases [N,H] -> `qkv` kernel [D,3,N,H] and bias
  [3,N,H]; one GEMM [D, 3*N*H] plus one bias add. Exact as above.
- SigLIP MLP padding: mlp_dim F -> the next multiple of PAD_MULTIPLE (4304 -> 4352) with zero columns in Dense_0
  kernel/bias and zero rows in Dense_1's kernel: a padded unit is gelu(0 + 0) = 0 and adds 0 * 0 to every output, so
  the result is exact (up to accumulation order) and every GEMM tile is whole. Same keys, same code.
- Expert gating transpose (`pallas` only): the expert's `gating_einsum` [2, D, F] stored as `gating_einsum_t`
  [2, F, D], the layout `pallas_kernels.skinny_matmul.geglu_matmul` streams. The same numbers in another order.

Packing is idempotent: already packed parts pass through unchanged, so params packed once (`runtime.Model.load`
frees the originals) go through the implementation's prepare as they are.
Quantized weight leaves (`pi05_jax.quantized`: objects with `.einsum`, not arrays) are never packed: such a layer
keeps openpi's keys, and `pi05_jax.fast.ops.Layout` records that so the ops chosen for it read those keys.

Axis legend: D width, N q heads, K kv heads, G group (N // K), H head dim, F mlp dim, C the q/k/v axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pi05_jax.leaf_cache import LeafCache
from pi05_jax.model import layer_stack

GEMMA_STREAMS = ("", "_1")  # the prefix stream's keys, the expert's keys
PAD_MULTIPLE = 128  # SigLIP's mlp_dim rounds up to this (whole 128-column GEMM tiles)


def is_array(w) -> bool:
    """A plain weight array (packable), as opposed to a quantized weight object."""
    return isinstance(w, jax.Array | np.ndarray)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_axis(a, axis: int, size: int):
    a = jnp.asarray(a)
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, widths)


# --- Gemma -----------------------------------------------------------------------------------------------------------


def fuse_gemma_qkv_weights(q_w, kv_w):
    """q_einsum/w [N,D,H] and kv_einsum/w [2,K,D,H] -> qkv [D, K, G+2, H] (see the module docstring)."""
    q_w, kv_w = jnp.asarray(q_w), jnp.asarray(kv_w)
    n, d, h = q_w.shape
    c, k, d2, h2 = kv_w.shape
    if c != 2 or d2 != d or h2 != h or n % k:
        raise ValueError(f"q_einsum {q_w.shape} and kv_einsum {kv_w.shape} are not [N,D,H] and [2,K,D,H] with N % K "
                         f"== 0")
    q = q_w.reshape(k, n // k, d, h)  # [K, G, D, H]
    packed = jnp.concatenate([q, kv_w[0][:, None], kv_w[1][:, None]], axis=1)  # [K, G+2, D, H]
    return jnp.transpose(packed, (2, 0, 1, 3))


def _pack_gemma_stream(attn: dict, suffix: str) -> dict:
    q_key, kv_key = f"q_einsum{suffix}", f"kv_einsum{suffix}"
    if q_key not in attn or kv_key not in attn:
        return attn
    q_w, kv_w = attn[q_key]["w"], attn[kv_key]["w"]
    if not (is_array(q_w) and is_array(kv_w)):
        return attn  # quantized: kept as openpi's two weights
    out = {k: v for k, v in attn.items() if k not in (q_key, kv_key)}
    out[f"qkv_einsum{suffix}"] = {"w": fuse_gemma_qkv_weights(q_w, kv_w)}
    return out


def _transpose_gating(mlp: dict) -> dict:
    w = mlp.get("gating_einsum")
    if w is None or not is_array(w):
        return mlp  # quantized (or already transposed)
    out = {k: v for k, v in mlp.items() if k != "gating_einsum"}
    out["gating_einsum_t"] = jnp.swapaxes(jnp.asarray(w), 1, 2)
    return out


def pack_gemma_layers(layers: tuple, *, transpose_expert_gating: bool) -> tuple:
    """Every layer's q/kv fused, both streams (the prefix stream of the last layer is kept: it computes KV only);
    with transpose_expert_gating, the expert's gating_einsum stored [2, F, D] as `gating_einsum_t`."""
    out = []
    for i, layer in enumerate(layers):
        layer = dict(layer)
        attn = layer["attn"]
        for suffix in GEMMA_STREAMS:
            if suffix == "" and i == len(layers) - 1:
                continue
            attn = _pack_gemma_stream(attn, suffix)
        layer["attn"] = attn
        if transpose_expert_gating:
            layer["mlp_1"] = _transpose_gating(layer["mlp_1"])
        out.append(layer)
    return tuple(out)


# --- SigLIP ----------------------------------------------------------------------------------------------------------


def _pack_siglip_attention(mha: dict) -> dict:
    names = ("query", "key", "value")
    if not all(n in mha for n in names):
        return mha  # already fused
    kernels = [mha[n]["kernel"] for n in names]
    if not all(is_array(w) for w in kernels):
        return mha
    kernel = jnp.stack([jnp.asarray(w) for w in kernels], axis=1)  # [D, 3, N, H]
    bias = jnp.stack([jnp.asarray(mha[n]["bias"]) for n in names], axis=0)  # [3, N, H]
    out = {k: v for k, v in mha.items() if k not in names}
    out["qkv"] = {"kernel": kernel, "bias": bias}
    return out


def _pad_siglip_mlp(mlp: dict) -> dict:
    w0, w1 = mlp["Dense_0"]["kernel"], mlp["Dense_1"]["kernel"]
    if not (is_array(w0) and is_array(w1)):
        return mlp
    f = w0.shape[1]
    fp = _round_up(f, PAD_MULTIPLE)
    if fp == f:
        return mlp
    return {**mlp,
            "Dense_0": {**mlp["Dense_0"], "kernel": _pad_axis(w0, 1, fp), "bias": _pad_axis(mlp["Dense_0"]["bias"],
                                                                                               0, fp)},
            "Dense_1": {**mlp["Dense_1"], "kernel": _pad_axis(w1, 0, fp)}}


def pack_siglip_layers(layers: tuple) -> tuple:
    out = []
    for layer in layers:
        layer = dict(layer)
        layer["MultiHeadDotProductAttention_0"] = _pack_siglip_attention(layer["MultiHeadDotProductAttention_0"])
        layer["MlpBlock_0"] = _pad_siglip_mlp(layer["MlpBlock_0"])
        out.append(layer)
    return tuple(out)


# --- the params ------------------------------------------------------------------------------------------------------


def pack_weights(params, *, transpose_expert_gating: bool) -> dict:
    """params (both layer groups unstacked) in the fast path's layout (new dicts along the changed paths; all other
    leaves shared)."""
    llm = layer_stack.get_path(params, layer_stack.LLM_PATH)
    img = layer_stack.get_path(params, layer_stack.IMG_PATH)
    if not (layer_stack.is_unstacked(llm) and layer_stack.is_unstacked(img)):
        raise ValueError("pack_weights needs both layer groups unstacked (pi05_jax.model.layer_stack.unstack_layers)")
    params = layer_stack.replace_path(params, layer_stack.LLM_PATH, pack_gemma_layers(
        llm, transpose_expert_gating=transpose_expert_gating))
    return layer_stack.replace_path(params, layer_stack.IMG_PATH, pack_siglip_layers(img))


_PACKED = LeafCache()  # (transpose_expert_gating, unstacked layer groups) -> the two packed groups


def pack_weights_cached(params, *, transpose_expert_gating: bool) -> dict:
    """`pack_weights`, once per (checkpoint, layout) (pi05_jax.leaf_cache): a repeated call returns the same packed
    arrays."""
    paths = (layer_stack.LLM_PATH, layer_stack.IMG_PATH)
    groups = tuple(layer_stack.get_path(params, path) for path in paths)

    def pack():
        packed = pack_weights(params, transpose_expert_gating=transpose_expert_gating)
        return tuple(layer_stack.get_path(packed, path) for path in paths)

    for path, group in zip(paths, _PACKED.get(groups, pack, tag=transpose_expert_gating), strict=True):
        params = layer_stack.replace_path(params, path, group)
    return params

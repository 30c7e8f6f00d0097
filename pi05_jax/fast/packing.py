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
Quantized weight leaves (`pi05_jax.quantized`: objects with `.einsum`, not arrays): FP8 q/kv weights (Gemma) and
query/key/value kernels (SigLIP) are fused the same way, into one `Fp8Weight` whose rows (output channels) are the
parts' rows in the fused order, each with its own per-output-channel scale: the e4m3 values and scales are only
concatenated, so every output column is the same dequantized dot product as before (exact up to the GEMM's float32
accumulation order), and the activation, quantized once per token for the one GEMM, is what each part quantized
on its own (the same input rows; a calibrated static scale is fused only where the parts' scales are equal, as
calibration makes them). Everything else quantized (FP4/FP8 MLPs; q/kv weights whose scaling or options differ) is
never packed: it keeps openpi's keys, and `pi05_jax.fast.ops.Layout` records that so the ops chosen for it read
those keys.

Axis legend: D width, N q heads, K kv heads, G group (N // K), H head dim, F mlp dim, C the q/k/v axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pi05_jax.leaf_cache import LeafCache
from pi05_jax.model import layer_stack
from pi05_jax.quantized.fp8_weight import Fp8Layout, Fp8Weight

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


# --- FP8 weights: fused along their output channels ------------------------------------------------------------


def _same_act_scale(weights) -> tuple[bool, object]:
    """(whether the weights' static activation scales agree, the common one): all None, or equal concrete values
    (traced ones cannot be compared: not fused)."""
    scales = [w.act_scale for w in weights]
    if all(s is None for s in scales):
        return True, None
    if any(s is None for s in scales):
        return False, None
    try:
        host = [np.asarray(s) for s in scales]
    except jax.errors.JAXTypeError:  # traced (prepare inside someone's jit)
        return False, None
    return all(np.array_equal(h, host[0]) for h in host[1:]), scales[0]


def _fusable_fp8(weights, contracts: tuple[tuple[int, ...], ...]) -> bool:
    """Whether these per-layer FP8 weights can be fused along their outputs: Fp8Weight, one layer each, contracting
    the axes the model's einsum does (`contracts`), the same options and static activation scale."""
    if not all(isinstance(w, Fp8Weight) and w.lead == 0 for w in weights):
        return False
    if tuple(w.layout.contract for w in weights) != contracts:
        return False
    if any(w.options != weights[0].options for w in weights[1:]):
        return False
    return _same_act_scale(weights)[0]


def fuse_gemma_qkv_fp8(q_w: Fp8Weight, kv_w: Fp8Weight) -> Fp8Weight:
    """FP8 q_einsum/w [N,D,H] and kv_einsum/w [2,K,D,H] (one layer each) -> one Fp8Weight of layout [D, K, G+2, H]
    contracting D: the rows (output channels, per kv head k: its G query heads, then k's key, then its value) and
    their scales concatenated, exactly `fuse_gemma_qkv_weights`'s order."""
    n, d, h = q_w.layout.shape
    c, k, d2, h2 = kv_w.layout.shape
    if c != 2 or d2 != d or h2 != h or n % k or q_w.layout.contract != (1,) or kv_w.layout.contract != (2,):
        raise ValueError(f"{q_w.name} {q_w.layout} and {kv_w.name} {kv_w.layout} are not [N,D,H] and [2,K,D,H] "
                         f"contracting D with N % K == 0")
    g = n // k
    qv, qs = q_w.matrix()  # rows (n, h) with n = k*G + g
    kvv, kvs = kv_w.matrix()  # rows (c, k, h)
    values = jnp.concatenate([qv.reshape(k, g, h, d), kvv.reshape(2, k, h, d).swapaxes(0, 1)], axis=1)  # [K,G+2,H,D]
    scales = jnp.concatenate([qs.reshape(k, g, h), kvs.reshape(2, k, h).swapaxes(0, 1)], axis=1)  # [K, G+2, H]
    _, act_scale = _same_act_scale((q_w, kv_w))
    return Fp8Weight.from_matrix(values.reshape(-1, d), scales.reshape(-1), Fp8Layout((d, k, g + 2, h), (0,)),
                                 act_scale=act_scale, options=q_w.options,
                                 name=q_w.name.replace("q_einsum", "qkv_einsum") + " (fused q_einsum + kv_einsum)")


def fuse_siglip_qkv_fp8(kernels) -> Fp8Weight:
    """FP8 query/key/value kernels [D,N,H] (one layer each) -> one Fp8Weight of layout [D, 3, N, H] contracting D
    (the three weights' rows and scales concatenated: the order of the float `qkv` kernel)."""
    shape = kernels[0].layout.shape
    if any(w.layout.shape != shape or w.layout.contract != (0,) for w in kernels):
        raise ValueError(f"SigLIP query/key/value {[w.layout for w in kernels]} are not three [D,N,H] contracting D")
    d, n, h = shape
    values = jnp.concatenate([w.matrix()[0] for w in kernels], axis=0)  # [3*N*H, D]
    scales = jnp.concatenate([w.matrix()[1] for w in kernels], axis=0)
    _, act_scale = _same_act_scale(kernels)
    name = kernels[0].name.replace("query", "qkv") + " (fused query + key + value)"
    return Fp8Weight.from_matrix(values, scales, Fp8Layout((d, 3, n, h), (0,)), act_scale=act_scale,
                                 options=kernels[0].options, name=name)


def _gemma_stream_fusable(attn: dict, suffix: str) -> bool:
    q_key, kv_key = f"q_einsum{suffix}", f"kv_einsum{suffix}"
    if q_key not in attn or kv_key not in attn:
        return False
    q_w, kv_w = attn[q_key]["w"], attn[kv_key]["w"]
    return (is_array(q_w) and is_array(kv_w)) or _fusable_fp8((q_w, kv_w), ((1,), (2,)))


def _pack_gemma_stream(attn: dict, suffix: str) -> dict:
    q_key, kv_key = f"q_einsum{suffix}", f"kv_einsum{suffix}"
    if not _gemma_stream_fusable(attn, suffix):
        return attn  # already fused, or quantized in a way that does not fuse: kept as openpi's two weights
    q_w, kv_w = attn[q_key]["w"], attn[kv_key]["w"]
    out = {k: v for k, v in attn.items() if k not in (q_key, kv_key)}
    fuse = fuse_gemma_qkv_weights if is_array(q_w) else fuse_gemma_qkv_fp8
    out[f"qkv_einsum{suffix}"] = {"w": fuse(q_w, kv_w)}
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
    # A stream is fused in every layer or in none (the fast path runs one layout: pi05_jax.fast.ops.layout_of)
    fused = {sfx: all(_gemma_stream_fusable(layer["attn"], sfx) or f"qkv_einsum{sfx}" in layer["attn"]
                      for layer in (layers[:-1] if sfx == "" else layers)) for sfx in GEMMA_STREAMS}
    out = []
    for i, layer in enumerate(layers):
        layer = dict(layer)
        attn = layer["attn"]
        for suffix in GEMMA_STREAMS:
            if (suffix == "" and i == len(layers) - 1) or not fused[suffix]:
                continue
            attn = _pack_gemma_stream(attn, suffix)
        layer["attn"] = attn
        if transpose_expert_gating:
            layer["mlp_1"] = _transpose_gating(layer["mlp_1"])
        out.append(layer)
    return tuple(out)


# --- SigLIP ----------------------------------------------------------------------------------------------------------


_SIGLIP_QKV = ("query", "key", "value")


def _siglip_fusable(mha: dict) -> bool:
    if not all(n in mha for n in _SIGLIP_QKV):
        return False  # already fused
    kernels = tuple(mha[n]["kernel"] for n in _SIGLIP_QKV)
    return all(is_array(w) for w in kernels) or _fusable_fp8(kernels, ((0,),) * 3)


def _pack_siglip_attention(mha: dict) -> dict:
    names = _SIGLIP_QKV
    if not _siglip_fusable(mha):
        return mha
    kernels = [mha[n]["kernel"] for n in names]
    kernel = (jnp.stack([jnp.asarray(w) for w in kernels], axis=1) if is_array(kernels[0])  # [D, 3, N, H]
              else fuse_siglip_qkv_fp8(kernels))
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
    fuse = all(_siglip_fusable(p["MultiHeadDotProductAttention_0"]) or "qkv" in p["MultiHeadDotProductAttention_0"]
               for p in layers)  # every layer or none
    out = []
    for layer in layers:
        layer = dict(layer)
        if fuse:
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

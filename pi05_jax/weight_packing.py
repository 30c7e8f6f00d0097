"""Exact prepare-time restructurings of the per-layer weights (the unstacked layout of pi05_jax.layer_stack), made
once per checkpoint so the fast path's layers launch fewer and better-shaped GEMMs.

- Gemma QKV fusion (prefix stream and expert): `q_einsum` [N,D,H] and `kv_einsum` [2,K,D,H] -> one weight
  `qkv_einsum{suffix}/w` [D, K, G+2, H] (per kv head k: its G query heads, then k's key, then k's value), so a layer
  runs one GEMM [D, (N+2K)*H] and slices q, k, v out of its output. Query head n = k*G + g, as
  `gemma.masked_attention` groups them. Every output column is the same dot product as before (only the GEMM's
  shape changes), so this is exact up to the GEMM's float32 accumulation order. The prefix stream's last layer is
  left unfused: prefill computes only its K and V (`gemma.prefill(last_layer_kv_only=True)`).
- SigLIP QKV fusion: `query`/`key`/`value` kernels [D,N,H] and biases [N,H] -> `qkv` kernel [D,3,N,H] and bias
  [3,N,H]; one GEMM [D, 3*N*H] plus one bias add. Exact as above.
- SigLIP MLP padding: mlp_dim F -> the next multiple of `pad_multiple` (4304 -> 4352) with zero columns in
  Dense_0 kernel/bias and zero rows in Dense_1's kernel: a padded unit is gelu(0 + 0) = 0 and adds 0 * 0 to every
  output, so the result is exact (up to accumulation order) and every GEMM tile is whole. Same keys, same code.
- Expert gating transpose (the `pallas` fast path's default, off in PackOptions): the expert's `gating_einsum`
  [2, D, F] stored transposed as `gating_einsum_t` [2, F, D], the layout `pallas_kernels.skinny_matmul.geglu_matmul`
  streams. The same numbers in another order: exact. `gemma.feed_forward` reads either key. Likewise (off by default)
  the expert's fused QKV, attention-out and down weights as `[N, K]` `{name}_t` leaves for
  `pallas_kernels.skinny_matmul.skinny_matmul`; only `pi05_jax.fast_path.expert_matmuls`'s Pallas ops read those.
- SigLIP head padding (default off): the fused q/k/v heads H -> the next multiple of `pad_multiple` (72 -> 128) with
  zero columns. Padded q and k columns add 0 to every logit; padded v columns give zero outputs that are sliced away
  before the out projection; queries are still scaled by 1/sqrt(original H). Needs the QKV fusion.

Packing is idempotent: already packed parts pass through unchanged, so params packed once (runtime.Model.load, for
the fast path it loads for, freeing the originals) go through prepare's packing as they are.
Quantized weight leaves (pi05_jax.quantized: objects with `.einsum`, not arrays) are never packed: a layer whose
weights involved are not all plain arrays keeps its original keys and runs the unpacked code for that part.
The model code that reads the packed keys is `gemma.qkv_any` / `gemma.prefill_packed` (prefill and the expert,
pi05_jax.denoise_fast) and `siglip.encode_images_packed`; packed keys are only ever produced here.

Axis legend: D width, N q heads, K kv heads, G group (N // K), H head dim, F mlp dim, C the q/k/v axis.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pi05_jax import layer_stack
from pi05_jax.leaf_cache import LeafCache

GEMMA_STREAMS = ("", "_1")  # the prefix stream's keys, the expert's keys
EXPERT_PROJECTIONS = ("qkv", "attn_out", "down")  # PackOptions.transpose_expert_projections' names


@dataclasses.dataclass(frozen=True)
class PackOptions:
    fuse_gemma_qkv: bool = True
    fuse_siglip_qkv: bool = True
    pad_siglip_mlp: bool = True
    pad_siglip_heads: bool = False  # needs fuse_siglip_qkv
    pad_multiple: int = 128  # SigLIP mlp_dim and (if padded) head_dim round up to this
    transpose_expert_gating: bool = False  # expert gating_einsum [2, D, F] -> gating_einsum_t [2, F, D]
    # which of the expert's projections are stored [N, K], a subset of EXPERT_PROJECTIONS: "qkv" (the fused QKV ->
    # qkv_einsum_1_t; needs fuse_gemma_qkv), "attn_out" (attn_vec_einsum_1_t), "down" (linear_t)
    transpose_expert_projections: tuple[str, ...] = ()

    def __post_init__(self):
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {self.pad_multiple=}")
        unknown = set(self.transpose_expert_projections) - set(EXPERT_PROJECTIONS)
        if isinstance(self.transpose_expert_projections, str) or unknown:
            raise ValueError(f"transpose_expert_projections must be a tuple of names from {EXPERT_PROJECTIONS}; got "
                             f"{self.transpose_expert_projections=}")
        if self.pad_siglip_heads and not self.fuse_siglip_qkv:
            raise ValueError("pad_siglip_heads pads the fused SigLIP q/k/v weight: it needs fuse_siglip_qkv=True")

    @property
    def any(self) -> bool:
        return (self.fuse_gemma_qkv or self.fuse_siglip_qkv or self.pad_siglip_mlp or self.transpose_expert_gating
                or bool(self.transpose_expert_projections))


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
        return attn  # quantized: the unpacked path for this stream of this layer
    out = {k: v for k, v in attn.items() if k not in (q_key, kv_key)}
    out[f"qkv_einsum{suffix}"] = {"w": fuse_gemma_qkv_weights(q_w, kv_w)}
    return out


def _transpose_gating(mlp: dict) -> dict:
    w = mlp.get("gating_einsum")
    if w is None or not is_array(w):
        return mlp  # quantized (or already transposed): the unpacked path
    out = {k: v for k, v in mlp.items() if k != "gating_einsum"}
    out["gating_einsum_t"] = jnp.swapaxes(jnp.asarray(w), 1, 2)
    return out


def _transpose_projections(layer: dict, names: tuple[str, ...]) -> dict:
    """Of `names`: the expert's fused QKV [D, K, G+2, H] -> [K, G+2, H, D] ("qkv"), attn_vec_einsum_1 [N, H, D] ->
    [D, N*H] ("attn_out"), linear [F, D] -> [D, F] ("down"): each as `{name}_t` in place of the original; quantized
    or unfused weights stay as they are."""
    attn, mlp = dict(layer["attn"]), dict(layer["mlp_1"])
    qkv = attn.get("qkv_einsum_1", {}).get("w")
    if "qkv" in names and qkv is not None and is_array(qkv):
        del attn["qkv_einsum_1"]
        attn["qkv_einsum_1_t"] = {"w": jnp.transpose(jnp.asarray(qkv), (1, 2, 3, 0))}
    out = attn.get("attn_vec_einsum_1", {}).get("w")  # (absent: already transposed)
    if "attn_out" in names and out is not None and is_array(out):
        del attn["attn_vec_einsum_1"]
        attn["attn_vec_einsum_1_t"] = {"w": jnp.asarray(out).reshape(-1, out.shape[-1]).T}
    if "down" in names and "linear" in mlp and is_array(mlp["linear"]):
        mlp["linear_t"] = jnp.asarray(mlp.pop("linear")).T
    return {**layer, "attn": attn, "mlp_1": mlp}


def pack_gemma_layers(layers: tuple, *, fuse_qkv: bool = True, transpose_expert_gating: bool = False,
                      transpose_expert_projections: tuple[str, ...] = ()) -> tuple:
    """Every layer's q/kv fused, both streams (the prefix stream of the last layer is kept: it computes KV only);
    with transpose_expert_gating, the expert's gating_einsum stored [2, F, D] as `gating_einsum_t` (the Pallas
    GeGLU matmul reads each program's output columns as one contiguous slab: pallas_kernels.skinny_matmul)."""
    out = []
    for i, layer in enumerate(layers):
        layer = dict(layer)
        if fuse_qkv:
            attn = layer["attn"]
            for suffix in GEMMA_STREAMS:
                if suffix == "" and i == len(layers) - 1:
                    continue
                attn = _pack_gemma_stream(attn, suffix)
            layer["attn"] = attn
        if transpose_expert_gating and "mlp_1" in layer:
            layer["mlp_1"] = _transpose_gating(layer["mlp_1"])
        if transpose_expert_projections and "mlp_1" in layer:
            layer = _transpose_projections(layer, transpose_expert_projections)
        out.append(layer)
    return tuple(out)


# --- SigLIP ----------------------------------------------------------------------------------------------------------


def _pack_siglip_attention(mha: dict, options: PackOptions) -> dict:
    names = ("query", "key", "value")
    if not all(n in mha for n in names):
        return mha  # already fused
    kernels = [mha[n]["kernel"] for n in names]
    if not all(is_array(w) for w in kernels):
        return mha
    kernel = jnp.stack([jnp.asarray(w) for w in kernels], axis=1)  # [D, 3, N, H]
    bias = jnp.stack([jnp.asarray(mha[n]["bias"]) for n in names], axis=0)  # [3, N, H]
    h = kernel.shape[-1]
    if options.pad_siglip_heads and is_array(mha["out"]["kernel"]):  # the out kernel tells the original H
        hp = _round_up(h, options.pad_multiple)
        kernel, bias = _pad_axis(kernel, 3, hp), _pad_axis(bias, 2, hp)
    out = {k: v for k, v in mha.items() if k not in names}
    out["qkv"] = {"kernel": kernel, "bias": bias}
    return out


def _pad_siglip_mlp(mlp: dict, multiple: int) -> dict:
    w0, w1 = mlp["Dense_0"]["kernel"], mlp["Dense_1"]["kernel"]
    if not (is_array(w0) and is_array(w1)):
        return mlp
    f = w0.shape[1]
    fp = _round_up(f, multiple)
    if fp == f:
        return mlp
    return {**mlp,
            "Dense_0": {**mlp["Dense_0"], "kernel": _pad_axis(w0, 1, fp), "bias": _pad_axis(mlp["Dense_0"]["bias"],
                                                                                               0, fp)},
            "Dense_1": {**mlp["Dense_1"], "kernel": _pad_axis(w1, 0, fp)}}


def pack_siglip_layers(layers: tuple, options: PackOptions) -> tuple:
    out = []
    for layer in layers:
        layer = dict(layer)
        if options.fuse_siglip_qkv:
            layer["MultiHeadDotProductAttention_0"] = _pack_siglip_attention(layer["MultiHeadDotProductAttention_0"],
                                                                             options)
        if options.pad_siglip_mlp:
            layer["MlpBlock_0"] = _pad_siglip_mlp(layer["MlpBlock_0"], options.pad_multiple)
        out.append(layer)
    return tuple(out)


# --- the params ------------------------------------------------------------------------------------------------------


def pack_weights(params, options: PackOptions = PackOptions()) -> dict:
    """params (both layer groups unstacked) with the chosen restructurings applied (new dicts along the changed
    paths; all other leaves shared). Stacked layer groups are returned unchanged (the packed code runs per layer)."""
    llm = layer_stack._get(params, layer_stack.LLM_PATH)
    img = layer_stack._get(params, layer_stack.IMG_PATH)
    gemma_packing = options.fuse_gemma_qkv or options.transpose_expert_gating or options.transpose_expert_projections
    if gemma_packing and layer_stack.is_unstacked(llm):
        params = layer_stack._replace(params, layer_stack.LLM_PATH, pack_gemma_layers(
            llm, fuse_qkv=options.fuse_gemma_qkv, transpose_expert_gating=options.transpose_expert_gating,
            transpose_expert_projections=options.transpose_expert_projections))
    if (options.fuse_siglip_qkv or options.pad_siglip_mlp) and layer_stack.is_unstacked(img):
        params = layer_stack._replace(params, layer_stack.IMG_PATH, pack_siglip_layers(img, options))
    return params


_PACKED = LeafCache()  # (options, unstacked layer groups) -> the two packed groups


def pack_weights_cached(params, options: PackOptions = PackOptions()) -> dict:
    """`pack_weights`, once per (checkpoint, options) (pi05_jax.leaf_cache): a repeated call returns the same packed
    arrays."""
    if not options.any:
        return params
    paths = (layer_stack.LLM_PATH, layer_stack.IMG_PATH)
    groups = tuple(layer_stack._get(params, path) for path in paths)

    def pack():
        packed = pack_weights(params, options)
        return tuple(layer_stack._get(packed, path) for path in paths)

    for path, group in zip(paths, _PACKED.get(groups, pack, tag=options), strict=True):
        params = layer_stack._replace(params, path, group)
    return params

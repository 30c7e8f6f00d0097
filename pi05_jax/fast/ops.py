"""Which kernel runs each piece of the fast path's forward pass: chosen once per model from its options and the
layout of its packed weights, handed to the forward pass as one `Ops` object.

Axis legend: B batch, T tokens, S keys (prefix slots), N q heads, K kv heads, G group (N // K), C q/k/v slots
(G + 2), H head dim, D width, F mlp dim, P patches.

The layout (`Layout`) is what `pi05_jax.fast.packing` made of the checkpoint: plain weights are fused / transposed,
FP8 q/kv (and SigLIP query/key/value) weights are fused into one FP8 weight ("fused_quantized"), every other
quantized weight (`pi05_jax.quantized`) keeps openpi's keys. `ops_for(options, layout)` pairs each piece with the
one kernel that reads that layout; a layout an asked-for kernel cannot read is a `LayoutError` naming both, never a
quiet switch to another kernel. Where a quantized checkpoint decides the matmul (its weights' own FP8/FP4 matmul),
`Ops.describe()` says so.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# Loaded up front: it imports Pallas' fuser module, which registers a JAX config flag. Loaded lazily while the first
# pallas_call is traced, that flag changes the tracing context after the sampler's first compile, so the second call
# of a `pallas` executable would compile again.
import pallas_kernels._interpret  # noqa: F401
from pallas_kernels import expert_loop, expert_megakernel, gqa_cross_attention, ragged_prefill_attention
from pallas_kernels.skinny_matmul import SkinnyBlockSizes, geglu_matmul
from pi05_jax.fast.packing import is_array
from pi05_jax.model import gemma, layer_stack, siglip
from pi05_jax.model.weights import weight_einsum

ATTENTIONS = ("xla", "pallas")
# Whether SigLIP's attention runs as one fused kernel through jax.nn.dot_product_attention (cuDNN's flash attention
# on a GPU in bf16/fp16): "none" (upstream's einsum-softmax-einsum) or "vision". The prefix LLM's attention through
# cuDNN tied with the Pallas ragged prefill attention on the H200 and was deleted (docs/PERF.md names the tag).
FUSED_ATTENTIONS = ("none", "vision")
# How the action expert runs: "layers" (each layer's pieces as the kernels above), "megakernel" (all layers of an
# Euler step in one persistent Mosaic GPU kernel: pallas_kernels.expert_megakernel, via pi05_jax.fast.megakernel) or
# "megakernel-loop" (every Euler step, with the action projections and the update, in one such kernel per batch row:
# pallas_kernels.expert_loop; built for the card's verdict against "megakernel", docs/PERF.md)
EXPERTS = ("layers", "megakernel", "megakernel-loop")
MEGAKERNELS = ("megakernel", "megakernel-loop")


def expert_stack_backend(platform: str) -> str:
    """How the megakernel runs on this platform: "mosaic" (the persistent kernel, a GPU) or "interpret" (its phases
    as separate launches in Pallas interpret mode: the CPU has no global semaphores)."""
    return "mosaic" if platform == "gpu" else "interpret"


def fused_attention_backend(platform: str, dtype) -> str:
    """jax.nn.dot_product_attention's implementation for this platform and dtype: "cudnn" on a GPU in bf16/fp16,
    else "xla" (cuDNN has no float32 and no CPU kernel; the XLA implementation computes the same function)."""
    return "cudnn" if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


class LayoutError(ValueError):
    """The params' layout is not one the chosen ops read (which layer, which key, which op)."""


# --- the layout --------------------------------------------------------------------------------------------------


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Layout:
    """How the packed params hold each weight the ops read; the same in every layer (`layout_of` checks).

    gemma_qkv / expert_qkv: "fused" (`qkv_einsum{,_1}` [D,K,C,H] array), "fused_quantized" (the same key holding
    one FP8 weight of that layout) or "quantized" (openpi's q_einsum + kv_einsum as quantized weights).
    expert_gating: "transposed" (`gating_einsum_t` [2,F,D]), "openpi" (`gating_einsum` [2,D,F] array) or
    "quantized". siglip_qkv: "fused" (`qkv` [D,3,N,H]), "fused_quantized" or "quantized"."""

    gemma_qkv: str
    expert_qkv: str
    expert_gating: str
    siglip_qkv: str


FUSED = ("fused", "fused_quantized")


def _fused(w) -> str:
    return "fused" if is_array(w) else "fused_quantized"


def _qkv_layout(attn: dict, suffix: str, where: str) -> str:
    if f"qkv_einsum{suffix}" in attn:
        return _fused(attn[f"qkv_einsum{suffix}"]["w"])
    q = attn.get(f"q_einsum{suffix}", {}).get("w")
    if q is None:
        raise LayoutError(f"{where}: no qkv_einsum{suffix} or q_einsum{suffix} (keys: {sorted(attn)})")
    if is_array(q):
        raise LayoutError(f"{where}: q_einsum{suffix} / kv_einsum{suffix} are plain arrays, not fused: the fast path "
                          f"runs on params packed by its implementation's prepare (pi05_jax.fast.packing)")
    return "quantized"


def _gating_layout(mlp: dict, where: str) -> str:
    if "gating_einsum_t" in mlp:
        return "transposed"
    w = mlp.get("gating_einsum")
    if w is None:
        raise LayoutError(f"{where}: no gating_einsum or gating_einsum_t (keys: {sorted(mlp)})")
    return "openpi" if is_array(w) else "quantized"


def _uniform(values: list[str], what: str) -> str:
    for i, v in enumerate(values):
        if v != values[0]:
            raise LayoutError(f"{what} is {v!r} in layer {i} but {values[0]!r} in layer 0: the fast path needs every "
                              f"layer in one layout (quantize all layers of a scope, or none)")
    return values[0]


def layout_of(params) -> Layout:
    """The layout of packed, unstacked params (a LayoutError for stacked or unpacked ones)."""
    llm = params["PaliGemma"]["llm"]["layers"]
    img = params["PaliGemma"]["img"]["Transformer"]["encoderblock"]
    if not (layer_stack.is_unstacked(llm) and layer_stack.is_unstacked(img)):
        raise LayoutError("the fast path's phases run on unstacked, packed params: call the implementation's "
                          "prepare(params, num_steps) first (pi05_jax.implementations)")
    where = "PaliGemma/llm/layers[{}]/{}"
    return Layout(
        # the prefix stream's last layer is never fused (it computes K and V only)
        gemma_qkv=_uniform([_qkv_layout(p["attn"], "", where.format(i, "attn")) for i, p in enumerate(llm[:-1])]
                           or ["fused"], "the prefix LLM's QKV weight"),
        expert_qkv=_uniform([_qkv_layout(p["attn"], "_1", where.format(i, "attn")) for i, p in enumerate(llm)],
                            "the expert's QKV weight"),
        expert_gating=_uniform([_gating_layout(p["mlp_1"], where.format(i, "mlp_1")) for i, p in enumerate(llm)],
                               "the expert's gating weight"),
        siglip_qkv=_uniform([_fused(p["MultiHeadDotProductAttention_0"]["qkv"]["kernel"])
                             if "qkv" in p["MultiHeadDotProductAttention_0"] else "quantized"
                             for p in img], "SigLIP's QKV weight"),
    )


# --- the pieces: prefix LLM ----------------------------------------------------------------------------------------


def prefix_qkv_fused(x, attn, positions):
    """q, k, v from the fused weight `qkv_einsum` [D,K,C,H] (an array, or one FP8 weight: its own matmul): one GEMM,
    RoPE on q and k together (they share the positions) and the q scale; elementwise the same ops as `gemma.qkv`."""
    w = attn["qkv_einsum"]["w"]
    b, t, _ = x.shape
    _, kh, c, h = w.shape
    g = c - 2
    y = weight_einsum("BTD,DKCH->BTKCH", x, w)
    qk = gemma.rope(y[:, :, :, : g + 1].reshape(b, t, kh * (g + 1), h), positions).reshape(b, t, kh, g + 1, h)
    q = qk[:, :, :, :g].reshape(b, t, kh * g, h) * jnp.asarray(h**-0.5, x.dtype)
    return q, qk[:, :, :, g], y[:, :, :, g + 1]


def prefix_qkv_quantized(x, attn, positions):
    return gemma.qkv(x, attn, "", positions)


def prefix_attend_xla(q, k, v, lengths):
    """Bidirectional masked attention over the compacted prefix: key s is visible to row b iff s < lengths[b]."""
    b, t = q.shape[:2]
    key_valid = jnp.arange(k.shape[1])[None, :] < lengths[:, None]  # [B, S]
    return gemma.masked_attention(q, k, v, jnp.broadcast_to(key_valid[:, None, :], (b, t, k.shape[1])))


def prefix_attend_pallas(q, k, v, lengths, *, tiles: ragged_prefill_attention.BlockSizes):
    return ragged_prefill_attention.ragged_prefill_attention(q, k, v, lengths, block_sizes=tiles)


# --- the pieces: action expert -------------------------------------------------------------------------------------


def rotate_packed_qkv(y, positions):
    """A fused QKV output y [B,T,K,C,H] -> RoPE on its q and k slots, the q scale on q, v unchanged (elementwise
    the same values as `gemma.qkv`, in one array: one XLA fusion where three sliced outputs are three)."""
    b, t, kh, c, h = y.shape
    rotated = gemma.rope(y.reshape(b, t, kh * c, h), positions).reshape(y.shape)
    slot = jnp.arange(c)[:, None]  # [C, 1], broadcast against [B,T,K,C,H]
    q_scale = jnp.where(slot < c - 2, jnp.asarray(h**-0.5, y.dtype), jnp.asarray(1, y.dtype))
    return jnp.where(slot == c - 1, y, rotated * q_scale)


def expert_qkv_fused(x, attn, positions):
    """[B,T,K,C,H]: the fused `qkv_einsum_1` GEMM (an array, or one FP8 weight: its own matmul), rotated."""
    return rotate_packed_qkv(weight_einsum("BTD,DKCH->BTKCH", x, attn["qkv_einsum_1"]["w"]), positions)


def expert_qkv_quantized(x, attn, positions):
    """[B,T,K,C,H] from openpi's quantized q_einsum_1 / kv_einsum_1 (their own matmuls), stacked per kv head into
    the fused layout, rotated."""
    q = weight_einsum("BTD,NDH->BTNH", x, attn["q_einsum_1"]["w"])
    k, v = weight_einsum("BSD,CKDH->CBSKH", x, attn["kv_einsum_1"]["w"])
    b, t, n, h = q.shape
    kh = k.shape[2]
    y = jnp.concatenate([q.reshape(b, t, kh, n // kh, h), k[:, :, :, None], v[:, :, :, None]], axis=3)
    return rotate_packed_qkv(y, positions)


def unpack_qkv(qkv):
    """[B,T,K,C,H] -> q [B,T,N,H], k [B,T,K,H], v [B,T,K,H]."""
    b, t, kh, c, h = qkv.shape
    return qkv[:, :, :, : c - 2].reshape(b, t, kh * (c - 2), h), qkv[:, :, :, c - 2], qkv[:, :, :, c - 1]


def expert_attend_xla(qkv, ck, cv, lengths):
    """The action tokens over the compacted prefix (key s valid iff s < lengths[b]) plus all action tokens."""
    q, k, v = unpack_qkv(qkv)
    b, t = q.shape[:2]
    s = ck.shape[1]
    prefix_valid = jnp.arange(s)[None, :] < lengths[:, None]  # [B, S]
    mask = jnp.concatenate([jnp.broadcast_to(prefix_valid[:, None, :], (b, t, s)), jnp.ones((b, t, t), bool)],
                           axis=-1)
    return gemma.masked_attention(q, jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1), mask)


def expert_attend_pallas(qkv, ck, cv, lengths, *, tiles: gqa_cross_attention.BlockSizes):
    """The Pallas flash-decoding cross-attention, reading q, k and v in place from the fused layout."""
    return gqa_cross_attention.gqa_cross_attention_packed(qkv, ck, cv, lengths, block_sizes=tiles)


def expert_mlp_xla(h, mlp):
    """gemma.feed_forward on openpi's gating layout (plain or quantized weights: their own matmuls)."""
    return gemma.feed_forward(h, mlp)


def expert_mlp_pallas(h, mlp, *, tiles: SkinnyBlockSizes):
    """gate/up + GeGLU in the Pallas skinny matmul on `gating_einsum_t` [2,F,D], then XLA's down projection."""
    b, t, d = h.shape
    hidden = geglu_matmul(h.reshape(b * t, d), mlp["gating_einsum_t"].astype(h.dtype), block_sizes=tiles)
    return weight_einsum("BTF,FD->BTD", hidden.reshape(b, t, -1), mlp["linear"])


# --- the pieces: SigLIP ----------------------------------------------------------------------------------------------


def vision_qkv_fused(y, mha, dtype):
    """q (scaled by 1/sqrt(H)), k, v [B,P,N,H] from the fused `qkv` weight [D,3,N,H]: one GEMM + one bias add."""
    qkv = mha["qkv"]
    y = weight_einsum("BPD,DCNH->BPCNH", y, qkv["kernel"]) + qkv["bias"].astype(dtype)
    q, k, v = y[:, :, 0], y[:, :, 1], y[:, :, 2]
    return q / jnp.sqrt(q.shape[-1]).astype(dtype), k, v


def vision_qkv_quantized(y, mha, dtype):
    return siglip.qkv(y, mha, dtype)


def vision_attend_xla(q, k, v, dtype):
    """Upstream's SigLIP attention: einsum, softmax, einsum (XLA)."""
    return siglip.attention(q, k, v, dtype)


def vision_attend_fused(q, k, v, dtype, *, implementation: str):
    """SigLIP attention as one jax.nn.dot_product_attention on the pre-scaled q (scale 1): cuDNN's fused kernel on a
    GPU in bf16 (its softmax in float32, where upstream's runs in the model's dtype)."""
    return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=implementation).astype(dtype)


# --- the ops object --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ops:
    """The forward pass's pieces. vision_qkv(y, mha, dtype) -> q, k, v; vision_attend(q, k, v, dtype) -> o;
    prefix_qkv(x, attn, positions) -> q, k, v;
    prefix_attend(q, k, v, lengths) -> o; expert_qkv(x, attn, positions) -> [B,T,K,C,H] rotated;
    expert_attend(qkv, k_prefix, v_prefix, lengths) -> o [B,T,N,H]; expert_mlp(h, mlp) -> [B,T,D]. `names`: which
    kernel each is, for `describe`."""

    vision_qkv: Callable
    vision_attend: Callable
    prefix_qkv: Callable
    prefix_attend: Callable
    expert_qkv: Callable
    expert_attend: Callable
    expert_mlp: Callable
    names: tuple[tuple[str, str], ...]
    # the expert's whole Euler step as one kernel (pallas_kernels.expert_megakernel.expert_stack's signature), or
    # None: the layers run as the pieces above
    expert_stack: Callable | None = None
    # the whole Euler loop as one kernel (pallas_kernels.expert_loop.expert_loop's signature), or None
    expert_loop: Callable | None = None

    def describe(self) -> str:
        return ", ".join(f"{piece}: {name}" for piece, name in self.names)


def _qkv_name(layout: str) -> str:
    return {"fused": "fused (XLA)", "fused_quantized": "fused FP8 (one weight, its own matmul)",
            "quantized": "quantized (XLA)"}[layout]


@functools.cache
def ops_for(attention: str, layout: Layout, prefill_tiles: ragged_prefill_attention.BlockSizes,
            cross_tiles: gqa_cross_attention.BlockSizes, geglu_tiles: SkinnyBlockSizes, *,
            fused_attention: str = "none", fused_backend: str = "xla", expert: str = "layers",
            stack_backend: str = "interpret") -> Ops:
    """The ops for `attention` ("xla": compact, "pallas") on this layout, SigLIP's attention fused or not
    (`fused_attention`, FUSED_ATTENTIONS) through jax.nn.dot_product_attention's `fused_backend` ("cudnn" or "xla":
    `fused_attention_backend`), the expert as `expert` (EXPERTS) on `stack_backend` (`expert_stack_backend`).
    Cached, so equal arguments give the same object (the jitted sampler's static arguments compare equal)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if fused_attention not in FUSED_ATTENTIONS:
        raise ValueError(f"fused_attention must be one of {FUSED_ATTENTIONS}, got {fused_attention!r}")
    if fused_backend not in ("cudnn", "xla"):
        raise ValueError(f"fused_backend must be 'cudnn' or 'xla', got {fused_backend!r}")
    if expert not in EXPERTS:
        raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")
    if stack_backend not in ("mosaic", "interpret"):
        raise ValueError(f"stack_backend must be 'mosaic' or 'interpret', got {stack_backend!r}")
    pallas = attention == "pallas"
    fused_vision = fused_attention == "vision"
    fused_name = ("jax.nn.dot_product_attention (cuDNN)" if fused_backend == "cudnn" else
                  "jax.nn.dot_product_attention (XLA: no cuDNN kernel on this platform / dtype)")
    if pallas and layout.expert_gating == "openpi":
        raise LayoutError("the Pallas GeGLU matmul reads the expert's gating weight transposed (gating_einsum_t); "
                          "these params hold openpi's gating_einsum: pack them for 'pallas' "
                          "(pi05_jax.fast.packing.pack_weights(transpose_expert_gating=True))")
    names = [("vision qkv", _qkv_name(layout.siglip_qkv)),
             ("vision attention", fused_name if fused_vision else "XLA einsum-softmax-einsum"),
             ("prefix qkv", _qkv_name(layout.gemma_qkv)),
             ("prefix attention", "Pallas ragged_prefill_attention" if pallas else "XLA masked"),
             ("expert qkv", _qkv_name(layout.expert_qkv)),
             ("expert attention", "Pallas gqa_cross_attention_packed" if pallas else "XLA masked")]
    if not pallas and layout.expert_gating == "transposed":
        raise LayoutError("these params hold the expert's gating weight transposed for the Pallas GeGLU "
                          "(gating_einsum_t); XLA's MLP reads openpi's gating_einsum: pack them without the transpose")
    if layout.expert_gating == "transposed":
        mlp = functools.partial(expert_mlp_pallas, tiles=geglu_tiles)
        names.append(("expert mlp", "Pallas geglu_matmul + XLA down"))
    else:
        mlp = expert_mlp_xla
        names.append(("expert mlp", f"{layout.expert_gating} weights' own matmuls"
                      + (" (the checkpoint is quantized: no Pallas GeGLU)" if pallas else "")))
    stack = loop = None
    if expert in MEGAKERNELS:
        if layout.expert_qkv != "fused" or layout.expert_gating == "quantized":
            raise LayoutError("the megakernel reads the expert's fused bf16 QKV and plain gating weights; this "
                              f"checkpoint's expert is {layout.expert_qkv} / {layout.expert_gating} (quantized "
                              "checkpoints: --kernels pallas)")
        mosaic = stack_backend == "mosaic"
        if expert == "megakernel":
            stack = (expert_megakernel.expert_stack if mosaic else
                     functools.partial(expert_megakernel.expert_stack_phases, interpret=True))
        else:
            loop = expert_loop.expert_loop if mosaic else functools.partial(expert_loop.expert_loop_phases,
                                                                           interpret=True)
        names = [n for n in names if not n[0].startswith("expert")]
        per = "Euler step" if expert == "megakernel" else "call (all Euler steps, the action projections)"
        names.append(("expert", f"Mosaic GPU persistent megakernel, one launch per {per} and batch row" if mosaic
                      else "the megakernel's phases, one launch each, in Pallas interpret mode (no global semaphores "
                           "on this platform)"))
    return Ops(
        vision_qkv=vision_qkv_fused if layout.siglip_qkv in FUSED else vision_qkv_quantized,
        vision_attend=(functools.partial(vision_attend_fused, implementation=fused_backend) if fused_vision
                       else vision_attend_xla),
        prefix_qkv=prefix_qkv_fused if layout.gemma_qkv in FUSED else prefix_qkv_quantized,
        prefix_attend=functools.partial(prefix_attend_pallas, tiles=prefill_tiles) if pallas else prefix_attend_xla,
        expert_qkv=expert_qkv_fused if layout.expert_qkv in FUSED else expert_qkv_quantized,
        expert_attend=functools.partial(expert_attend_pallas, tiles=cross_tiles) if pallas else expert_attend_xla,
        expert_mlp=mlp,
        names=tuple(names),
        expert_stack=stack,
        expert_loop=loop,
    )

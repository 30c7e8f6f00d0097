"""Gemma for pi0.5: the PaliGemma prefix LLM (prefill) and the adaRMS action expert (one denoise step).

Both streams live in `params["PaliGemma"]["llm"]` with openpi's names: the prefix stream's weights are
`attn/q_einsum`, `mlp`, `pre_attention_norm`, ...; the expert's carry the suffix `_1`. Layer weights are either
stacked over depth on axis 0 and consumed with `lax.scan`, as upstream does, or (pi05_jax.model.layer_stack) a tuple of
per-layer dicts consumed by a Python loop; the KV cache then is a tuple of per-layer arrays too.

Axis legend: B batch, T query len, S kv len, N q heads, K kv heads, G group (N // K), H head dim, D width,
F mlp dim, L layers.

Attention is pluggable: an `attend(q, k, v)` callable receives RoPE'd, pre-scaled queries [B,T,N,H] and keys /
values [B,S,K,H] and returns [B,T,N,H]; `masked_attention` is upstream's einsum + masked softmax.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pi05_jax.model import layer_stack
from pi05_jax.model.layer_stack import scan_or_unroll
from pi05_jax.model.linear import gelu_tanh
from pi05_jax.model.weights import weight_einsum

RMS_EPS = 1e-6
BIG_NEG = -2.3819763e38  # upstream's mask value
ROPE_MAX_WAVELENGTH = 10_000

Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


# --- norms -------------------------------------------------------------------------------------------------------


def _normalize(x):
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return x * jnp.reciprocal(jnp.sqrt(var + RMS_EPS))  # float32


def rms_norm(x, scale):
    """Gemma RMSNorm with a (1 + scale) gain; statistics in float32, output in x's dtype."""
    return (_normalize(x) * (1 + scale)).astype(x.dtype)


def ada_modulation(cond, dense_params, dtype):
    """adaRMS modulation for one norm: cond [B, Dc] -> (scale, shift, gate), each [B, 1, D] in `dtype`."""
    mod = jnp.einsum("BC,CE->BE", cond.astype(dtype), dense_params["kernel"].astype(dtype))
    mod = mod + dense_params["bias"].astype(dtype)
    scale, shift, gate = jnp.split(mod[:, None, :], 3, axis=-1)
    return scale, shift, gate


def ada_rms_norm(x, scale, shift):
    """adaRMS: normalize, then x * (1 + scale) + shift (float32), output in x's dtype."""
    return (_normalize(x) * (1 + scale) + shift).astype(x.dtype)


# --- attention pieces ----------------------------------------------------------------------------------------------


def rope(x, positions):
    """Rotary embedding over the last axis of x [B,T,N,H] at integer positions [B,T]; math in float32."""
    h = x.shape[-1]
    freq_exponents = (2.0 / h) * jnp.arange(h // 2, dtype=jnp.float32)
    timescale = ROPE_MAX_WAVELENGTH**freq_exponents
    radians = positions[..., None] / timescale[None, None, :]
    radians = radians[..., None, :]
    sin, cos = jnp.sin(radians), jnp.cos(radians)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def masked_attention(q, k, v, mask):
    """Upstream's GQA attention. q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] bool -> [B,T,N,H]."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None, :, :], logits, BIG_NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def qkv(x, attn, suffix, positions):
    """q (RoPE'd, scaled by 1/sqrt(H)), k (RoPE'd), v from openpi's separate q_einsum / kv_einsum weights."""
    q = weight_einsum("BTD,NDH->BTNH", x, attn[f"q_einsum{suffix}"]["w"])
    k, v = weight_einsum("BSD,CKDH->CBSKH", x, attn[f"kv_einsum{suffix}"]["w"])
    q = rope(q, positions)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, x.dtype)
    k = rope(k, positions)
    return q, k, v


def kv_only(x, attn, suffix, positions):
    """k (RoPE'd) and v only: the prefix stream's last layer, whose queries feed nothing."""
    k, v = weight_einsum("BSD,CKDH->CBSKH", x, attn[f"kv_einsum{suffix}"]["w"])
    return rope(k, positions), v


def feed_forward(x, mlp):
    """GeGLU MLP: gelu(x W_gate) * (x W_up) -> W_down, on openpi's `gating_einsum` [2, D, F] and `linear` [F, D]."""
    gate, up = weight_einsum("BTD,CDF->CBTF", x, mlp["gating_einsum"])
    return weight_einsum("BTF,FD->BTD", gelu_tanh(gate) * up, mlp["linear"])


# --- token embedding -----------------------------------------------------------------------------------------------


def embed_tokens(llm_params, tokens, dtype):
    table = llm_params["embedder"]["input_embedding"]
    x = table[(tokens,)].astype(dtype)
    return x * jnp.sqrt(table.shape[-1]).astype(dtype)


# --- prefill: the prefix stream ------------------------------------------------------------------------------------


def _prefix_layer(layers):
    return {
        "attn": {k: layers["attn"][k] for k in ("q_einsum", "kv_einsum", "attn_vec_einsum")},
        "mlp": layers["mlp"],
        "pre_attention_norm": layers["pre_attention_norm"],
        "pre_ffw_norm": layers["pre_ffw_norm"],
    }


def _prefix_layers(llm_params):
    return layer_stack.per_layer(llm_params["layers"], _prefix_layer)


def prefill(llm_params, x, positions, attend: Attend, *, last_layer_kv_only: bool = True):
    """Run the prefix stream over embedded tokens x [B,S,D]; returns the KV cache (k, v), each [L,B,S,K,H]
    (unstacked layers: each a tuple of L arrays [B,S,K,H], so the denoise reads every layer's cache without a copy).

    The last layer's attention output and MLP feed nothing (denoising reads only its K and V), so with
    `last_layer_kv_only` the final layer computes K and V alone; the cache is identical either way.
    """
    lp = _prefix_layers(llm_params)

    def layer(x, xs):
        p = xs[0]
        h = rms_norm(x, p["pre_attention_norm"]["scale"])
        q, k, v = qkv(h, p["attn"], "", positions)
        o = attend(q, k, v)
        x = x + weight_einsum("BTNH,NHD->BTD", o, p["attn"]["attn_vec_einsum"]["w"])
        h = rms_norm(x, p["pre_ffw_norm"]["scale"])
        x = x + feed_forward(h, p["mlp"])
        return x, (k, v)

    unstacked = layer_stack.is_unstacked(lp)
    if not last_layer_kv_only:
        _, kv = scan_or_unroll(layer, x, lp)
        return (tuple(k for k, _ in kv), tuple(v for _, v in kv)) if unstacked else kv
    if unstacked:
        head, last = lp[:-1], lp[-1]
    else:
        head = jax.tree.map(lambda a: a[:-1], lp)
        last = jax.tree.map(lambda a: a[-1], lp)
    x, kv = scan_or_unroll(layer, x, head)
    h = rms_norm(x, last["pre_attention_norm"]["scale"])
    k_last, v_last = kv_only(h, last["attn"], "", positions)
    if unstacked:
        return (*(k for k, _ in kv), k_last), (*(v for _, v in kv), v_last)
    k, v = kv
    return jnp.concatenate([k, k_last[None]]), jnp.concatenate([v, v_last[None]])


# --- the action expert: one denoise step ---------------------------------------------------------------------------


def expert_modulations(llm_params, cond, dtype):
    """Every adaRMS (scale, shift, gate) of the expert for conditioning `cond` [B, Dc].

    Returns {"attn": (s, sh, g), "ffw": (s, sh, g)} with each array [L, B, 1, D], and "final": (s, sh, g) [B,1,D].
    These depend only on the denoising time, so the fast path computes them once per num_steps.
    """
    layers = llm_params["layers"]

    def per_layer(name):
        if layer_stack.is_unstacked(layers):  # per layer, the small results stacked
            mods = [ada_modulation(cond, p[name]["Dense_0"], dtype) for p in layers]
            return tuple(jnp.stack(parts) for parts in zip(*mods, strict=True))
        return jax.vmap(lambda p: ada_modulation(cond, p, dtype))(layers[name]["Dense_0"])

    return {
        "attn": per_layer("pre_attention_norm_1"),
        "ffw": per_layer("pre_ffw_norm_1"),
        "final": ada_modulation(cond, llm_params["final_norm_1"]["Dense_0"], dtype),
    }


def _expert_layer(layers):
    return {
        "attn": {k: layers["attn"][k] for k in ("q_einsum_1", "kv_einsum_1", "attn_vec_einsum_1")},
        "mlp_1": layers["mlp_1"],
    }


def expert_layers(llm_params):
    """The expert's weights of every layer: stacked, or (unstacked layout) a tuple of per-layer dicts."""
    return layer_stack.per_layer(llm_params["layers"], _expert_layer)


def layer_modulations(modulations: dict, layers) -> tuple:
    """(attn, ffw) modulations as `scan_or_unroll` xs: stacked [L, ...] as they are, or split per layer."""
    if not layer_stack.is_unstacked(layers):
        return modulations["attn"], modulations["ffw"]
    return tuple(layer_stack.split_layers(modulations[k], len(layers)) for k in ("attn", "ffw"))


def expert_forward(llm_params, x, modulations, kv_cache, positions, attend_fn):
    """The action expert over suffix tokens x [B,T,D] attending to the prefix cache plus itself.

    `attend_fn(q, k_prefix, v_prefix, k_suffix, v_suffix)` does the attention of one layer.
    Returns the final-normed suffix hidden states [B,T,D].
    """
    lp = expert_layers(llm_params)
    cache_k, cache_v = kv_cache

    def layer(x, xs):
        p, ck, cv, (s1, sh1, g1), (s2, sh2, g2) = xs
        h = ada_rms_norm(x, s1, sh1)
        q, k, v = qkv(h, p["attn"], "_1", positions)
        o = attend_fn(q, ck, cv, k, v)
        o = weight_einsum("BTNH,NHD->BTD", o, p["attn"]["attn_vec_einsum_1"]["w"])
        x = x + o * g1
        h = ada_rms_norm(x, s2, sh2)
        x = x + feed_forward(h, p["mlp_1"]) * g2
        return x, None

    if layer_stack.is_unstacked(lp):
        cache_k, cache_v = tuple(cache_k), tuple(cache_v)  # per-layer arrays (a stacked cache: static slices)
        if len(cache_k) != len(lp) or len(cache_v) != len(lp):
            raise ValueError(f"KV cache holds {len(cache_k)} layers of keys and {len(cache_v)} of values, the expert "
                             f"has {len(lp)} layers")
    x, _ = scan_or_unroll(layer, x, lp, cache_k, cache_v, *layer_modulations(modulations, lp))
    s, sh, _ = modulations["final"]
    return ada_rms_norm(x, s, sh)

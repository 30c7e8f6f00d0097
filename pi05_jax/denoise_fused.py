"""Denoise with the action expert's layer as four fused GEMM kernels around the GQA cross-attention kernel.

Axis legend: B batch, T action tokens, M rows (B * T padded to the kernels' row block), D width, N q heads, K kv
heads, G group (N // K), H head dim, C half a head, P heads of the fused QKV weight (K * (G + 2)), F mlp dim,
I Euler step, L layers.

One expert layer of `pi05_jax.denoise_fast` is ~12 kernels per Euler step (two normalizations, RoPE and slicing,
the GEMMs, gated residual adds, the GeGLU product, the attention's glue). Here it is:
    qkv = ada_norm_matmul_rope(x)           adaRMS norm + fused QKV GEMM + RoPE + query scale
    o   = gqa_cross_attention(q; prefix KV ++ k, v)
    x   = matmul_gated_residual(o, W_o)     x + gate_attn * (o @ W_o)
    h   = ada_norm_matmul_geglu(x)          adaRMS norm + gate/up GEMM + gelu(gate) * up
    x   = matmul_gated_residual(h, W_down)  x + gate_ffw * (h @ W_down)
(`pallas_kernels.ada_norm_matmul`, `pallas_kernels.matmul_gated_residual`). The residual stream x stays float32
[M, D] across layers and steps (upstream rounds it to the model dtype after every add: rounding-level differences
in bfloat16, the same math in float32).

Folded per (checkpoint, num_steps), on top of denoise_fast's adaRMS table (`fused_constants`): for every step and
layer the norms' gains (1 + scale) and gates in float32, and the norms' shifts pushed through the following weight,
`shift @ W_qkv` and `shift @ W_gating` in float32 (the kernels add them in the epilogue; see ada_norm_matmul). The
kernels read step i's rows themselves (a traced index), so the step loop slices no tables. The rotary angles of the
action tokens are the same for every step: computed once per call.

Needs the unstacked layout with fused expert QKV weights (`pi05_jax.weight_packing`) and plain (not quantized)
expert weights; `supported(params)` says whether a checkpoint qualifies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.ada_norm_matmul import ada_norm_matmul_geglu, ada_norm_matmul_rope
from pallas_kernels.matmul_gated_residual import matmul_gated_residual
from pi05_jax import denoise_fast, gemma, layer_stack, sampler
from pi05_jax.compact_prefix import CompactPrefix
from pi05_jax.fused_expert_options import PIECES, FusedExpertOptions  # noqa: F401  (re-exported)
from pi05_jax.leaf_cache import LeafCache
from pi05_jax.linear import gelu_tanh, promoted_dense

FUSED_KEY = "fused_expert"  # params[denoise_fast.CONSTANTS_KEY][FUSED_KEY]: `fused_constants`
_ROW_BLOCK = 64  # the kernels' default block_m: rows are padded to a multiple of min(64, next pow2 >= B*T)


def _expert_weights(layer: dict):
    """(qkv [D, K, G+2, H], attn_vec [N, H, D], gating [2, D, F], linear [F, D]) of one unstacked expert layer, or
    None when the layer does not have them as plain arrays with a fused QKV."""
    attn, mlp = layer.get("attn", {}), layer.get("mlp_1", {})
    ws = (attn.get("qkv_einsum_1", {}).get("w"), attn.get("attn_vec_einsum_1", {}).get("w"),
          mlp.get("gating_einsum"), mlp.get("linear"))
    return ws if all(isinstance(w, (jax.Array, np.ndarray)) for w in ws) else None


def supported(params) -> bool:
    """Unstacked layers whose expert has fused QKV weights and plain (unquantized) matmul weights."""
    layers = params["PaliGemma"]["llm"]["layers"]
    return layer_stack.is_unstacked(layers) and all(_expert_weights(p) is not None for p in layers)


def compute_fused_constants(layer_weights, table) -> dict:
    """Per layer (a tuple over L): gains, gates and shift-through-weight tables, each with a leading steps axis I.

    `table` is denoise_fast's adaRMS table ("attn"/"ffw": (scale, shift, gate) each [I, L, 1, 1, D])."""
    hi = lax.Precision.HIGHEST
    out = []
    for layer, (w_qkv, _, w_gating, _) in enumerate(layer_weights):
        s1, sh1, g1 = (a[:, layer, 0, 0] for a in table["attn"])  # each [I, D]
        s2, sh2, g2 = (a[:, layer, 0, 0] for a in table["ffw"])
        d, kh, g2h, h = w_qkv.shape
        w_pairs = w_qkv.reshape(d, kh * g2h, 2, h // 2).astype(jnp.float32)
        out.append({
            # 1 + scale in the model dtype, as gemma.ada_rms_norm computes it, then float32
            "gain_attn": (1 + s1).astype(jnp.float32),
            "shift_qkv": jnp.einsum("ID,DPTC->IPTC", sh1.astype(jnp.float32), w_pairs, precision=hi),
            "gate_attn": g1.astype(jnp.float32),
            "gain_ffw": (1 + s2).astype(jnp.float32),
            "shift_gating": jnp.einsum("ID,GDF->IGF", sh2.astype(jnp.float32), w_gating.astype(jnp.float32),
                                       precision=hi),
            "gate_ffw": g2.astype(jnp.float32),
        })
    return {"layers": tuple(out)}


_constants_jit = jax.jit(compute_fused_constants)
_CACHE = LeafCache()


def fused_constants(params, num_steps: int, table: dict | None = None) -> dict:
    """The device-resident fused constants for this checkpoint and num_steps, computed on first use. `table`:
    denoise_fast's adaRMS table for them, when the caller already holds it."""
    if table is None:
        table = denoise_fast.modulation_table(params, num_steps)
    weights = tuple(_expert_weights(p) for p in params["PaliGemma"]["llm"]["layers"])
    return _CACHE.get((weights, table), lambda: _constants_jit(weights, table), tag=num_steps)


def with_constants(params, num_steps: int) -> dict:
    """params with denoise_fast's table and the fused constants under denoise_fast.CONSTANTS_KEY."""
    params = denoise_fast.with_constants(params, num_steps)
    consts = params[denoise_fast.CONSTANTS_KEY]
    consts = {**consts, FUSED_KEY: fused_constants(params, num_steps, consts["adarms"])}
    return {**params, denoise_fast.CONSTANTS_KEY: consts}


def _rows_padded(rows: int) -> int:
    block = min(_ROW_BLOCK, max(16, 1 << (rows - 1).bit_length()))
    return -(-rows // block) * block


def rope_angles(positions, head_dim: int, rows: int):
    """cos, sin [rows, H/2] float32 of positions [B, T] flattened and zero-padded to `rows` (gemma.rope's angles)."""
    flat = positions.reshape(-1).astype(jnp.float32)
    flat = jnp.pad(flat, (0, rows - flat.shape[0]))
    freq_exponents = (2.0 / head_dim) * jnp.arange(head_dim // 2, dtype=jnp.float32)
    radians = flat[:, None] / (gemma.ROPE_MAX_WAVELENGTH**freq_exponents)[None, :]
    return jnp.cos(radians), jnp.sin(radians)




def denoise(params, prefix: CompactPrefix, noise, num_steps: int, *, suffix_attention,
            options: FusedExpertOptions | None = None):
    """denoise_fast.denoise's Euler loop (a fori_loop over steps) with the fused expert layer. noise [B,T,A] float32
    -> actions [B,T,A] float32. `suffix_attention(lengths)` as in denoise_fast (the Pallas or the XLA one)."""
    llm = params["PaliGemma"]["llm"]
    layers = llm["layers"]
    if not supported(params):
        raise ValueError("the fused expert needs unstacked layers with fused, unquantized expert weights "
                         "(pi05_jax.layer_stack.unstack_layers and pi05_jax.weight_packing.pack_weights)")
    dtype = sampler.params_dtype(params)
    consts = params.get(denoise_fast.CONSTANTS_KEY, {}).get(FUSED_KEY)
    steps = len(sampler.euler_times(num_steps))
    table = denoise_fast._table_in(params, num_steps)
    if consts is None or consts["layers"][0]["gate_attn"].shape[0] != steps:
        consts = compute_fused_constants(tuple(_expert_weights(p) for p in layers), table)
    dt = -1.0 / num_steps
    b, t, _ = noise.shape
    bt = b * t
    rows = _rows_padded(bt)
    w_qkv0 = _expert_weights(layers[0])[0]
    d, kh, g2, h = w_qkv0.shape
    g = g2 - 2
    positions = prefix.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    cos, sin = rope_angles(positions, h, rows)
    attend = suffix_attention(prefix.lengths)
    cache_k, cache_v = prefix.kv
    final_scale, final_shift, _ = table["final"]  # each [I, 1, 1, D]
    opt = options or FusedExpertOptions()

    def valid(x):  # the float32 stream's B*T valid rows as [B, T, D]
        return x[:bt].reshape(b, t, d)

    def to_rows(a):  # [B, T, ...] -> [rows, prod(...)], zero-padded rows
        return jnp.pad(a.reshape(bt, -1), ((0, rows - bt), (0, 0)))

    def residual(a, w, gate_table, mods, x, i, blocks):
        if opt.residual == "pallas":
            return matmul_gated_residual(a, w, gate_table, x, step=i, block_sizes=blocks)
        return x + (jnp.dot(a, w.astype(a.dtype)) * mods[2].reshape(1, d)).astype(jnp.float32)

    def layer(x, i, li, p, c, ck, cv):
        w_qkv, w_o, w_gating, w_down = _expert_weights(p)
        mods_attn = tuple(lax.dynamic_index_in_dim(a, i, 0, False)[li] for a in table["attn"])  # each [1, 1, D]
        mods_ffw = tuple(lax.dynamic_index_in_dim(a, i, 0, False)[li] for a in table["ffw"])
        if opt.qkv == "pallas":
            qkv = ada_norm_matmul_rope(x, c["gain_attn"], w_qkv.reshape(d, kh * g2, 2, h // 2), c["shift_qkv"], cos,
                                       sin, group=g, step=i, block_sizes=opt.qkv_blocks)
            qkv = qkv[:bt].reshape(b, t, kh, g2, h)
            q, k, v = qkv[:, :, :, :g].reshape(b, t, kh * g, h), qkv[:, :, :, g], qkv[:, :, :, g + 1]
        else:
            hn = gemma.ada_rms_norm(valid(x), *mods_attn[:2]).astype(dtype)
            q, k, v = gemma.qkv_packed(hn, w_qkv, positions)
        o = attend(q, ck, cv, k, v)  # [B, T, N, H]
        x = residual(to_rows(o), w_o.reshape(-1, d), c["gate_attn"], mods_attn, x, i, opt.out_blocks)
        if opt.mlp_in == "pallas":
            hid = ada_norm_matmul_geglu(x, c["gain_ffw"], w_gating, c["shift_gating"], step=i,
                                        block_sizes=opt.mlp_in_blocks)
        else:
            hn = gemma.ada_rms_norm(valid(x), *mods_ffw[:2]).astype(dtype)
            gate, up = jnp.einsum("BTD,CDF->CBTF", hn, w_gating.astype(dtype))
            hid = to_rows(gelu_tanh(gate) * up)
        return residual(hid, w_down, c["gate_ffw"], mods_ffw, x, i, opt.down_blocks)

    def step(i, actions):
        tokens = promoted_dense(actions, params["action_in_proj"]["kernel"], params["action_in_proj"]["bias"])
        x = to_rows(tokens.astype(dtype).astype(jnp.float32))
        for li, p in enumerate(layers):
            x = layer(x, i, li, p, consts["layers"][li], cache_k[li], cache_v[li])
        pick = lambda a: lax.dynamic_index_in_dim(a, i, 0, False)
        out = gemma.ada_rms_norm(valid(x), pick(final_scale), pick(final_shift)).astype(dtype)
        v = promoted_dense(out, params["action_out_proj"]["kernel"], params["action_out_proj"]["bias"])
        return actions + dt * v

    return lax.fori_loop(0, steps, step, noise)

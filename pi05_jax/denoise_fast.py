"""Denoise fast path: adaRMS for every Euler step precomputed once per (checkpoint, num_steps), steps unrolled or a
fori_loop, layers a scan or (unstacked layout, pi05_jax.layer_stack) unrolled.

The expert's adaRMS (scale, shift, gate) of every layer's two norms and of the final norm depends only on the
step's time, and upstream's times are fixed by num_steps (`sampler.euler_times`). So the time MLP (sincos ->
Linear -> swish -> Linear -> swish) and all 2 * depth + 1 modulation Dense layers are evaluated for all steps at once,
in one batched computation, and kept on the device as a table [steps, ...]; the denoise loop reads step i's rows
instead of ~113M modulation weights (full model) per step. The table is cached per (checkpoint leaves, num_steps)
(`modulation_table`) and handed into the jit as part of the params pytree under CONSTANTS_KEY (`with_constants`);
a denoise called on params without it computes the same table inside the jit, once, before the step loop.

What is folded, and what is not:
- folded: the time MLP and the modulation Dense layers (into the table); the Euler times and dt (Python constants);
  per call, the suffix positions and the attention mask (once, not per step).
- not folded: the adaRMS (1 + scale) into the following q/kv/gating weights. The scale changes every step, so a
  fold needs one weight copy per step (num_steps x the expert's weights in memory, the same bytes read per step),
  and it is not exact: upstream rounds the modulated activation to the model dtype before the matmul, a folded
  weight rounds (1 + scale) * W instead. The modulate is an elementwise op XLA fuses into the normalization anyway.
  The prefix LLM's RMSNorm (1 + scale) is not folded for the same rounding reason.

Axis legend: B batch, T action tokens, A action dim, S prefix len, L layers, D width, I Euler step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pi05_jax import gemma, layer_stack, sampler
from pi05_jax.compact_prefix import CompactPrefix
from pi05_jax.leaf_cache import LeafCache
from pi05_jax.linear import promoted_dense
from pi05_jax.weights import weight_einsum

CONSTANTS_KEY = "fast_path_constants"  # params[CONSTANTS_KEY]["adarms"]: the table of `modulation_table`


def _conditioning_params(params) -> dict:
    """The leaves the modulation table depends on (plus action_in_proj, whose width sizes the time embedding)."""
    llm = params["PaliGemma"]["llm"]
    norms = layer_stack.per_layer(llm["layers"], lambda p: {k: p[k] for k in ("pre_attention_norm_1",
                                                                              "pre_ffw_norm_1")})
    return {
        "action_in_proj": params["action_in_proj"],
        "time_mlp_in": params["time_mlp_in"],
        "time_mlp_out": params["time_mlp_out"],
        "PaliGemma": {"llm": {
            "layers": norms,
            "final_norm_1": llm["final_norm_1"],
        }},
    }


def compute_modulation_table(params, num_steps: int, dtype) -> dict:
    """adaRMS for every step: {"attn"/"ffw": (scale, shift, gate) each [I, L, 1, 1, D], "final": each [I, 1, 1, D]}.

    Row i is bit-for-bit what upstream computes at step i: the same time MLP and Dense layers on time[i]."""
    times = jnp.asarray(sampler.euler_times(num_steps))
    cond = sampler.time_conditioning(params, times)  # [I, Dc]
    mods = gemma.expert_modulations(params["PaliGemma"]["llm"], cond, dtype)  # per layer [L, I, 1, D]
    per_layer = {name: tuple(jnp.moveaxis(a, 1, 0)[:, :, None] for a in mods[name]) for name in ("attn", "ffw")}
    return {**per_layer, "final": tuple(a[:, None] for a in mods["final"])}


_table_jit = jax.jit(compute_modulation_table, static_argnames=("num_steps", "dtype"))
_TABLES = LeafCache()


def modulation_table(params, num_steps: int) -> dict:
    """The device-resident modulation table for this checkpoint and num_steps, computed on first use."""
    sub = _conditioning_params(params)
    dtype = jnp.dtype(sampler.params_dtype(params))
    return _TABLES.get(sub, lambda: _table_jit(sub, num_steps=num_steps, dtype=dtype), tag=(num_steps, dtype.name))


def with_constants(params, num_steps: int) -> dict:
    """params plus the cached modulation table under CONSTANTS_KEY (a new top-level dict; no leaf is copied)."""
    return {**params, CONSTANTS_KEY: {"adarms": modulation_table(params, num_steps)}}


def _table_in(params, num_steps: int) -> dict:
    table = params.get(CONSTANTS_KEY, {}).get("adarms")
    steps = len(sampler.euler_times(num_steps))
    if table is None or table["final"][0].shape[0] != steps:
        # No cached table for this num_steps: compute it here, batched over all steps, before the loop.
        table = compute_modulation_table(params, num_steps, sampler.params_dtype(params))
    return table


def _step_modulations(table: dict, i):
    """Step i's modulations in gemma.expert_forward's layout ([L, 1, 1, D] per layer, [1, 1, D] final); i is a
    Python int (unrolled loop) or a traced index (fori_loop)."""
    pick = (lambda a: a[i]) if isinstance(i, int) else (lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False))
    return jax.tree.map(pick, table)


def xla_suffix_attention(lengths, self_length: int | None = None):
    """Action tokens attend to the compacted prefix (key s valid iff s < lengths[b]) plus the action tokens (the
    first `self_length` of them; None: all, else the rest are row padding, never keys)."""

    def attend(q, ck, cv, k, v):
        b, t = q.shape[:2]
        s = ck.shape[1]
        prefix_valid = jnp.arange(s)[None, :] < lengths[:, None]  # [B, S]
        self_valid = jnp.arange(t) < (t if self_length is None else self_length)  # [T]
        mask = jnp.concatenate(
            [jnp.broadcast_to(prefix_valid[:, None, :], (b, t, s)), jnp.broadcast_to(self_valid, (b, t, t))],
            axis=-1)
        return gemma.masked_attention(q, jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1), mask)

    return attend


def xla_qkv_rotated(h, attn, positions):
    """The fused QKV GEMM's output with RoPE and the q scale applied ([B,T,K,G+2,H]), or None if the layer's QKV
    weight is not fused (quantized, or packing off)."""
    fused = attn.get("qkv_einsum_1")
    return None if fused is None else gemma.qkv_packed_rotated(h, fused["w"], positions)


def xla_attn_out(o, attn):
    return weight_einsum("BTNH,NHD->BTD", o, attn["attn_vec_einsum_1"]["w"])


def xla_residual_norm(x, y, gate, scale, shift):
    """Upstream's gated residual then the next adaRMS norm: (x + y * gate, ada_rms_norm(that, scale, shift))."""
    x = x + y * gate
    return x, gemma.ada_rms_norm(x, scale, shift)


@dataclasses.dataclass(frozen=True)
class ExpertMatmuls:
    """The expert layer's matmuls, swappable (the `pallas` fast path runs its skinny kernels on transposed weights):
    qkv_rotated(h, attn, positions) -> [B,T,K,G+2,H] or None, attn_out(o, attn) -> y, mlp(h, mlp) -> y, and
    residual_norm(x, y, gate, scale, shift) -> (x + y * gate, the adaRMS norm of that), the only reader of the two
    y's: XLA's ops take y as [B,T,D]; the fast path's fused kernel may take the projections' unreduced split-K
    partials instead (whatever its attn_out and mlp return). prefetch(layer) -> an array of the layer's that the
    packed attention streams into L2 while it runs (the weight read next), or None."""

    qkv_rotated: Callable = xla_qkv_rotated
    attn_out: Callable = xla_attn_out
    mlp: Callable = gemma.feed_forward
    residual_norm: Callable = xla_residual_norm
    prefetch: Callable | None = None


XLA_MATMULS = ExpertMatmuls()


def _expert_layer(x, h, p, ck, cv, mods_attn, mods_ffw, next_norm, positions, attend,
                  ops: ExpertMatmuls = XLA_MATMULS):
    """One action-expert layer, the body of `gemma.expert_forward` (same ops in the same order; a layer with a fused
    QKV weight runs the same elementwise ops on one GEMM's output). Takes the residual stream x and its first norm
    h; returns the new x and its norm under `next_norm` (scale, shift): the next layer's first norm or the final
    norm, so each gated residual and the norm after it are one `ops.residual_norm`."""
    _, _, g1 = mods_attn
    attn = p["attn"]
    attend_packed = getattr(attend, "packed", None)
    qkv = ops.qkv_rotated(h, attn, positions) if attend_packed is not None else None
    if qkv is not None:
        # the attention reads q, k and v in place from the fused GEMM's layout (gqa_cross_attention_packed)
        ahead = ops.prefetch(p) if ops.prefetch is not None else None
        o = attend_packed(qkv, ck, cv) if ahead is None else attend_packed(qkv, ck, cv, prefetch=ahead)
    else:
        # fused q/k/v weight (pi05_jax.weight_packing): one GEMM, RoPE on q and k together; else two GEMMs
        q, k, v = gemma.qkv_any(h, attn, "_1", positions)
        o = attend(q, ck, cv, k, v)
    s2, sh2, g2 = mods_ffw
    x, h = ops.residual_norm(x, ops.attn_out(o, attn), g1, s2, sh2)
    return ops.residual_norm(x, ops.mlp(h, p["mlp_1"]), g2, *next_norm)


def expert_forward(llm_params, x, mods, kv_cache, positions, attend, *, unroll_layers: bool,
                   ops: ExpertMatmuls = XLA_MATMULS):
    """`gemma.expert_forward` with the layer loop either a lax.scan (one loop body) or unrolled in Python.

    Unstacked layers (pi05_jax.layer_stack) are always unrolled: every layer's weights and KV cache are their own
    buffers, read directly. Stacked layers are a lax.scan unless `unroll_layers` (then sliced per layer)."""
    lp = llm_params["layers"]
    # unstacked: the per-layer dicts as they are (they may hold packed weights, which gemma.expert_layers' key
    # selection does not know); stacked: the expert's keys only
    lp = lp if layer_stack.is_unstacked(lp) else gemma.expert_layers(llm_params)
    if not unroll_layers and not layer_stack.is_unstacked(lp):
        return gemma.expert_forward(llm_params, x, mods, kv_cache, positions, attend)  # stacked: never packed
    cache_k, cache_v = kv_cache
    depth = layer_stack.num_layers(lp)
    if len(cache_k) != depth or len(cache_v) != depth:
        raise ValueError(f"KV cache holds {len(cache_k)} layers of keys and {len(cache_v)} of values, the expert has "
                         f"{depth} layers")
    layers = layer_stack.unstack(lp)  # unstacked: as it is; stacked: static slices
    mods_attn, mods_ffw = (layer_stack.split_layers(mods[k], depth) for k in ("attn", "ffw"))
    s, sh, _ = mods_attn[0]
    h = gemma.ada_rms_norm(x, s, sh)
    for layer in range(depth):
        s, sh, _ = mods_attn[layer + 1] if layer + 1 < depth else mods["final"]
        x, h = _expert_layer(x, h, layers[layer], cache_k[layer], cache_v[layer], mods_attn[layer],
                             mods_ffw[layer], (s, sh), positions, attend, ops)
    return h


def default_unroll_steps(params) -> bool:
    """Steps unrolled for stacked layers (the scan's per-layer weight copies are there either way), a fori_loop for
    unstacked layers: their weights are loop invariants read in place, and 10 steps x 18 unrolled layers would be
    180 expert layer bodies to compile instead of 18."""
    return not layer_stack.is_unstacked(params["PaliGemma"]["llm"]["layers"])


def denoise(params, prefix: CompactPrefix, noise, num_steps: int, *, suffix_attention=xla_suffix_attention,
            unroll_steps: bool | None = None, unroll_layers: bool = False, step_unroll: int = 1,
            expert_matmuls: ExpertMatmuls = XLA_MATMULS, pad_action_rows: int = 0):
    """Upstream's Euler loop x <- x + dt * v(x, t) from noise [B,T,A] (float32) -> actions [B,T,A] float32.

    `suffix_attention(lengths)` returns the per-layer attention `(q, k_prefix, v_prefix, k_self, v_self) -> out`;
    if that callable has a `packed` attribute `(qkv, k_prefix, v_prefix) -> out`, layers with a fused QKV weight call
    it instead on `gemma.qkv_packed_rotated`'s [B,T,K,G+2,H] output.
    Steps are unrolled (a Python loop over the known times: one straight-line executable) or a fori_loop (None:
    `default_unroll_steps`); the expert's layers are a lax.scan or, with `unroll_layers` or unstacked layers,
    unrolled (more code, no loop bookkeeping, no per-layer weight slices). `step_unroll` > 1 unrolls that many steps
    per iteration of the fori_loop (fewer loop iterations, each a longer straight-line body). `expert_matmuls` runs
    each unstacked layer's matmuls (XLA's, or the fast path's Pallas kernels on packed weights).

    `pad_action_rows` > 0: the expert runs on the action tokens padded with zero tokens to a multiple of that many
    (50 -> 64: whole 64-row tiles for the Mosaic GPU matmuls, no pad before each of them). The padding tokens are
    never keys (`suffix_attention(lengths, self_length=T)`) and their outputs are dropped, so the valid tokens see
    exactly upstream's computation; the padding rows stay finite (zero inputs, finite weights)."""
    if step_unroll < 1:
        raise ValueError(f"step_unroll must be >= 1, got {step_unroll=}")
    if unroll_steps is None:
        unroll_steps = default_unroll_steps(params)
    llm = params["PaliGemma"]["llm"]
    dtype = sampler.params_dtype(params)
    table = _table_in(params, num_steps)
    steps = len(sampler.euler_times(num_steps))
    dt = -1.0 / num_steps
    if pad_action_rows < 0:
        raise ValueError(f"pad_action_rows must be >= 0, got {pad_action_rows=}")
    horizon = noise.shape[1]
    rows = -(-horizon // pad_action_rows) * pad_action_rows if pad_action_rows else horizon
    positions = prefix.lengths[:, None] + jnp.arange(rows, dtype=jnp.int32)[None, :]
    attend = suffix_attention(prefix.lengths, self_length=horizon) if rows > horizon else suffix_attention(
        prefix.lengths)

    def step(x, i):
        tokens = promoted_dense(x, params["action_in_proj"]["kernel"], params["action_in_proj"]["bias"])
        tokens = tokens.astype(dtype)
        if rows > horizon:
            tokens = jnp.pad(tokens, ((0, 0), (0, rows - horizon), (0, 0)))
        out = expert_forward(llm, tokens, _step_modulations(table, i), prefix.kv, positions, attend,
                             unroll_layers=unroll_layers, ops=expert_matmuls)[:, :horizon]
        v = promoted_dense(out, params["action_out_proj"]["kernel"], params["action_out_proj"]["bias"])
        return x + dt * v

    x = noise
    if unroll_steps:
        for i in range(steps):
            x = step(x, i)
        return x
    return jax.lax.fori_loop(0, steps, lambda i, x: step(x, i), x, unroll=min(step_unroll, steps))

"""The fast path's denoise: upstream's Euler loop over the action expert, written once, on packed per-layer weights
(pi05_jax.fast.packing), every kernel choice in the `Ops` it is handed (pi05_jax.fast.ops).

The steps are a lax.fori_loop (the weights are loop invariants read in place: 18 layer bodies to compile, not 180);
the 18 layers are unrolled in Python, each GEMM reading its own weight buffer.

The expert's adaRMS (scale, shift, gate) of every layer's two norms and of the final norm depends only on the
step's time, and upstream's times are fixed by num_steps (`reference.euler_times`). So the time MLP (sincos ->
Linear -> swish -> Linear -> swish) and all 2 * depth + 1 modulation Dense layers are evaluated for all steps at once,
in one batched computation, and kept on the device as a table [steps, ...]; the denoise loop reads step i's rows
instead of ~113M modulation weights (full model) per step. The table is cached per (checkpoint leaves, num_steps)
(`modulation_table`) and handed into the jit as part of the params pytree under CONSTANTS_KEY (`with_constants`);
a denoise called on params without it computes the same table inside the jit, once, before the step loop.

What is folded, and what is not:
- folded: the time MLP and the modulation Dense layers (into the table); the Euler times and dt (Python constants);
  per call, the suffix positions (once, not per step).
- not folded: the adaRMS (1 + scale) into the following q/kv/gating weights. The scale changes every step, so a
  fold needs one weight copy per step (num_steps x the expert's weights in memory, the same bytes read per step),
  and it is not exact: upstream rounds the modulated activation to the model dtype before the matmul, a folded
  weight rounds (1 + scale) * W instead. The modulate is an elementwise op XLA fuses into the normalization anyway.
  The prefix LLM's RMSNorm (1 + scale) is not folded for the same rounding reason.

Axis legend: B batch, T action tokens, A action dim, S prefix len, L layers, D width, I Euler step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pi05_jax.fast import megakernel
from pi05_jax.fast.ops import Ops
from pi05_jax.fast.prefix import CompactPrefix
from pi05_jax.leaf_cache import LeafCache
from pi05_jax.model import gemma, layer_stack, reference
from pi05_jax.model.linear import promoted_dense
from pi05_jax.model.precision import matmul_precision
from pi05_jax.model.weights import weight_einsum

# params[CONSTANTS_KEY]: {"adarms": the table of `modulation_table`, "layout": pi05_jax.fast.ops.Layout, and for
# the megakernel "megakernel": `with_megakernel_constants`}
CONSTANTS_KEY = "fast_path_constants"


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
    times = jnp.asarray(reference.euler_times(num_steps))
    cond = reference.time_conditioning(params, times)  # [I, Dc]
    mods = gemma.expert_modulations(params["PaliGemma"]["llm"], cond, dtype)  # per layer [L, I, 1, D]
    per_layer = {name: tuple(jnp.moveaxis(a, 1, 0)[:, :, None] for a in mods[name]) for name in ("attn", "ffw")}
    return {**per_layer, "final": tuple(a[:, None] for a in mods["final"])}


_table_jit = jax.jit(compute_modulation_table, static_argnames=("num_steps", "dtype"))
_TABLES = LeafCache()


def modulation_table(params, num_steps: int) -> dict:
    """The device-resident modulation table for this checkpoint and num_steps, computed on first use."""
    sub = _conditioning_params(params)
    dtype = jnp.dtype(reference.params_dtype(params))

    def compute():
        with matmul_precision(dtype):  # float32 models: float32 GEMMs, as their phases (pi05_jax.model.precision)
            return _table_jit(sub, num_steps=num_steps, dtype=dtype)

    return _TABLES.get(sub, compute, tag=(num_steps, dtype.name))


def with_constants(params, num_steps: int, layout) -> dict:
    """params plus the cached modulation table and the weights' layout (static: part of the pytree's structure)
    under CONSTANTS_KEY (a new top-level dict; no leaf is copied)."""
    return {**params, CONSTANTS_KEY: {"adarms": modulation_table(params, num_steps), "layout": layout}}


def with_megakernel_constants(params, *, loop: bool = False) -> dict:
    """params (after `with_constants`) plus what the megakernel reads (pi05_jax.fast.megakernel): the expert's
    weight tiles (once per checkpoint; with `loop`, pallas_kernels.expert_loop's, action_out_proj's kernel in them),
    the adaRMS table regrouped per step ({"mods": [I, L, 6, D], "final": [I, 2, D]}) and the kernel's tiles for these
    sizes (static: `megakernel.tiles_for`)."""
    layers = params["PaliGemma"]["llm"]["layers"]
    megakernel.check_expert(layers, reference.params_dtype(params))
    choice = megakernel.tiles_for(layers)
    megakernel.check_resident(choice.tiles)  # at load, not at the first call
    constants = params[CONSTANTS_KEY]
    if loop:
        megakernel.check_actions(params)
        w_tiles = megakernel.loop_weights(layers, params["action_out_proj"]["kernel"], choice.tiles)
    else:
        w_tiles = megakernel.megakernel_weights(layers, choice.tiles)
    found = {"w_tiles": w_tiles, "choice": choice,
             **_KERNEL_TABLES.get(constants["adarms"], lambda: megakernel.kernel_modulations(constants["adarms"]))}
    return {**params, CONSTANTS_KEY: {**constants, "megakernel": found}}


_KERNEL_TABLES = LeafCache()


def _table_in(params, num_steps: int) -> dict:
    table = params.get(CONSTANTS_KEY, {}).get("adarms")
    steps = len(reference.euler_times(num_steps))
    if table is None or table["final"][0].shape[0] != steps:
        # No cached table for this num_steps: compute it here, batched over all steps, before the loop.
        table = compute_modulation_table(params, num_steps, reference.params_dtype(params))
    return table


def _step_modulations(table: dict, i):
    """Step i's modulations ([L, 1, 1, D] per layer, [1, 1, D] final) at a traced step index."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False), table)


def expert_layer(x, h, p, ck, cv, mods_attn, mods_ffw, next_norm, positions, lengths, ops: Ops):
    """One action-expert layer (upstream's ops in upstream's order). Takes the residual stream x and its first norm
    h; returns the new x and its norm under `next_norm` (scale, shift): the next layer's first norm or the final
    norm."""
    _, _, g1 = mods_attn
    s2, sh2, g2 = mods_ffw
    attn = p["attn"]
    o = ops.expert_attend(ops.expert_qkv(h, attn, positions), ck, cv, lengths)
    x = x + weight_einsum("BTNH,NHD->BTD", o, attn["attn_vec_einsum_1"]["w"]) * g1
    h = gemma.ada_rms_norm(x, s2, sh2)
    x = x + ops.expert_mlp(h, p["mlp_1"]) * g2
    return x, gemma.ada_rms_norm(x, *next_norm)


def expert_forward(layers: tuple, x, mods, kv_cache, positions, lengths, ops: Ops):
    """The expert over the action tokens x [B,T,D] -> the final-normed hidden states [B,T,D]."""
    cache_k, cache_v = kv_cache
    depth = len(layers)
    if len(cache_k) != depth or len(cache_v) != depth:
        raise ValueError(f"KV cache holds {len(cache_k)} layers of keys and {len(cache_v)} of values, the expert has "
                         f"{depth} layers")
    mods_attn, mods_ffw = (layer_stack.split_layers(mods[k], depth) for k in ("attn", "ffw"))
    s, sh, _ = mods_attn[0]
    h = gemma.ada_rms_norm(x, s, sh)
    for layer in range(depth):
        s, sh, _ = mods_attn[layer + 1] if layer + 1 < depth else mods["final"]
        x, h = expert_layer(x, h, layers[layer], cache_k[layer], cache_v[layer], mods_attn[layer], mods_ffw[layer],
                            (s, sh), positions, lengths, ops)
    return h


def denoise(params, prefix: CompactPrefix, noise, num_steps: int, *, ops: Ops):
    """Upstream's Euler loop x <- x + dt * v(x, t) from noise [B,T,A] (float32) -> actions [B,T,A] float32."""
    llm = params["PaliGemma"]["llm"]
    dtype = reference.params_dtype(params)
    table = _table_in(params, num_steps)
    steps = len(reference.euler_times(num_steps))
    dt = -1.0 / num_steps
    horizon = noise.shape[1]
    positions = prefix.lengths[:, None] + jnp.arange(horizon, dtype=jnp.int32)[None, :]

    if ops.expert_stack is not None or ops.expert_loop is not None:
        found = params.get(CONSTANTS_KEY, {}).get("megakernel")
        if found is None:
            raise ValueError("the megakernel's weight tiles are made once per checkpoint by the implementation's "
                             "prepare(params, num_steps) (pi05_jax.fast.path.prepare); these params have none")
        if found["mods"].shape[0] != steps:
            raise ValueError(f"the megakernel's modulation table holds {found['mods'].shape[0]} steps; this call "
                             f"runs {steps}: prepare the params for num_steps={num_steps}")
        kp, vp = megakernel.stacked_kv(prefix.kv)
        if ops.expert_loop is not None:  # every step in one kernel per row
            return megakernel.denoise_rows(functools.partial(ops.expert_loop, tiles=found["choice"].tiles),
                                           found["w_tiles"], kp, vp, found["mods"], found["final"], params,
                                           prefix.lengths, noise, dt)

        def expert(tokens, i):
            return megakernel.expert_step(functools.partial(ops.expert_stack, tiles=found["choice"].tiles),
                                          found["w_tiles"], kp, vp, found["mods"][i], found["final"][i],
                                          prefix.lengths, tokens)
    else:
        def expert(tokens, i):
            return expert_forward(llm["layers"], tokens, _step_modulations(table, i), prefix.kv, positions,
                                  prefix.lengths, ops)

    def step(i, x):
        tokens = promoted_dense(x, params["action_in_proj"]["kernel"], params["action_in_proj"]["bias"])
        out = expert(tokens.astype(dtype), i)
        v = promoted_dense(out, params["action_out_proj"]["kernel"], params["action_out_proj"]["bias"])
        return x + dt * v

    return jax.lax.fori_loop(0, steps, step, noise)

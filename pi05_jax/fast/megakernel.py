"""The fast path's expert as one persistent kernel per Euler step (`FastPathOptions(expert="megakernel")`): the
18 layers of the action expert in `pallas_kernels.expert_megakernel.expert_stack`, which streams every block's
weight tiles through one shared-memory ring across all layers and hands activations between its phases through
global memory (the kernel module's docstring has the work split).

What the denoise loop does per step with it (`expert_step`): action_in_proj (XLA) -> for each batch row, the 50
action tokens padded to the kernel's 64 rows -> the kernel (adaRMS norm, QKV + RoPE, attention over the row's
prefix keys and its own, out-proj + gated residual, norm, GeGLU MLP, gated residual, for every layer, then the
final norm) -> action_out_proj (XLA). A batch of B rows is B launches per step (each re-streams the weights): the
kernel's tiles are 64 rows, one row's action tokens. With `FastPathOptions(expert="megakernel-loop")`
(`denoise_rows`) the whole Euler loop of a row, the action projections and the update included, is one launch of
`pallas_kernels.expert_loop.expert_loop` (its weight tiles carry action_out_proj's kernel: `loop_weights`).

Once per checkpoint (`megakernel_weights`, cached by the expert weights' identity): the expert's weights stacked
per layer and cut into the kernel's per-block tile stream (`expert_megakernel.pack_weights`); a copy of the
expert's bytes (the per-layer weights stay: `layout_of` and the other phases read the params as they are). Once per
(checkpoint, num_steps): the adaRMS table of pi05_jax.fast.denoise regrouped as the kernel reads it ([I, L, 6, D]
per-layer modulations, [I, 2, D] the final norm's). Once per call: the prefix K/V of every layer stacked [L, B, S, H].

What the kernel takes, checked at load (`check_expert`, `tiles_for`, `check_resident`) or per call (`check_call`),
each a ValueError naming the size: bfloat16 weights (its GEMMs are bf16 wgmma with float32 accumulation), plain
(not quantized) arrays, head_dim 256 and one kv head, mlp_dim a multiple of 32 (one block per 32 GeGLU columns), a
grid no larger than the card's SM count, the action horizon <= 64, the prefix bucket a multiple of 64; the rest
(e.g. at most 896 prefix keys for the attention phase's 128 blocks) the kernel's own checks name.
The residual stream stays float32 inside the kernel (upstream's bf16 model rounds it to bf16 after every add): the
result differs from upstream's bf16 one by bf16 rounding, and is compared against it (tests, and on the card).

Axis legend: B batch, T action tokens, M the kernel's 64 rows, S prefix slots, L layers, D width, H head dim,
I Euler steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import expert_loop
from pallas_kernels import expert_megakernel as mk
from pi05_jax.fast.packing import is_array
from pi05_jax.leaf_cache import LeafCache

ROWS = mk.ROWS  # the kernel's rows: one row's action tokens, padded
check_resident = mk.check_resident  # the grid must fit the card's SMs (the kernel's barriers wait for every block)


def stacked_expert_weights(layers: tuple) -> tuple:
    """The packed per-layer expert weights -> (wqkv [L, D, (N+2)H], wo [L, N H, D], wg, wu [L, D, F], wd [L, F, D]),
    the layouts `expert_megakernel.pack_weights` takes. Reads the fused `qkv_einsum_1` [D, 1, N+2, H] (q heads,
    then k, then v) and either gating layout."""
    wqkv, wo, wg, wu, wd = [], [], [], [], []
    for layer in layers:
        attn, mlp = layer["attn"], layer["mlp_1"]
        qkv = attn["qkv_einsum_1"]["w"]
        d, _, c, h = qkv.shape  # one kv head: check_expert
        out = attn["attn_vec_einsum_1"]["w"]  # [N, H, D]
        wqkv.append(qkv.reshape(d, c * h))
        wo.append(out.reshape(-1, out.shape[-1]))
        if "gating_einsum_t" in mlp:
            g, u = jnp.swapaxes(mlp["gating_einsum_t"][0], 0, 1), jnp.swapaxes(mlp["gating_einsum_t"][1], 0, 1)
        else:
            g, u = mlp["gating_einsum"][0], mlp["gating_einsum"][1]
        wg.append(g)
        wu.append(u)
        wd.append(mlp["linear"])
    return tuple(jnp.stack(ws) for ws in (wqkv, wo, wg, wu, wd))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """The kernel's tiles for one checkpoint (static in the params pytree: part of the executable's key)."""

    tiles: mk.MegaTiles


def tiles_for(layers: tuple) -> KernelChoice:
    """The grid the expert's sizes fix: one block per 32 GeGLU columns (F / 32: 128 at full size), the QKV GEMM split
    in two along K where both splits' column tiles fit the grid (else one); the ring as MegaTiles' defaults."""
    attn, mlp = layers[0]["attn"], layers[0]["mlp_1"]
    d, _, c, h = attn["qkv_einsum_1"]["w"].shape
    f = mlp["linear"].shape[0]
    if f % mk.GATE_COLS:
        raise ValueError(f"the megakernel runs one block per {mk.GATE_COLS} GeGLU columns; the expert's mlp_dim {f} "
                         f"is not a multiple of {mk.GATE_COLS}")
    blocks = f // mk.GATE_COLS
    splits = 2 if 2 * (c * h // mk.COLS) <= blocks and d % (2 * mk.MegaTiles.tile_rows) == 0 else 1
    return KernelChoice(mk.MegaTiles(blocks=blocks, qkv_splits=splits))


def check_expert(layers: tuple, dtype) -> None:
    """What the kernel cannot take, as errors that name it (before any tracing)."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"the megakernel runs bfloat16 weights (bf16 wgmma, float32 accumulation); this checkpoint "
                         f"is {jnp.dtype(dtype).name}: load it with --dtype bfloat16, or use --kernels pallas")
    qkv = layers[0]["attn"].get("qkv_einsum_1", {}).get("w")
    if qkv is not None and is_array(qkv):
        d, kh, _, h = qkv.shape
        if h != mk.HEAD or kh != 1 or d % mk.COLS:
            raise ValueError(f"the megakernel's tiles take the action expert at head_dim {mk.HEAD}, one kv head and a "
                             f"width that is a multiple of {mk.COLS} (pi0.5's: 256, 1, 1024); this checkpoint's expert "
                             f"has head_dim {h}, {kh} kv head(s), width {d}: use --kernels pallas")
    for i, layer in enumerate(layers):
        named = {"attn/qkv_einsum_1/w": layer["attn"].get("qkv_einsum_1", {}).get("w"),
                 "attn/attn_vec_einsum_1/w": layer["attn"]["attn_vec_einsum_1"]["w"],
                 "mlp_1/linear": layer["mlp_1"]["linear"]}
        for key, w in named.items():
            if w is None or not is_array(w):
                raise ValueError(f"PaliGemma/llm/layers[{i}]/{key} is {type(w).__name__}: the megakernel reads the "
                                 f"packed bf16 arrays of pi05_jax.fast.packing (quantized checkpoints: --kernels "
                                 f"pallas)")


_TILES = LeafCache()


def _expert_leaves(layers: tuple) -> tuple:
    """The expert weights the tiles are made of (the cache's key: these leaves' identity)."""
    return tuple({"attn": {k: p["attn"][k] for k in ("qkv_einsum_1", "attn_vec_einsum_1")}, "mlp_1": p["mlp_1"]}
                 for p in layers)


def megakernel_weights(layers: tuple, tiles: mk.MegaTiles):
    """The expert's weights as the kernel's per-block tile stream, once per checkpoint (cached)."""
    expert = _expert_leaves(layers)
    return _TILES.get(expert, lambda: jax.jit(mk.pack_weights, static_argnames="tiles")(
        *stacked_expert_weights(expert), tiles=tiles), tag=tiles)


def loop_weights(layers: tuple, w_out, tiles: mk.MegaTiles):
    """The weight tiles of `pallas_kernels.expert_loop` (the stack's, plus action_out_proj's kernel [D, A] in the
    grid's last block's stream), once per checkpoint (cached)."""
    expert = _expert_leaves(layers)
    return _TILES.get((expert, w_out), lambda: jax.jit(expert_loop.pack_loop_weights, static_argnames="tiles")(
        *stacked_expert_weights(expert), w_out, tiles=tiles), tag=("loop", tiles))


def check_actions(params) -> None:
    """What the loop kernel cannot take in the action projections, named (at load)."""
    w_in, w_out = params["action_in_proj"]["kernel"], params["action_out_proj"]["kernel"]
    if w_in.shape[0] != expert_loop.ACTION or w_out.shape[1] != expert_loop.ACTION:
        raise ValueError(f"the megakernel loop runs action_dim {expert_loop.ACTION} (pi0.5's: one x-owner unit's "
                         f"columns); action_in_proj/kernel is {tuple(w_in.shape)}, action_out_proj/kernel "
                         f"{tuple(w_out.shape)}: use expert='megakernel'")
    for key, w in (("action_in_proj/kernel", w_in), ("action_out_proj/kernel", w_out)):
        if jnp.dtype(w.dtype) != jnp.bfloat16:
            raise ValueError(f"the megakernel loop's action projections are bf16 wgmmas; {key} is "
                             f"{jnp.dtype(w.dtype).name}")


def denoise_rows(loop, w_tiles, kp, vp, mods, final, params, lengths, noise, dt: float):
    """All Euler steps from noise [B, T, A] float32 -> actions [B, T, A] float32: one `expert_loop` launch per batch
    row (`loop` is the kernel or its CPU form with its tiles bound), the row's T action tokens padded to 64."""
    check_call(noise, kp)
    b, t, _ = noise.shape
    w_in, b_in = params["action_in_proj"]["kernel"], params["action_in_proj"]["bias"]
    b_out = params["action_out_proj"]["bias"]
    rows = []
    for r in range(b):
        x0 = jnp.pad(noise[r].astype(jnp.float32), ((0, ROWS - t), (0, 0)))
        rows.append(loop(x0, w_tiles, kp[:, r], vp[:, r], mods, final, w_in, b_in, b_out, lengths[r], dt=dt,
                         tokens=t)[:t])
    return jnp.stack(rows)


def kernel_modulations(table: dict) -> dict:
    """The adaRMS table ({"attn"/"ffw": (scale, shift, gate) [I, L, 1, 1, D], "final": (scale, shift, gate)
    [I, 1, 1, D]}) as the kernel reads it: {"mods": [I, L, 6, D] (attn scale, shift, gate, ffw scale, shift,
    gate), "final": [I, 2, D]}."""
    per_layer = [a[:, :, 0, 0] for a in (*table["attn"], *table["ffw"])]  # each [I, L, D]
    return {"mods": jnp.stack(per_layer, axis=2), "final": jnp.stack([a[:, 0, 0] for a in table["final"][:2]], 1)}


def stacked_kv(kv: tuple):
    """The prefix cache ((k, v), each L arrays [B, S, 1, H]) -> k, v [L, B, S, H] (one copy per call)."""
    cache_k, cache_v = kv
    return tuple(jnp.stack([c[:, :, 0] for c in cache]) for cache in (cache_k, cache_v))


def check_call(tokens, kp) -> None:
    """The per-call shapes the kernel cannot take (trace time): tokens [B, T, *] (or the noise), kp [L, B, S, H]."""
    _, t, _ = tokens.shape
    if t > ROWS:
        raise ValueError(f"the megakernel takes at most {ROWS} action tokens per row (its row tile); the action "
                         f"horizon is {t}")
    if kp.shape[2] % mk.KEY_TILE:
        raise ValueError(f"the megakernel needs the prefix bucket a multiple of {mk.KEY_TILE}; it is {kp.shape[2]} "
                         f"(--bucket-size / FastPathOptions.bucket_size)")


def expert_step(stack, w_tiles, kp, vp, mods, final, lengths, tokens):
    """The expert over the action tokens tokens [B, T, D] (model dtype) at one step's modulations (mods [L, 6, D],
    final [2, D]) -> the final-normed hidden states [B, T, D] in tokens' dtype. `stack` is the kernel (or its
    CPU form, pallas_kernels.expert_megakernel.expert_stack_phases), its tiles bound."""
    check_call(tokens, kp)
    b, t, _ = tokens.shape
    rows = []
    for r in range(b):
        x = jnp.pad(tokens[r].astype(jnp.float32), ((0, ROWS - t), (0, 0)))
        h, _ = stack(x, w_tiles, kp[:, r], vp[:, r], mods, final, lengths[r], tokens=t)
        rows.append(h[:t])
    return jnp.stack(rows).astype(tokens.dtype)

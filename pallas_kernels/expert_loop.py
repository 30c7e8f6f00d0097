"""The whole Euler loop of the action expert in ONE persistent Mosaic GPU kernel: every step's action-in projection,
the L-layer expert stack of `expert_megakernel` (its phases, rings and barriers as they are), the action-out
projection and the Euler update x <- x + dt v, for all I steps, in one launch (issue 17: "the whole 10-step loop in
one launch"; the denoise's XLA work per step, ~11 small kernels beside the stack, goes away).

Axis legend: as expert_megakernel (M the 64 rows, D width, L layers, B blocks, R tile rows, U = D / 32 x-owner units),
plus A the action dim (32: pi0.5's, one unit's columns), I Euler steps, P the 3 bf16 parts of a float32 value.

Per step i (`expert_loop_reference`: the fast path's denoise step, `pi05_jax.fast.denoise.denoise`, on the T real rows
with the expert as `expert_megakernel.expert_stack_reference`):
1. tokens = bf16(x @ W_in + b_in) in float32 (promoted_dense of the float32 actions), the stack's x = f32(tokens);
2. h = the expert stack at step i's modulations (mods [I, L, 6, D], final [I, 2, D]) -> final-normed bf16 [M, D];
3. v = bf16(bf16(h @ W_out) + b_out) (a bf16 Dense), x = x + f32(bf16(bf16(dt) v)) (dt a Python float times a bf16
   array is bf16 in JAX).

Work split, two phases added to the stack's per step:
- "in" (the U x-owner blocks, in place of the stack kernel's prologue load): block u computes its 32 token columns
  x @ W_in[:, 32u:+32] + b_in as three bf16 wgmmas over x's exact three-part split x = hi + mid + lo (each part
  bf16, `split3`; bf16 x bf16 products are exact in float32, so the float32 sum is the float32 GEMM up to the
  order of the adds, with no tf32 rounding), rounds to bf16, keeps it as its float32 x share and writes its row
  sums of squares: what the stack's prologue did with the loaded x. W_in's slice and b_in are static (issued before
  the barrier), the parts of x after it.
- "out" (the grid's last block, which has no QKV work): v = h @ W_out over D / R tiles of [W_out | 0] (padded to the
  ring's 64 columns) that `pack_loop_weights` appends to that block's stream, so they arrive through its weight ring
  like every other tile (streamed during the step's layers); then the update and x's parts for the next step's "in".
  x itself (float32 [M, A]) is only ever read and written by this block.
The weight stream repeats every step (the same tiles): tile t of the call is row t mod (the block's tiles per step).
Grid barriers per step: after "in", after the first norm, the stack's per layer (all L, including the one after the
last G' now that "out" follows), after "out" (not after the last step's): I (3 + per L) - 1 rounds in all.

Race-freedom, beyond the stack's: x's parts are written by "out" of step i and read by "in" of step i + 1 (the barrier
after "out" between); "out" of step i + 1 writes them again after the barriers that follow that "in". h is read by
"out" after the barrier closing the last layer and written next by the first norm of step i + 1, after the barriers
following "out" and "in". x (float32) is one block's own, its TMA stores awaited before it reads it back.

Simplified: A = 32; the grid's last block must have no QKV work and room in its stream's padding for the D / R
out-tiles (L Kq >= D: true at full size); batch 1 (the caller launches per row); its phases are named scopes, but
no `profile_dir` (expert_megakernel's main() profiles the stack).

On the CPU: `expert_loop_phases` runs "in", the stack's phases (`expert_stack_phases`) and "out" as launches per
step in interpret mode, `expert_loop_emulated` replays it in plain JAX, and the tests lower the persistent kernel
for Hopper and replay its copy / wait schedule (tests/megakernel_schedule.py) across step boundaries.
Card: `PYTHONPATH=$PWD:$PWD/scripts timeout 480 python3 -m pallas_kernels.expert_loop` (`main`).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import expert_megakernel as em

ACTION = em.HALF  # A: pi0.5's action dim, one x-owner unit's 32 columns
PARTS = 3  # P: hi, mid, lo
_DEFAULT = em.MegaTiles()
W = plgpu.Layout.WGMMA


def split3(x):
    """float32 x -> [3, ...] bf16 (hi, mid, lo) with hi + mid + lo = x (each the bf16 rounding of what is left)."""
    hi = x.astype(jnp.bfloat16)
    rest = x - hi.astype(jnp.float32)
    mid = rest.astype(jnp.bfloat16)
    lo = (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)
    return jnp.stack([hi, mid, lo])


def out_block(tiles: em.MegaTiles) -> int:
    return tiles.blocks - 1


def _loop_geometry(d: int, heads: int, s: int, layers: int, tiles: em.MegaTiles, tokens: int):
    g = em._geometry(d, heads, s, layers, tiles, tokens)
    if out_block(tiles) < g.nq:
        raise ValueError(f"the out-projection runs on the grid's last block, which must have no QKV work: "
                         f"{tiles.blocks=} blocks, {g.nq} of them QKV blocks")
    if layers * g.kq < d:
        raise ValueError(f"the out-projection's D / R tiles ride in the last block's stream padding (L Kq rows): "
                         f"need L Kq >= D; got {layers=} Kq={g.kq} {d=}")
    return g


def pack_loop_weights(wqkv, wo, wg, wu, wd, w_out, tiles: em.MegaTiles = _DEFAULT) -> jax.Array:
    """`expert_megakernel.pack_weights` plus W_out [D, A] bf16 (padded to 64 columns with zeros) as the last block's
    tiles after its L layers' (the same array shape: they fill that block's padding)."""
    w = em.pack_weights(wqkv, wo, wg, wu, wd, tiles)
    layers, d, _ = wqkv.shape
    g = _loop_geometry(d, wo.shape[1] // em.HEAD, em.KEY_TILE, layers, tiles, em.TOKENS)
    if w_out.shape != (d, ACTION) or w_out.dtype != jnp.bfloat16:
        raise ValueError(f"w_out must be bfloat16 [D={d}, A={ACTION}]; got {w_out.shape=} {w_out.dtype=}")
    start = layers * g.per_o * g.r
    padded = jnp.pad(w_out, ((0, 0), (0, em.COLS - ACTION)))
    return w.at[out_block(tiles), start:start + d].set(padded)


def _check(x0, w_tiles, kp, vp, mods, final, w_in, b_in, b_out, length, tiles, tokens):
    if x0.shape != (em.ROWS, ACTION) or x0.dtype != jnp.float32:
        raise ValueError(f"x0 (the actions, padded to {em.ROWS} rows) must be float32 [{em.ROWS}, {ACTION}]; got "
                         f"{x0.shape=} {x0.dtype=}")
    if w_in.ndim != 2 or w_in.shape[0] != ACTION or w_in.dtype != jnp.bfloat16:
        raise ValueError(f"w_in must be bfloat16 [A={ACTION}, D]; got {w_in.shape=} {w_in.dtype=}")
    d = w_in.shape[1]
    if mods.ndim != 4 or mods.shape[0] < 1 or final.shape != (mods.shape[0], 2, d):
        raise ValueError(f"mods must be [I, L, 6, D] and final [I, 2, D] (per Euler step); got {mods.shape=} "
                         f"{final.shape=} (D={d})")
    if b_in.shape != (d,) or b_out.shape != (ACTION,):
        raise ValueError(f"b_in must be [D={d}] and b_out [A={ACTION}]; got {b_in.shape=} {b_out.shape=}")
    g = em._check(jax.ShapeDtypeStruct((em.ROWS, d), jnp.float32), w_tiles, kp, vp, mods[0], final[0], length, tiles,
                  tokens)
    return _loop_geometry(g.d, g.heads, g.s, g.layers, tiles, tokens)


def rounds_per_call(steps: int, layers: int, tiles: em.MegaTiles = _DEFAULT) -> int:
    return steps * (3 + em.barriers_per_layer(tiles) * layers) - 1


def _step_tiles(c):
    """The block's weight tiles per step: its L layers' (+ the out tiles on the last block)."""
    g = c.g
    return (jnp.where(em._is_q(c), g.layers * g.per_q, g.layers * g.per_o)
            + jnp.where(c.b == out_block(c.tiles), g.d // g.r, 0))


def _when(cond, f):
    """pl.when for a traced condition, a plain `if` for a Python bool (the one-launch-per-phase forms)."""
    if isinstance(cond, bool):
        if cond:
            f()
    else:
        pl.when(cond)(f)


def _in_block(c, step, hand=em._NO_HAND):
    """"in": unit u's token columns [32u, +32) = bf16(sum over the parts of x_p @ W_in[:, 32u:+32] + b_in) as its
    float32 x share, then its row sums of squares. x's parts: the call's input at step 0, "out"'s after."""
    g = c.g
    cols = em._unit_cols(c)
    bf = em._transforms(ACTION, jnp.bfloat16)

    def static(xs_s, w_s, b_s):
        plgpu.copy_gmem_to_smem(c.w_in.at[:, cols], w_s, c.bars.at[1])
        plgpu.copy_gmem_to_smem(c.b_in.at[cols], b_s, c.bars.at[2])

    def work(xs_s, w_s, b_s):
        _when(step == 0, lambda: plgpu.copy_gmem_to_smem(c.xs0, xs_s, c.bars.at[0]))
        _when(step != 0, lambda: plgpu.copy_gmem_to_smem(c.xs, xs_s, c.bars.at[0]))
        plgpu.barrier_wait(c.bars.at[1])
        plgpu.barrier_wait(c.bars.at[0])

        def gemm(acc):
            for p in range(PARTS):
                plgpu.wgmma(acc, xs_s.at[p], w_s)
            plgpu.wgmma_wait(0)
            return acc[...]

        acc = pl.run_scoped(gemm, plgpu.ACC((em.ROWS, ACTION), jnp.float32))
        bias = em._vec(c, b_s, 2)
        x = (acc + bias).astype(jnp.bfloat16).astype(jnp.float32)
        c.x_sh[...] = x
        em._write_ssq(c, x)

    em._prefetched(c.b < g.units, hand, static, work,
                   plgpu.SMEM((PARTS, em.ROWS, ACTION), jnp.bfloat16, transforms=bf),
                   plgpu.SMEM((ACTION, ACTION), jnp.bfloat16, transforms=bf), plgpu.SMEM((ACTION,), jnp.float32))


def _out_block(c, step, stop, dt: float):
    """"out" (the last block): v = bf16(bf16(h @ W_out) + b_out) over its D / R out-tiles (the weight ring), then
    x = x + f32(bf16(bf16(dt) v)) (x: the call's input at step 0, this block's own after), stored with its parts."""
    g = c.g
    t0 = c.step_base + g.layers * g.per_o  # the out-tiles follow the block's L layers in each step's stream
    dt_b = float(ml_dtypes.bfloat16(dt))  # dt x a bf16 array: dt rounds to bf16 first
    bf = em._transforms(ACTION, jnp.bfloat16)

    def scope(x_s, b_s, parts):
        _when(step == 0, lambda: plgpu.copy_gmem_to_smem(c.x0, x_s, c.bars.at[0]))
        _when(step != 0, lambda: plgpu.copy_gmem_to_smem(c.xa, x_s, c.bars.at[0]))
        plgpu.copy_gmem_to_smem(c.b_out, b_s, c.bars.at[1])

        def gemm(acc):
            em._gemm_phase(c, acc, t0, g.d // g.r, c.h, 0, stop)
            return acc[...]

        y = pl.run_scoped(gemm, plgpu.ACC((em.ROWS, em.COLS), jnp.float32))[:, :ACTION]
        bias = em._vec(c, b_s, 1)
        v = (y.astype(jnp.bfloat16).astype(jnp.float32) + bias).astype(jnp.bfloat16).astype(jnp.float32)
        plgpu.barrier_wait(c.bars.at[0])
        x = plgpu.load(x_s, layout=W) + (dt_b * v).astype(jnp.bfloat16).astype(jnp.float32)
        x_s[...] = x
        hi = x.astype(jnp.bfloat16)
        rest = x - hi.astype(jnp.float32)
        mid = rest.astype(jnp.bfloat16)
        for p, part in enumerate((hi, mid, (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16))):
            parts.at[p][...] = part
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(x_s, c.xa)
        plgpu.copy_smem_to_gmem(parts, c.xs)
        plgpu.wait_smem_to_gmem(0, wait_read_only=False)

    @pl.when(c.b == out_block(c.tiles))
    def _():
        pl.run_scoped(scope, plgpu.SMEM((em.ROWS, ACTION), jnp.float32), plgpu.SMEM((ACTION,), jnp.float32),
                      plgpu.SMEM((PARTS, em.ROWS, ACTION), jnp.bfloat16, transforms=bf))


def _ins(x0, w_tiles, kp, vp, mods, final, w_in, b_in, b_out, length, g):
    steps, layers = mods.shape[:2]
    norms = jnp.concatenate([em.norm_table(mods[i], final[i]) for i in range(steps)])  # [I (L + 1), 2, D]
    return {"x0": x0, "xs0": split3(x0), "w": w_tiles, "kp": kp, "vp": vp,
            "mods": mods.astype(jnp.float32).reshape(steps * layers, 6, g.d), "norms": norms,
            "cs": em.rope_table(length), "valid": em.key_valid(length, g.s, g.tokens), "w_in": w_in,
            "b_in": b_in.astype(jnp.float32), "b_out": b_out.astype(jnp.float32)}


def _loop_buffers(g):
    return {"xa": jax.ShapeDtypeStruct((em.ROWS, ACTION), jnp.float32),
            "xs": jax.ShapeDtypeStruct((PARTS, em.ROWS, ACTION), jnp.bfloat16), **em._buffer_types(g)}


def expert_loop(x0, w_tiles, kp, vp, mods, final, w_in, b_in, b_out, length, *, dt: float,
                tiles: em.MegaTiles = _DEFAULT, tokens: int = em.TOKENS):
    """All I Euler steps (module docstring) as one persistent kernel: x0 float32 [64, A] (the noise, padded rows),
    w_tiles from `pack_loop_weights`, prefix K/V bf16 [L, S, 256], mods [I, L, 6, D], final [I, 2, D], W_in bf16
    [A, D], b_in [D], b_out [A], length int32 scalar, dt the step (static) -> the actions float32 [64, A].
    Global semaphores: the card only (`expert_loop_phases` on the CPU)."""
    g = _check(x0, w_tiles, kp, vp, mods, final, w_in, b_in, b_out, length, tiles, tokens)
    em.check_resident(tiles)
    steps = mods.shape[0]
    per = em.barriers_per_layer(tiles)
    per_step = 3 + per * g.layers
    rounds = rounds_per_call(steps, g.layers, tiles)

    def body(c):
        arrive = pl.get_global(plgpu.SemaphoreType.REGULAR)
        done = pl.get_global(plgpu.SemaphoreType.REGULAR)
        c.step_tiles = _step_tiles(c)
        stop = steps * c.step_tiles
        em._fill_ring(c, 0, stop)  # the weight stream starts before anything waits, and never restarts

        def step(i, carry):
            base = i * per_step
            c.step_base = i * c.step_tiles
            after_out = functools.partial(_when, i > 0, functools.partial(em._counted_barrier, arrive, g.blocks,
                                                                          base - 1))
            _in_block(c, i, em._Hand("out | wait", after_out, "in"))
            em._norm_block(c, c.norms, i * (g.layers + 1), 0, 1, em._Hand(
                "in | wait", functools.partial(em._counted_barrier, arrive, g.blocks, base), "prologue norm"))
            with jax.named_scope("prologue norm | wait"):
                em._counted_barrier(arrive, g.blocks, base + 1)

            def layer(j, carry):
                em._layer_body(c, arrive, j, stop, base + 2 + per * j, mods_row=i * g.layers + j,
                               norms_row=i * (g.layers + 1) + j + 1, barrier_after=True)
                return carry

            lax.fori_loop(0, g.layers, layer, None)
            with jax.named_scope("out"):
                _out_block(c, i, stop, dt)
            return carry

        lax.fori_loop(0, steps, step, None)
        with jax.named_scope("epilogue"):
            plgpu.semaphore_signal(done, 1, memory_scope="gpu")

            @pl.when(c.b == 0)
            def _():  # every block is past its last barrier: wind the counter back for the next call
                plgpu.semaphore_wait(done, g.blocks, memory_scope="gpu")
                plgpu.semaphore_signal(arrive, -g.blocks * rounds, memory_scope="gpu")

    out = em._launch(body, g, tiles, _ins(x0, w_tiles, kp, vp, mods, final, w_in, b_in, b_out, length, g),
                     _loop_buffers(g))
    return out["xa"]


# --- one launch per phase (no semaphores: interpret mode on the CPU) -------------------------------------------------


def phase_in(xs, w_in, b_in, g, tiles, *, interpret=False):
    """"in" alone: x's parts [3, 64, A] -> (the stack's x float32 [64, D], its row sums of squares [U, 64])."""
    def body(c):
        _in_block(c, 0)
        em._store_x(c, c.x_out)

    t = em._buffer_types(g)
    out = em._launch(body, g, tiles, {"xs0": xs, "w_in": w_in, "b_in": b_in.astype(jnp.float32)},
                     {"x_out": jax.ShapeDtypeStruct((em.ROWS, g.d), jnp.float32), "ssq": t["ssq"]},
                     interpret=interpret)
    return out["x_out"], out["ssq"]


def phase_out(x, h, w_tiles, b_out, g, tiles, *, dt: float, interpret=False):
    """"out" alone: x float32 [64, A], the stack's h -> (x + dt v, its parts [3, 64, A])."""
    def body(c):
        t0 = g.layers * g.per_o
        stop = t0 + g.d // g.r
        pl.when(c.b == out_block(tiles))(lambda: em._fill_ring(c, t0, stop))
        _out_block(c, 0, stop, dt)

    t = _loop_buffers(g)
    out = em._launch(body, g, tiles, {"x0": x, "h": h, "w": w_tiles, "b_out": b_out.astype(jnp.float32)},
                     {"xa": t["xa"], "xs": t["xs"]}, interpret=interpret)
    return out["xa"], out["xs"]


def expert_loop_phases(x0, w_tiles, kp, vp, mods, final, w_in, b_in, b_out, length, *, dt: float,
                       tiles: em.MegaTiles = _DEFAULT, tokens: int = em.TOKENS, interpret=True):
    """`expert_loop` as launches per step: "in", `expert_megakernel.expert_stack_phases`, "out"."""
    g = _check(x0, w_tiles, kp, vp, mods, final, w_in, b_in, b_out, length, tiles, tokens)
    x, xs = x0, split3(x0)
    for i in range(mods.shape[0]):
        tok, _ = phase_in(xs, w_in, b_in, g, tiles, interpret=interpret)
        h, _ = em.expert_stack_phases(tok, w_tiles, kp, vp, mods[i], final[i], length, tiles, tokens,
                                      interpret=interpret)
        x, xs = phase_out(x, h, w_tiles, b_out, g, tiles, dt=dt, interpret=interpret)
    return x


# --- plain-JAX emulation and the reference ---------------------------------------------------------------------------


def in_emulated(xs, w_in, b_in):
    acc = jnp.zeros((em.ROWS, w_in.shape[1]), jnp.float32)
    for p in range(PARTS):
        acc = acc + jnp.einsum("MA,AD->MD", xs[p].astype(jnp.float32), w_in.astype(jnp.float32),
                               precision=lax.Precision.HIGHEST)
    return (acc + b_in.astype(jnp.float32)).astype(jnp.bfloat16).astype(jnp.float32)


def out_emulated(x, h, w_tiles, b_out, g, tiles, *, dt: float):
    start = g.layers * g.per_o * g.r
    w_out = w_tiles[out_block(tiles), start:start + g.d].astype(jnp.float32)  # [D, 64], the zero columns after A
    acc = jnp.zeros((em.ROWS, em.COLS), jnp.float32)
    hf = h.astype(jnp.float32)
    for j in range(g.d // g.r):
        ks = slice(j * g.r, (j + 1) * g.r)
        acc = acc + jnp.einsum("MR,RC->MC", hf[:, ks], w_out[ks], precision=lax.Precision.HIGHEST)
    v = (em._bf(acc[:, :ACTION]) + b_out.astype(jnp.float32)).astype(jnp.bfloat16).astype(jnp.float32)
    dt_b = float(ml_dtypes.bfloat16(dt))
    return x + (dt_b * v).astype(jnp.bfloat16).astype(jnp.float32)


def expert_loop_emulated(x0, w_tiles, kp, vp, mods, final, w_in, b_in, b_out, length, *, dt: float,
                         tiles: em.MegaTiles = _DEFAULT, tokens: int = em.TOKENS):
    """The persistent kernel's schedule in plain JAX: the stack's `expert_stack_emulated` between "in" and "out"."""
    g = _check(x0, w_tiles, kp, vp, mods, final, w_in, b_in, b_out, length, tiles, tokens)
    x = x0
    for i in range(mods.shape[0]):
        tok = in_emulated(split3(x), w_in, b_in)
        h, _ = em.expert_stack_emulated(tok, w_tiles, kp, vp, mods[i], final[i], length, tiles, tokens)
        x = out_emulated(x, h, w_tiles, b_out, g, tiles, dt=dt)
    return x


def expert_loop_reference(x0, wqkv, wo, wg, wu, wd, kp, vp, mods, final, w_in, b_in, w_out, b_out, length, *,
                          dt: float, tokens: int = em.TOKENS):
    """The fast path's Euler step (promoted_dense in, the expert, promoted_dense out, x + dt v) with upstream's
    expert functions (`expert_megakernel.expert_stack_reference`), on the T real rows -> actions float32 [T, A]."""
    from pi05_jax.model.linear import promoted_dense

    x = x0[:tokens]
    for i in range(mods.shape[0]):
        tok = promoted_dense(x, w_in, b_in).astype(jnp.bfloat16).astype(jnp.float32)
        tok = jnp.pad(tok, ((0, em.ROWS - tokens), (0, 0)))
        h, _ = em.expert_stack_reference(tok, wqkv, wo, wg, wu, wd, kp, vp, mods[i], final[i], length, tokens)
        x = x + dt * promoted_dense(h, w_out, b_out)
    return x


def random_loop_problem(key, steps: int, layers: int, d: int, heads: int, s: int, f: int):
    """`expert_megakernel.random_problem`'s stack weights and prefix K / V, per-step modulations (mods [I, L, 6, D],
    final [I, 2, D], its law), and the action projections: x0 [64, A] unit normal (the noise; rows >= T zero), w_in
    [A, D] scaled so the tokens have RMS X_RMS (random_problem's x: its docstring says why), b_in [D], w_out [D, A]
    (1 / sqrt(D)), b_out [A] (0.1 x normal), bf16."""
    k0, kx, ki, ko, kb, kc, km, kf = jax.random.split(key, 8)
    _, wqkv, wo, wg, wu, wd, kp, vp, _, _ = em.random_problem(k0, layers, d, heads, s, f)
    mods = 0.1 * jax.random.normal(km, (steps, layers, 6, d))
    mods = mods.at[:, :, em.ATTN_GATE].add(1.0).at[:, :, em.FFW_GATE].add(1.0).astype(jnp.bfloat16)
    final = (0.1 * jax.random.normal(kf, (steps, 2, d))).astype(jnp.bfloat16)
    x0 = jnp.where(jnp.arange(em.ROWS)[:, None] < em.TOKENS, jax.random.normal(kx, (em.ROWS, ACTION)), 0.0)
    w_in = (jax.random.normal(ki, (ACTION, d)) * em.X_RMS * ACTION ** -0.5).astype(jnp.bfloat16)
    w_out = (jax.random.normal(ko, (d, ACTION)) * d ** -0.5).astype(jnp.bfloat16)
    b_in = (0.1 * jax.random.normal(kb, (d,))).astype(jnp.bfloat16)
    b_out = (0.1 * jax.random.normal(kc, (ACTION,))).astype(jnp.bfloat16)
    return x0, wqkv, wo, wg, wu, wd, kp, vp, mods, final, w_in, b_in, w_out, b_out


def per_step_chain(x0, w_tiles, kp, vp, mods, final, w_in, b_in, w_out, b_out, length, *, dt: float,
                   tiles: em.MegaTiles = _DEFAULT, tokens: int = em.TOKENS):
    """What the denoise runs per call with `expert_megakernel` today (pi05_jax.fast.denoise, expert "megakernel"):
    a fori_loop over the steps of XLA's action-in GEMM, the stack kernel, XLA's action-out GEMM and the update, on
    the 64 padded rows. main()'s baseline."""
    from pi05_jax.model.linear import promoted_dense

    def step(i, x):
        tok = promoted_dense(x, w_in, b_in).astype(jnp.bfloat16).astype(jnp.float32)
        h, _ = em.expert_stack(tok, w_tiles, kp, vp, mods[i], final[i], length, tiles, tokens)
        return x + dt * promoted_dense(h, w_out, b_out)

    return lax.fori_loop(0, mods.shape[0], step, x0)


def main(argv=None) -> int:
    """Card run: correctness of the loop kernel (10 steps, 18 layers, full size) against the reference on the 50
    real rows (gate expert_megakernel.GATE, of what the steps add), a second call bit-identical, finite; then CUPTI
    device time of the loop kernel and of `per_step_chain` (today's megakernel denoise) in the same run. argv: the
    variants as expert_megakernel's main() takes them (default: MegaTiles())."""
    import pathlib
    import time

    import numpy as np

    sys_argv = sys.argv[1:] if argv is None else argv
    variants = em._parse_variants(sys_argv)[0] if sys_argv else (_DEFAULT,)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
    from device_time import device_us  # scripts/device_time.py: CUPTI device time

    if jax.default_backend() != "gpu":
        sys.exit("expert_loop: runs a GPU kernel; JAX sees no GPU")
    start = time.monotonic()
    steps, dt = 10, -0.1
    dev = jax.devices()[0]
    print(f"{dev.device_kind} ({dev.core_count} SMs), jax {jax.__version__}: {steps} Euler steps x {em.FULL_LAYERS} "
          f"layers, full size, S={em.FULL_S} length={em.FULL_LENGTH}", flush=True)
    p = random_loop_problem(jax.random.key(0), steps, em.FULL_LAYERS, em.FULL_D, em.FULL_HEADS, em.FULL_S,
                            em.FULL_F)
    x0, wqkv, wo, wg, wu, wd, kp, vp, mods, final, w_in, b_in, w_out, b_out = p
    length = jnp.int32(em.FULL_LENGTH)
    ref = jax.jit(functools.partial(expert_loop_reference, dt=dt))(*p[:12], w_out, b_out, length)
    t = em.TOKENS
    broken = False
    for tiles in variants:
        wt = pack_loop_weights(wqkv, wo, wg, wu, wd, w_out, tiles)
        args = (x0, wt, kp, vp, mods, final, w_in, b_in, b_out, length)
        loop = jax.jit(functools.partial(expert_loop, dt=dt, tiles=tiles))
        chain = jax.jit(functools.partial(per_step_chain, dt=dt, tiles=tiles))
        cargs = (x0, wt, kp, vp, mods, final, w_in, b_in, w_out, b_out, length)
        try:
            for fn, a, what in ((loop, args, "loop kernel"), (chain, cargs, "per-step chain")):
                t0 = time.monotonic()
                fn.lower(*a).compile()
                print(f"  [{time.monotonic() - start:5.0f} s] {tiles.label()}: {what} compiled in "
                      f"{time.monotonic() - t0:.0f} s; calling it (a hang stops here)", flush=True)
            got1, got2 = np.asarray(loop(*args)), np.asarray(loop(*args))
            base = np.asarray(chain(*cargs))
        except Exception as ex:  # a variant that does not compile or run: say so, go on
            print(f"  {tiles.label()}: FAILED {type(ex).__name__}: {str(ex)[:800]}", flush=True)
            broken = True
            continue
        err, err_chain = em.rel_err(got1[:t], ref, x0[:t]), em.rel_err(base[:t], ref, x0[:t])
        same, finite = bool((got1 == got2).all()), bool(np.isfinite(got1).all())
        print(f"  {tiles.label()}: loop vs reference {err:.2e} (per-step chain {err_chain:.2e}; loop vs chain "
              f"{em.rel_err(got1[:t], base[:t], x0[:t]):.2e}), bit-identical {same}, finite {finite}", flush=True)
        if not (err <= em.GATE and same and finite):
            print(f"FAILED: wrong answer ({tiles.label()})", flush=True)
            return 1
        us_loop, us_chain = device_us(loop, *args), device_us(chain, *cargs)
        print(f"  CUPTI device time, median of 20: loop kernel {us_loop:.1f} us ({us_loop / steps:.1f} per step), "
              f"per-step chain {us_chain:.1f} us ({us_chain / steps:.1f} per step): {us_chain / us_loop:.3f}x",
              flush=True)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

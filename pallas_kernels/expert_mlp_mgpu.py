"""The action expert's whole MLP (gate/up + GeGLU, then the down projection) as one persistent Mosaic GPU kernel.

Axis legend: M rows (action tokens, padded to 64), D width (contracted by gate/up, produced by down), F mlp dim,
S the down projection's K splits, C gate/up output columns of one work item, E down output columns of one item.

The first stage of the denoise megakernel (issue 17): two phases in one launch instead of a GeGLU kernel, a down
GEMM and their hand-off through XLA. At M = 64 both GEMMs read their weights for ~0.1% of the tensor cores' work,
so the kernel is a weight stream, and the point of one launch is that the stream does not stop between them.

Work split (grid = one block per work item, all resident at once: 128 blocks at the expert's sizes, <= the SMs):
- phase 1, item i < F / C: act[:, iC:(i+1)C] = gelu_tanh(h @ Wg[:, cols]) * (h @ Wu[:, cols]) over K = D in
  block_k steps, one warpgroup's wgmma per step on the h tile and the item's [block_k, 2C] gate|up tile, float32
  accumulators; each product rounded to the model dtype before the GeGLU, as upstream's einsum does. The C
  columns are stored (TMA) to the act buffer (an output of the kernel, in L2/HBM).
- phase 2, item j < (D / E) * S: split s = j % S, columns n = j // S; partial[s, :, nE:(n+1)E] =
  act[:, s*F/S:(s+1)*F/S] @ Wd[s-th K slice, cols]. Split-K because D / E = 16 column slices alone would leave
  112 SMs idle; the S float32 partials are summed by the caller (deterministic, no atomics).
- one weight stream per block: its phase-1 tiles then its phase-2 tiles, `weight_slots` of them in flight from
  the start (16 x 8 KiB: the whole phase-1 slab), each slot refilled as soon as the wgmma reading it is done, so
  phase 2's weights arrive while phase 1 computes and HBM never waits on an activation. h (phase 1) and the act
  tiles (phase 2) come through their own `act_slots` ring. The first form of this kernel (tag
  megakernel-mlp-stage1) kept ~24 KiB of weights in flight per block and streamed 1.6 TB/s (docs/PERF.md).
- hand-off: a phase-2 item needs the F / S act columns of its split, made by F / (S C) phase-1 items. Each
  phase-1 item, once its TMA store of act has completed, adds 1 to a global semaphore per consumer of its split
  ([S, D / E] semaphores: one release fence, then relaxed adds); a consumer waits for its count and decrements it
  by as much, so every semaphore is back at 0 when the kernel ends (no wind-back pass, correct on the next call).
  There is no grid-wide barrier: a phase-2 item starts as soon as its own producers are done.

Weights come pre-tiled (`tile_weights`, done once at load time) so that every TMA box is one contiguous run of
HBM: gate/up [F/C, D, 2C] (an item's C gate columns, then its C up columns: one wgmma B tile whose rows are
128 bytes, the same swizzle as the h tile, which Mosaic GPU's wgmma requires), down [D/E, F, E].

`expert_mlp(h, tiled)` (rows in 64-row chunks: batch 2's 100 rows are two launches, each streaming the weights;
bfloat16 only: Hopper's wgmma has no exact float32 path) returns the [M, D] down projection in float32.
`expert_mlp_reference` is the same in plain JAX. The semaphores run only on the card; on the CPU (interpret mode)
the same block program runs as two launches, phase 1 then phase 2 (`gate_up_phase`, `down_phase`), and
`expert_mlp_emulated` replays the schedule (same items, same K order, same split partials) in plain JAX.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._interpret import resolve_interpret

ROWS = 64  # rows per launch: one warpgroup's wgmma M
SHARED_MEMORY_BYTES = 227 * 1024  # per block on the H100 / H200


@dataclasses.dataclass(frozen=True)
class ExpertMlpTiles:
    """Work split of `expert_mlp`. gate_cols (C): act columns per phase-1 item; down_cols (E): output columns per
    phase-2 item (E = 2C: every weight tile is [block_k, 2C]); down_splits (S): K splits of the down projection;
    block_k: contracted elements per TMA tile (64 bf16 = one 128-byte swizzled row); weight_slots / act_slots: the
    depth of the block's weight ring (one stream over both phases) and of its activation ring (h, then act)."""

    gate_cols: int = 32
    down_cols: int = 64
    down_splits: int = 8
    block_k: int = 64
    weight_slots: int = 16
    act_slots: int = 8

    def __post_init__(self):
        for name in ("gate_cols", "down_cols", "block_k"):
            v = getattr(self, name)
            if v < 16 or v % 16:
                raise ValueError(f"{name} must be a multiple of 16, got {name}={v}")
        if self.down_cols != 2 * self.gate_cols:
            raise ValueError(f"down_cols must be 2 * gate_cols (one weight tile shape); got {self.down_cols=}, "
                             f"{self.gate_cols=}")
        if self.down_splits < 1 or self.weight_slots < 1 or self.act_slots < 1:
            raise ValueError(f"need down_splits, weight_slots, act_slots >= 1; got {self}")


def tiles_for(d: int, f: int) -> ExpertMlpTiles:
    """The tiles for width d and mlp dim f: block_k 64 (32 where d is not a multiple of 64), gate_cols = block_k / 2
    and down_cols = block_k (every smem tile then has block_k-element rows, one swizzle for wgmma's A and B), and
    the down splits that give one phase-1 and one phase-2 item per block (2 f / d: 8 at the expert's 1024 / 4096),
    or fewer where a split would be shorter than a tile (only the two-launch form runs those)."""
    bk = 64 if d % 64 == 0 else 32
    c = bk // 2
    splits = max(1, 2 * f // d)
    while splits > 1 and (f % splits or (f // splits) % bk):
        splits -= 1
    return ExpertMlpTiles(gate_cols=c, down_cols=bk, down_splits=splits, block_k=bk)


def gelu_tanh(x):
    """jax.nn.gelu(approximate=True) in float32 (the same formula as skinny_matmul.gelu_tanh)."""
    return x * (0.5 * (1.0 + jnp.tanh(jnp.float32(0.7978845608028654) * (x + 0.044715 * (x * x * x)))))


def tile_weights(gating_einsum: jax.Array, linear: jax.Array, tiles: ExpertMlpTiles = ExpertMlpTiles()) -> dict:
    """openpi's gating_einsum [2, D, F] and linear [F, D] -> {"gate_up": [F/C, D, 2C], "down": [D/E, F, E]}: the
    same numbers, laid out so each work item's weight tiles are contiguous."""
    if gating_einsum.ndim != 3 or gating_einsum.shape[0] != 2 or linear.shape != gating_einsum.shape[:0:-1]:
        raise ValueError(f"need gating_einsum [2, D, F] and linear [F, D]; got {gating_einsum.shape=}, "
                         f"{linear.shape=}")
    _, d, f = gating_einsum.shape
    c, e = tiles.gate_cols, tiles.down_cols
    if f % c or d % e:
        raise ValueError(f"F={f} must be a multiple of gate_cols={c} and D={d} of down_cols={e}")
    gate_up = gating_einsum.reshape(2, d, f // c, c).transpose(2, 1, 0, 3).reshape(f // c, d, 2 * c)
    down = linear.reshape(f, d // e, e).transpose(1, 0, 2)
    return {"gate_up": gate_up, "down": down}


def _sizes(tiled: dict, tiles: ExpertMlpTiles):
    n1, d, c2 = tiled["gate_up"].shape
    c = c2 // 2
    n_cols, f, e = tiled["down"].shape
    if c2 != 2 * c or c != tiles.gate_cols or e != tiles.down_cols or f != n1 * c or d != n_cols * e:
        raise ValueError(f"tiled weights do not match the tiles: {tiled['gate_up'].shape=}, "
                         f"{tiled['down'].shape=}, {tiles=} (make them with tile_weights(..., tiles))")
    s, bk = tiles.down_splits, tiles.block_k
    if f % s or (f // s) % bk or d % bk or (f // s) % c:
        raise ValueError(f"F={f} must split into down_splits={s} slices that are multiples of block_k={bk} and "
                         f"gate_cols={c}; D={d} a multiple of block_k")
    return d, f, n1, n_cols * s


def _transforms(cols: int, dtype):
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _scratch(tiles: ExpertMlpTiles, dtype) -> dict:
    bk, c, e = tiles.block_k, tiles.gate_cols, tiles.down_cols
    return dict(
        w_smem=plgpu.SMEM((tiles.weight_slots, bk, 2 * c), dtype, transforms=_transforms(2 * c, dtype)),
        w_bar=plgpu.Barrier(num_barriers=tiles.weight_slots),
        a_smem=plgpu.SMEM((tiles.act_slots, ROWS, bk), dtype, transforms=_transforms(bk, dtype)),
        a_bar=plgpu.Barrier(num_barriers=tiles.act_slots),
        act_out=plgpu.SMEM((ROWS, c), dtype, transforms=_transforms(c, dtype)),
        part_out=plgpu.SMEM((e // 32, ROWS, 32), jnp.float32, transforms=_transforms(32, jnp.float32)),
    )


def smem_bytes(tiles: ExpertMlpTiles = ExpertMlpTiles(), dtype=jnp.bfloat16) -> int:
    """Shared memory one block of the kernel takes."""
    bk, c, e = tiles.block_k, tiles.gate_cols, tiles.down_cols
    it = jnp.dtype(dtype).itemsize
    return it * (tiles.weight_slots * bk * 2 * c + tiles.act_slots * ROWS * bk + ROWS * c) + 4 * ROWS * e


def _signal_consumers(ready, split: int, consumers: int):
    """+1 on ready[split, n] for every consumer n: one release fence, then relaxed adds (a release pattern under
    PTX's memory model). Pallas' semaphore_signal is a release add each, and on the H200 each costs ~0.3 us when
    issued back to back (docs/PERF.md, session 7)."""

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
    def signal(ctx, sems):
        del ctx
        i32 = mgpu.utils.ir.IntegerType.get_signless(32)
        mgpu.utils.inline_ptx("fence.acq_rel.gpu;", has_side_effects=True)
        mgpu.utils.warpgroup_barrier()
        one = mgpu.utils.c(1, i32)
        pred = mgpu.utils.single_thread_predicate(mgpu.utils.ThreadSubset.WARPGROUP)
        for n in range(consumers):
            ptr = mgpu.utils.memref_ptr(mgpu.utils.memref_slice(sems, (split, n)))
            mgpu.utils.inline_ptx("red.relaxed.gpu.global.add.u32 [$0], $1;", ptr, one, predicate=pred,
                                  has_side_effects=True)

    signal(ready)


def _program(b, h_gmem, gu_gmem, wd_gmem, part_gmem, act_gmem, s, ready, *, d, f, tiles, dtype, phase1, phase2):
    """Block b's work: phase-1 item b (if phase1 and b < n1), then phase-2 item b (if phase2 and b < n2).

    One weight stream: tiles t < k1 are the phase-1 item's gate|up tiles over K, tiles k1 + j its phase-2 item's
    down tiles; weight_slots of them are in flight from the start and each slot is refilled with tile
    t + weight_slots as soon as the wgmma reading it is done, so phase 2's weights arrive while phase 1 computes.
    The activation ring streams h's K tiles (phase 1), then, once the semaphore says its producers are done, the
    act tiles of the item's split (phase 2). With ready=None the phases do not synchronize (one phase per launch)."""
    bk, c, e, sp = tiles.block_k, tiles.gate_cols, tiles.down_cols, tiles.down_splits
    ws, as_ = tiles.weight_slots, tiles.act_slots
    n1, n2 = f // c, (d // e) * sp
    kd = f // sp
    k1 = d // bk if phase1 else 0
    k2 = kd // bk if phase2 else 0
    total_w = k1 + k2
    do1 = (b < n1) if phase1 else False
    do2 = (b < n2) if phase2 else False
    split, col = lax.rem(b, sp), lax.div(b, sp)

    def fetch_w(t, slot):
        """Weight tile t into slot: t static (the prologue, phase 2's unrolled loop) or traced (phase 1's loop,
        whose indices past a phase are clamped in bounds and not issued)."""
        static = isinstance(t, int)
        if phase1 and (not static or t < k1):
            @pl.when(do1 & (t < k1))
            def _():
                row = t * bk if static else jnp.minimum(t, k1 - 1) * bk
                plgpu.copy_gmem_to_smem(gu_gmem.at[b, pl.ds(row, bk), :], s["w_smem"].at[slot],
                                        s["w_bar"].at[slot])
        if phase2 and (not static or k1 <= t < total_w):
            @pl.when(do2 & (t >= k1) & (t < total_w))
            def _():
                j = t - k1 if static else jnp.clip(t - k1, 0, k2 - 1)
                plgpu.copy_gmem_to_smem(wd_gmem.at[col, pl.ds(split * kd + j * bk, bk), :],
                                        s["w_smem"].at[slot], s["w_bar"].at[slot])

    for t in range(min(ws, total_w)):  # the weight stream starts before anything waits on activations
        fetch_w(t, t)

    if phase1:
        @pl.when(do1)
        def _():
            for i in range(min(as_, k1)):
                plgpu.copy_gmem_to_smem(h_gmem.at[:, pl.ds(i * bk, bk)], s["a_smem"].at[i], s["a_bar"].at[i])

            def scope(acc):
                def step(i, carry):
                    wslot, aslot = lax.rem(i, ws), lax.rem(i, as_)
                    plgpu.barrier_wait(s["w_bar"].at[wslot])
                    plgpu.barrier_wait(s["a_bar"].at[aslot])
                    plgpu.wgmma(acc, s["a_smem"].at[aslot], s["w_smem"].at[wslot])
                    plgpu.wgmma_wait(0)
                    fetch_w(i + ws, wslot)

                    @pl.when(i + as_ < k1)
                    def _():
                        plgpu.copy_gmem_to_smem(h_gmem.at[:, pl.ds((i + as_) * bk, bk)], s["a_smem"].at[aslot],
                                                s["a_bar"].at[aslot])

                    return carry

                lax.fori_loop(0, k1, step, None)
                both = acc[...].astype(dtype).astype(jnp.float32)  # upstream rounds each einsum to the model dtype
                s["act_out"][...] = (gelu_tanh(both[:, :c]) * both[:, c:]).astype(dtype)

            pl.run_scoped(scope, plgpu.ACC((ROWS, 2 * c), jnp.float32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(s["act_out"], act_gmem.at[:, pl.ds(b * c, c)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=False)  # the act columns are in memory before anyone is told
            if ready is not None:
                mine = lax.div(b * c, kd)
                for sv in range(sp):
                    @pl.when(mine == sv)
                    def _(sv=sv):
                        _signal_consumers(ready, sv, d // e)

    if phase2:
        @pl.when(do2)
        def _():
            if ready is not None:
                plgpu.semaphore_wait(ready.at[split, col], kd // c, memory_scope="gpu")
            for j in range(min(as_, k2)):
                t = k1 + j
                plgpu.copy_gmem_to_smem(act_gmem.at[:, pl.ds(split * kd + j * bk, bk)], s["a_smem"].at[t % as_],
                                        s["a_bar"].at[t % as_])

            def scope(acc):
                for j in range(k2):
                    t = k1 + j
                    plgpu.barrier_wait(s["w_bar"].at[t % ws])
                    plgpu.barrier_wait(s["a_bar"].at[t % as_])
                    plgpu.wgmma(acc, s["a_smem"].at[t % as_], s["w_smem"].at[t % ws])
                    plgpu.wgmma_wait(0)
                    if t + ws < total_w:
                        fetch_w(t + ws, t % ws)
                    if j + as_ < k2:
                        plgpu.copy_gmem_to_smem(act_gmem.at[:, pl.ds(split * kd + (j + as_) * bk, bk)],
                                                s["a_smem"].at[t % as_], s["a_bar"].at[t % as_])
                out = acc[...]
                for q in range(e // 32):
                    s["part_out"].at[q][...] = out[:, q * 32:(q + 1) * 32]

            pl.run_scoped(scope, plgpu.ACC((ROWS, e), jnp.float32))
            plgpu.commit_smem()
            for q in range(e // 32):
                plgpu.copy_smem_to_gmem(s["part_out"].at[q], part_gmem.at[split, :, pl.ds(col * e + q * 32, 32)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _check(h, tiled, tiles):
    if h.ndim != 2 or h.shape[0] != ROWS:
        raise ValueError(f"h must be [{ROWS}, D] (one launch's rows); got {h.shape=}")
    if h.dtype != jnp.bfloat16 or tiled["gate_up"].dtype != h.dtype or tiled["down"].dtype != h.dtype:
        raise ValueError(f"expert_mlp takes bfloat16 activations and weights (Hopper's wgmma has no exact float32 "
                         f"path); got {h.dtype=}, {tiled['gate_up'].dtype=}, {tiled['down'].dtype=}")
    d, f, n1, n2 = _sizes(tiled, tiles)
    if h.shape[1] != d:
        raise ValueError(f"h's width {h.shape[1]} != the weights' D={d}")
    return d, f, n1, n2


def _launch(h, act_in, tiled, tiles, *, phase1, phase2, sync, interpret=None):
    d, f, n1, n2 = _sizes(tiled, tiles)
    dtype = tiled["down"].dtype
    sp = tiles.down_splits
    scratch = _scratch(tiles, dtype)
    names = list(scratch)
    grid = max(n1 if phase1 else 0, n2 if phase2 else 0)
    out_type = (jax.ShapeDtypeStruct((sp, ROWS, d), jnp.float32), jax.ShapeDtypeStruct((ROWS, f), dtype))

    def body(h_gmem, gu_gmem, wd_gmem, act_src, part_gmem, act_gmem, *refs):
        ready = pl.get_global(plgpu.SemaphoreType.REGULAR((sp, d // tiles.down_cols))) if sync else None
        _program(lax.axis_index("blocks"), h_gmem, gu_gmem, wd_gmem, part_gmem,
                 act_gmem if phase1 else act_src, dict(zip(names, refs, strict=True)), ready,
                 d=d, f=f, tiles=tiles, dtype=dtype, phase1=phase1, phase2=phase2)

    return plgpu.kernel(body, out_type=out_type, grid=(grid,), grid_names=("blocks",),
                        scratch_types=[scratch[k] for k in names],
                        interpret=_interpret_params(interpret))(h, tiled["gate_up"], tiled["down"], act_in)


def _persistent_call(h, tiled, tiles: ExpertMlpTiles, _sync: bool = True):
    _, _, n1, n2 = _check(h, tiled, tiles)
    if n1 != n2:
        raise ValueError(f"the persistent kernel runs one phase-1 and one phase-2 item per block: F / gate_cols = "
                         f"{n1} must equal D / down_cols * down_splits = {n2} (choose the tiles so)")
    part, _ = _launch(h, jnp.zeros((1, 1), h.dtype), tiled, tiles, phase1=True, phase2=True, sync=_sync,
                      interpret=False)
    return part


def gate_up_phase(h, tiled, tiles: ExpertMlpTiles = ExpertMlpTiles(), *, interpret=None):
    """Phase 1 alone, one launch (every item, no semaphores): act [ROWS, F]. For tests in interpret mode."""
    _check(h, tiled, tiles)
    _, act = _launch(h, jnp.zeros((1, 1), h.dtype), tiled, tiles, phase1=True, phase2=False, sync=False,
                     interpret=interpret)
    return act


def down_phase(act, tiled, tiles: ExpertMlpTiles = ExpertMlpTiles(), *, interpret=None):
    """Phase 2 alone, one launch (every item, no semaphores): the float32 split partials [S, ROWS, D]."""
    d, f, _, _ = _sizes(tiled, tiles)
    if act.shape != (ROWS, f) or act.dtype != tiled["down"].dtype:
        raise ValueError(f"act must be [{ROWS}, F={f}] {tiled['down'].dtype}; got {act.shape=} {act.dtype=}")
    part, _ = _launch(jnp.zeros((ROWS, d), act.dtype), act, tiled, tiles, phase1=False, phase2=True, sync=False,
                      interpret=interpret)
    return part


def _interpret_params(interpret):
    return plgpu.InterpretGPUParams() if resolve_interpret(interpret) else None


def expert_mlp(h: jax.Array, tiled: dict, tiles: ExpertMlpTiles = ExpertMlpTiles(), *,
               interpret: bool | None = None) -> jax.Array:
    """down(gelu_tanh(h @ Wg) * (h @ Wu)) for h [M, D] bfloat16 -> [M, D] float32 (the S split partials summed),
    one persistent launch per 64 rows. In interpret mode (the CPU default) the same tile code runs as two launches
    per 64 rows, phase 1 then phase 2, because Pallas' interpreter has no global semaphores."""
    if h.ndim != 2:
        raise ValueError(f"h must be [M, D]; got {h.shape=}")
    interpret = resolve_interpret(interpret)
    m = h.shape[0]
    chunks = -(-m // ROWS)
    hp = jnp.pad(h, ((0, chunks * ROWS - m), (0, 0)))
    parts = []
    for i in range(chunks):
        rows = hp[i * ROWS:(i + 1) * ROWS]
        if interpret:
            part = down_phase(gate_up_phase(rows, tiled, tiles, interpret=True), tiled, tiles, interpret=True)
        else:
            part = _persistent_call(rows, tiled, tiles)
        parts.append(part.sum(0))
    return jnp.concatenate(parts, 0)[:m]


def expert_mlp_emulated(h: jax.Array, tiled: dict, tiles: ExpertMlpTiles = ExpertMlpTiles()) -> jax.Array:
    """The persistent kernel's schedule in plain JAX: phase-1 items each over K in block_k steps (float32
    accumulation, products rounded to h's dtype, GeGLU in float32), phase-2 items as split partials over their
    K slice in block_k steps, the S partials summed in split order. Runs anywhere; any dtype."""
    if h.ndim != 2:
        raise ValueError(f"h must be [M, D]; got {h.shape=}")
    d, f, n1, _ = _sizes(tiled, tiles)
    bk, c, e, sp = tiles.block_k, tiles.gate_cols, tiles.down_cols, tiles.down_splits
    hp = lax.Precision.HIGHEST
    x = h.astype(jnp.float32)
    gu = tiled["gate_up"].astype(jnp.float32).reshape(n1, d, 2, c)  # [n1, D, gate|up, C]
    acc = jnp.zeros((n1, 2, h.shape[0], c), jnp.float32)
    for i in range(d // bk):
        ks = slice(i * bk, (i + 1) * bk)
        acc = acc + jnp.einsum("MK,IKGC->IGMC", x[:, ks], gu[:, ks], precision=hp)
    gate, up = (acc[:, g].astype(h.dtype).astype(jnp.float32) for g in (0, 1))
    act = (gelu_tanh(gate) * up).astype(h.dtype)  # [n1, M, C]
    act = act.transpose(1, 0, 2).reshape(h.shape[0], f).astype(jnp.float32)
    wd = tiled["down"].astype(jnp.float32)  # [D/E, F, E]
    kd = f // sp
    parts = []
    for split in range(sp):
        p = jnp.zeros((h.shape[0], d // e, e), jnp.float32)
        for j in range(kd // bk):
            ks = slice(split * kd + j * bk, split * kd + (j + 1) * bk)
            p = p + jnp.einsum("MK,NKE->MNE", act[:, ks], wd[:, ks], precision=hp)
        parts.append(p.reshape(h.shape[0], d))
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def expert_mlp_reference(h: jax.Array, gating_einsum: jax.Array, linear: jax.Array) -> jax.Array:
    """The expert MLP on openpi's weights in plain JAX: float32 (HIGHEST) products, gate/up rounded to h's dtype,
    GeGLU in float32, the activation rounded to h's dtype, down in float32 -> [M, D] float32."""
    x = h.astype(jnp.float32)
    gate, up = (jnp.einsum("MD,DF->MF", x, gating_einsum[i].astype(jnp.float32), precision=lax.Precision.HIGHEST)
                .astype(h.dtype).astype(jnp.float32) for i in (0, 1))
    act = (gelu_tanh(gate) * up).astype(h.dtype).astype(jnp.float32)
    return jnp.einsum("MF,FD->MD", act, linear.astype(jnp.float32), precision=lax.Precision.HIGHEST)


def main():
    """Micro-benchmark on a GPU (`python -m pallas_kernels.expert_mlp_mgpu`): the persistent kernel at the action
    expert's shapes (50 rows, D 1024, F 4096, bf16), 18 layers chained in one jit (each its own weights, so they
    stream from HBM), against today's path (Pallas geglu_matmul on [2, F, D] + XLA's down einsum); correctness
    first, then the median of interleaved timed calls."""
    import sys
    import time

    import numpy as np

    from pallas_kernels.skinny_matmul import geglu_matmul

    if jax.default_backend() != "gpu":
        sys.exit("pallas_kernels.expert_mlp_mgpu main(): a GPU micro-benchmark; JAX sees no GPU")
    layers, m, d, f, repeats = 18, 50, 1024, 4096, 30
    keys = jax.random.split(jax.random.key(0), 2 * layers + 1)
    gating = [(jax.random.normal(keys[2 * i], (2, d, f), jnp.float32) * d ** -0.5).astype(jnp.bfloat16)
              for i in range(layers)]
    linear = [(jax.random.normal(keys[2 * i + 1], (f, d), jnp.float32) * f ** -0.5).astype(jnp.bfloat16)
              for i in range(layers)]
    tiled = [tile_weights(g, w) for g, w in zip(gating, linear, strict=True)]
    transposed = [jnp.swapaxes(g, 1, 2) for g in gating]
    x = jax.random.normal(keys[-1], (m, d), jnp.float32).astype(jnp.bfloat16)
    ref = np.asarray(expert_mlp_reference(x, gating[0], linear[0]), np.float64)
    got = np.asarray(jax.jit(expert_mlp)(x, tiled[0]), np.float64)
    again = np.asarray(jax.jit(expert_mlp)(x, tiled[0]), np.float64)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"one layer: rel err vs reference {err:.2e}, second call identical: {bool((got == again).all())}",
          flush=True)

    def chain(op):
        def run(x, weights):
            for w in weights:
                x = (x.astype(jnp.float32) + 1e-2 * op(x, w)).astype(x.dtype)
            return x
        return jax.jit(run)

    def today(x, w):
        g, lin = w
        return jnp.einsum("MF,FD->MD", geglu_matmul(x, g, interpret=False), lin).astype(jnp.float32)

    fns = {"Pallas geglu_matmul + XLA down": (chain(today), list(zip(transposed, linear, strict=True))),
           "persistent expert_mlp (Mosaic GPU)": (chain(expert_mlp), tiled)}
    outs = {name: np.asarray(jax.block_until_ready(fn(x, w)), np.float64) for name, (fn, w) in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(3 + repeats):
        for name, (fn, w) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, w))
            times[name].append(time.perf_counter() - t0)
    base = outs["Pallas geglu_matmul + XLA down"]
    print(f"{jax.devices()[0].device_kind}: expert MLP, M={m} D={d} F={f}, bf16, {layers} layers chained")
    for name in fns:
        per_layer = float(np.median(times[name][3:])) / layers
        e = np.linalg.norm(outs[name] - base) / np.linalg.norm(base)
        print(f"  {name:36s} {per_layer * 1e6:7.2f} us per layer  {3 * d * f * 2 / per_layer / 1e9:6.0f} GB/s of "
              f"weights  rel err vs today's {e:.1e}")


if __name__ == "__main__":
    main()

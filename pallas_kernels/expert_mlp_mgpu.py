"""The action expert's whole MLP (gate/up + GeGLU, then the down projection) as one persistent Mosaic GPU kernel.

Axis legend: M rows (action tokens, padded to 64), D width (contracted by gate/up, produced by down), F mlp dim,
S the down projection's K splits, C gate/up output columns of one work item, E down output columns of one item.

The first stage of the denoise megakernel (issue 17): two phases in one launch instead of a GeGLU kernel, a down
GEMM and their hand-off through XLA. At M = 64 both GEMMs read their weights for ~0.1% of the tensor cores' work,
so the kernel is a weight stream, and the point of one launch is that the stream does not stop between them.

Work split (grid = one block per work item, all resident at once: 128 blocks at the expert's sizes, <= the SMs):
- phase 1, item i < F / C: act[:, iC:(i+1)C] = gelu_tanh(h @ Wg[:, cols]) * (h @ Wu[:, cols]), K = D streamed
  in block_k steps through a `stages`-deep TMA ring (h tile + gate tile + up tile per step), one warpgroup's
  wgmma per operand pair, float32 accumulators; each product rounded to the model dtype before the GeGLU, as
  upstream's einsum does. The C columns are stored to the act buffer (an output of the kernel, in HBM/L2).
- phase 2, item j < (D / E) * S: split s = j % S, columns n = j // S; partial[s, :, nE:(n+1)E] =
  act[:, s*F/S:(s+1)*F/S] @ Wd[s-th K slice, cols]. Split-K because D / E = 16 column slices alone would leave
  112 SMs idle; the S float32 partials are summed by the caller's residual fusion (deterministic, no atomics).
- the weight tile of the block's phase-2 item is requested (TMA, its own smem) before phase 1 starts: weights do
  not depend on activations, so HBM keeps streaming while phase 2 waits for its activations.
- hand-off: a phase-2 item needs the F / S act columns of its split, made by F / (S C) phase-1 items. Each
  phase-1 item, once its TMA store of act has completed, signals a global semaphore per consumer of its split
  ([S, D / E] semaphores, +1 each, release at GPU scope); a consumer waits for its count and decrements it by as
  much, so every semaphore is back at 0 when the kernel ends (no wind-back pass, correct on the next call).
  There is no grid-wide barrier: a phase-2 item starts as soon as its own producers are done.

Weights come pre-tiled (`tile_weights`, done once at load time) so that every TMA box is one contiguous run of
HBM: gate/up [F/C, D, 2C] (an item's C gate columns, then its C up columns: one wgmma B tile whose rows are
128 bytes, the same swizzle as the h tile, which Mosaic GPU's wgmma requires), down [D/E, F, E].

`expert_mlp(h, tiled)` (rows in 64-row chunks: batch 2's 100 rows are two launches, each streaming the weights;
bfloat16 only: Hopper's wgmma has no exact float32 path) returns the [M, D] down projection in float32.
`expert_mlp_reference` is the same in plain JAX. The semaphores run only on the card; on the CPU each phase's tile
function runs in Mosaic GPU interpret mode as its own kernel (`gate_up_phase`, `down_phase`), and
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

ROWS = 64  # rows per launch: one warpgroup's wgmma M
SHARED_MEMORY_BYTES = 227 * 1024  # per block on the H100 / H200


@dataclasses.dataclass(frozen=True)
class ExpertMlpTiles:
    """Work split of `expert_mlp`. gate_cols (C): act columns per phase-1 item; down_cols (E): output columns per
    phase-2 item; down_splits (S): K splits of the down projection; block_k: contracted elements per TMA step
    (64 bf16 = one 128-byte swizzled row); stages: depth of phase 1's TMA ring."""

    gate_cols: int = 32
    down_cols: int = 64
    down_splits: int = 8
    block_k: int = 64
    stages: int = 4

    def __post_init__(self):
        for name in ("gate_cols", "down_cols", "block_k"):
            v = getattr(self, name)
            if v < 16 or v % 16:
                raise ValueError(f"{name} must be a multiple of 16, got {name}={v}")
        if self.down_splits < 1 or self.stages < 1:
            raise ValueError(f"need down_splits, stages >= 1; got {self.down_splits=}, {self.stages=}")


def gelu_tanh(x):
    """jax.nn.gelu(approximate=True) in float32 (the same formula as skinny_matmul.gelu_tanh)."""
    return x * (0.5 * (1.0 + jnp.tanh(jnp.float32(0.7978845608028654) * (x + 0.044715 * (x * x * x)))))


def tile_weights(gating_einsum: jax.Array, linear: jax.Array, tiles: ExpertMlpTiles = ExpertMlpTiles()) -> dict:
    """openpi's gating_einsum [2, D, F] and linear [F, D] -> {"gate_up": [F/C, D, 2C], "down": [D/E, F, E]}: the
    same numbers, laid out so each work item's weight tiles are contiguous."""
    two, d, f = gating_einsum.shape
    if two != 2 or linear.shape != (f, d):
        raise ValueError(f"need gating_einsum [2, D, F] and linear [F, D]; got {gating_einsum.shape=}, "
                         f"{linear.shape=}")
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


def _scratch(d, f, tiles: ExpertMlpTiles, dtype, *, phase1: bool, phase2: bool) -> dict:
    bk, c, e, st = tiles.block_k, tiles.gate_cols, tiles.down_cols, tiles.stages
    k2 = f // tiles.down_splits // bk
    scratch = {}
    if phase1:
        scratch.update(
            h_smem=plgpu.SMEM((st, ROWS, bk), dtype, transforms=_transforms(bk, dtype)),
            gu_smem=plgpu.SMEM((st, bk, 2 * c), dtype, transforms=_transforms(2 * c, dtype)),
            in_bar=plgpu.Barrier(num_arrivals=2, num_barriers=st),  # the h tile and the gate|up tile
            act_out=plgpu.SMEM((ROWS, c), dtype, transforms=_transforms(c, dtype)),
        )
    if phase2:
        scratch.update(
            wd_smem=plgpu.SMEM((k2, bk, e), dtype, transforms=_transforms(e, dtype)),
            wd_bar=plgpu.Barrier(num_barriers=k2),
            a2_smem=plgpu.SMEM((k2, ROWS, bk), dtype, transforms=_transforms(bk, dtype)),
            a2_bar=plgpu.Barrier(num_barriers=k2),
            part_out=plgpu.SMEM((e // 32, ROWS, 32), jnp.float32, transforms=_transforms(32, jnp.float32)),
        )
    return scratch


def smem_bytes(d: int, f: int, tiles: ExpertMlpTiles = ExpertMlpTiles(), dtype=jnp.bfloat16) -> int:
    """Shared memory one block of the persistent kernel takes (both phases' buffers)."""
    bk, c, e, st = tiles.block_k, tiles.gate_cols, tiles.down_cols, tiles.stages
    k2 = f // tiles.down_splits // bk
    it = jnp.dtype(dtype).itemsize
    return it * (st * (ROWS * bk + 2 * bk * c) + ROWS * c + k2 * (bk * e + ROWS * bk)) + 4 * ROWS * e


def _gate_up_tile(item, h_gmem, gu_gmem, act_gmem, s, *, d, tiles, dtype):
    """Phase 1, one item: act[:, item*C:(item+1)*C] = GeGLU over K = d, stored (TMA) and waited for."""
    bk, c, st = tiles.block_k, tiles.gate_cols, tiles.stages
    k_steps = d // bk

    def fetch(i, slot):
        ks = pl.ds(i * bk, bk)
        plgpu.copy_gmem_to_smem(h_gmem.at[:, ks], s["h_smem"].at[slot], s["in_bar"].at[slot])
        plgpu.copy_gmem_to_smem(gu_gmem.at[item, ks, :], s["gu_smem"].at[slot], s["in_bar"].at[slot])

    for slot in range(min(st, k_steps)):
        fetch(slot, slot)

    def scope(acc):
        def step(i, carry):
            slot = lax.rem(i, st)
            plgpu.barrier_wait(s["in_bar"].at[slot])
            plgpu.wgmma(acc, s["h_smem"].at[slot], s["gu_smem"].at[slot])
            plgpu.wgmma_wait(0)

            @pl.when(i + st < k_steps)
            def _():
                fetch(i + st, slot)

            return carry

        lax.fori_loop(0, k_steps, step, None)
        both = acc[...].astype(dtype).astype(jnp.float32)  # upstream rounds each einsum to the model dtype
        gate, up = both[:, :c], both[:, c:]
        s["act_out"][...] = (gelu_tanh(gate) * up).astype(dtype)

    pl.run_scoped(scope, plgpu.ACC((ROWS, 2 * c), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(s["act_out"], act_gmem.at[:, pl.ds(item * c, c)])
    plgpu.wait_smem_to_gmem(0, wait_read_only=False)  # the act columns are in memory before anyone is told


def _request_down_weights(item, wd_gmem, s, *, f, tiles):
    """Phase 2's weight tiles for `item`, requested (TMA) without waiting."""
    bk, sp = tiles.block_k, tiles.down_splits
    split, col = lax.rem(item, sp), lax.div(item, sp)
    k2 = f // sp // bk
    for j in range(k2):
        plgpu.copy_gmem_to_smem(wd_gmem.at[col, pl.ds(split * (f // sp) + j * bk, bk), :], s["wd_smem"].at[j],
                                s["wd_bar"].at[j])


def _down_tile(item, act_gmem, part_gmem, s, *, f, tiles):
    """Phase 2, one item (its weights already requested): the float32 partial of its split and columns."""
    bk, e, sp = tiles.block_k, tiles.down_cols, tiles.down_splits
    split, col = lax.rem(item, sp), lax.div(item, sp)
    k2 = f // sp // bk
    for j in range(k2):
        plgpu.copy_gmem_to_smem(act_gmem.at[:, pl.ds(split * (f // sp) + j * bk, bk)], s["a2_smem"].at[j],
                                s["a2_bar"].at[j])

    def scope(acc):
        for j in range(k2):
            plgpu.barrier_wait(s["wd_bar"].at[j])
            plgpu.barrier_wait(s["a2_bar"].at[j])
            plgpu.wgmma(acc, s["a2_smem"].at[j], s["wd_smem"].at[j])
        plgpu.wgmma_wait(0)
        out = acc[...]
        for q in range(e // 32):
            s["part_out"].at[q][...] = out[:, q * 32:(q + 1) * 32]

    pl.run_scoped(scope, plgpu.ACC((ROWS, e), jnp.float32))
    plgpu.commit_smem()
    for q in range(e // 32):
        plgpu.copy_smem_to_gmem(s["part_out"].at[q], part_gmem.at[split, :, pl.ds(col * e + q * 32, 32)])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _signal_consumers(ready, split: int, consumers: int):
    """+1 on ready[split, n] for every consumer n: one release fence, then relaxed adds (a release pattern under
    PTX's memory model). Pallas' semaphore_signal is a release add each, and on the H200 each costs ~0.3 us."""

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


def _persistent_call(h, tiled, tiles: ExpertMlpTiles, _sync: str = "per-consumer"):
    d, f, n1, n2 = _check(h, tiled, tiles)
    dtype = h.dtype
    sp, c, e = tiles.down_splits, tiles.gate_cols, tiles.down_cols
    producers = f // sp // c  # phase-1 items per split
    consumers = d // e  # phase-2 items per split
    grid = max(n1, n2)
    scratch = _scratch(d, f, tiles, dtype, phase1=True, phase2=True)
    names = list(scratch)

    def body(h_gmem, gu_gmem, wd_gmem, part_gmem, act_gmem, *refs):
        s = dict(zip(names, refs, strict=True))
        ready = pl.get_global(plgpu.SemaphoreType.REGULAR((sp, consumers)))
        b = lax.axis_index("blocks")

        @pl.when(b < n2)
        def _():
            _request_down_weights(b, wd_gmem, s, f=f, tiles=tiles)

        @pl.when(b < n1)
        def _():
            _gate_up_tile(b, h_gmem, gu_gmem, act_gmem, s, d=d, tiles=tiles, dtype=dtype)
            split = lax.div(b * c, f // sp)
            if _sync == "per-consumer":
                for n in range(consumers):
                    plgpu.semaphore_signal(ready.at[split, n], 1, memory_scope="gpu")
            elif _sync == "one-fence":
                for sv in range(sp):
                    @pl.when(split == sv)
                    def _(sv=sv):
                        _signal_consumers(ready, sv, consumers)

        @pl.when(b < n2)
        def _():
            if _sync != "none":
                plgpu.semaphore_wait(ready.at[lax.rem(b, sp), lax.div(b, sp)], producers, memory_scope="gpu")
            _down_tile(b, act_gmem, part_gmem, s, f=f, tiles=tiles)

    part, _ = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((sp, ROWS, d), jnp.float32), jax.ShapeDtypeStruct((ROWS, f), dtype)),
        grid=(grid,),
        grid_names=("blocks",),
        scratch_types=[scratch[k] for k in names],
    )(h, tiled["gate_up"], tiled["down"])
    return part


def gate_up_phase(h, tiled, tiles: ExpertMlpTiles = ExpertMlpTiles(), *, interpret=None):
    """Phase 1 alone, one launch (every item, no semaphores): act [ROWS, F]. For tests in interpret mode."""
    d, f, n1, _ = _check(h, tiled, tiles)
    scratch = _scratch(d, f, tiles, h.dtype, phase1=True, phase2=False)
    names = list(scratch)

    def body(h_gmem, gu_gmem, act_gmem, *refs):
        _gate_up_tile(lax.axis_index("blocks"), h_gmem, gu_gmem, act_gmem, dict(zip(names, refs, strict=True)),
                      d=d, tiles=tiles, dtype=h.dtype)

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((ROWS, f), h.dtype), grid=(n1,),
                        grid_names=("blocks",), scratch_types=[scratch[k] for k in names],
                        interpret=_interpret_params(interpret))(h, tiled["gate_up"])


def down_phase(act, tiled, tiles: ExpertMlpTiles = ExpertMlpTiles(), *, interpret=None):
    """Phase 2 alone, one launch (every item, no semaphores): the float32 split partials [S, ROWS, D]."""
    d, f, _, n2 = _sizes(tiled, tiles)
    if act.shape != (ROWS, f) or act.dtype != tiled["down"].dtype:
        raise ValueError(f"act must be [{ROWS}, F={f}] {tiled['down'].dtype}; got {act.shape=} {act.dtype=}")
    scratch = _scratch(d, f, tiles, act.dtype, phase1=False, phase2=True)
    names = list(scratch)

    def body(act_gmem, wd_gmem, part_gmem, *refs):
        s = dict(zip(names, refs, strict=True))
        b = lax.axis_index("blocks")
        _request_down_weights(b, wd_gmem, s, f=f, tiles=tiles)
        _down_tile(b, act_gmem, part_gmem, s, f=f, tiles=tiles)

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((tiles.down_splits, ROWS, d), jnp.float32),
                        grid=(n2,), grid_names=("blocks",), scratch_types=[scratch[k] for k in names],
                        interpret=_interpret_params(interpret))(act, tiled["down"])


def _interpret_params(interpret):
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return plgpu.InterpretGPUParams() if interpret else None


def expert_mlp(h: jax.Array, tiled: dict, tiles: ExpertMlpTiles = ExpertMlpTiles()) -> jax.Array:
    """down(gelu_tanh(h @ Wg) * (h @ Wu)) for h [M, D] bfloat16 -> [M, D] float32 (the S split partials summed),
    one persistent launch per 64 rows. The GPU only (global semaphores); see the module docstring for the CPU."""
    if h.ndim != 2:
        raise ValueError(f"h must be [M, D]; got {h.shape=}")
    m = h.shape[0]
    chunks = -(-m // ROWS)
    hp = jnp.pad(h, ((0, chunks * ROWS - m), (0, 0)))
    parts = [_persistent_call(hp[i * ROWS:(i + 1) * ROWS], tiled, tiles).sum(0) for i in range(chunks)]
    return jnp.concatenate(parts, 0)[:m]


def expert_mlp_emulated(h: jax.Array, tiled: dict, tiles: ExpertMlpTiles = ExpertMlpTiles()) -> jax.Array:
    """The persistent kernel's schedule in plain JAX: phase-1 items each over K in block_k steps (float32
    accumulation, products rounded to h's dtype, GeGLU in float32), phase-2 items as split partials over their
    K slice in block_k steps, the S partials summed in split order. Runs anywhere; any dtype."""
    if h.ndim != 2:
        raise ValueError(f"h must be [M, D]; got {h.shape=}")
    d, f, n1, n2 = _sizes(tiled, tiles)
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

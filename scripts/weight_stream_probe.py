#!/usr/bin/env python3
"""How fast can one persistent Mosaic GPU kernel stream weights from HBM? The question issue 17's megakernel left
open (docs/PERF.md, session 7: the persistent expert MLP streamed 1.6 TB/s, 38% of the copy ceiling, and deeper
weight rings made it slower), asked without the rest of the MLP in the way.

Axis legend: B blocks (the grid, one per SM or more), T tiles per block, R rows of a tile (its K extent), C the
tile's 64 columns (128 bytes of bf16: one swizzled row), M the 64 rows of the activation a wgmma multiplies.

`stream_weights(w, h, probe)`: block b streams its own contiguous slab w[b] = T tiles of [R, C] through a ring of
`slots` shared-memory buffers, one TMA copy per tile, the first `slots` issued before anything waits. What each
tile costs the block (`consume`):
- "none":  wait for its barrier, refill the slot with tile t + slots (the pure TMA stream: no compute at all);
- "wgmma": acc += h[:, :R] @ tile (one warpgroup's wgmma, float32 accumulator), wait for it, then refill: the
           schedule of the session-7 kernels;
- "lag1":  issue tile t's wgmma, wait until only it is in flight (tile t-1's is done), refill tile t-1's slot:
           one wgmma overlapping the next wait, the usual pipelined-matmul order;
- "hstream": lag1 with the activation streamed too: tile t multiplies its own h tile h[:, tR:(t+1)R] (h is
           [M, T R], the same for every block, so after the first block it comes from L2), through a second ring:
           the session-7 kernel's pattern, where every block re-read all of h.
The output is the block's float32 accumulator [M, C] ("none": the first 64 rows of its last tile), checked
against `stream_weights_reference` in interpret mode on the CPU, so every variant is known to read what it claims.

Run on the card (no other arguments): `python3 scripts/weight_stream_probe.py` times every variant in PROBES by
CUPTI device time (jax.experimental.mosaic.gpu.profiler) over a 302 MB weight set (18 x the expert's 16.8 MB
gate/up weight: HBM, not L2), beside XLA's device-to-device copy and a sum over the same bytes, and prints GB/s.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

COLS = 64  # one 128-byte swizzled row of bf16
ROWS = 64  # wgmma M: the activation rows
CONSUME = ("none", "wgmma", "lag1", "hstream")
SHARED_MEMORY_BYTES = 227 * 1024


@dataclasses.dataclass(frozen=True)
class StreamProbe:
    """One variant: tile_rows (R) rows of 64 bf16 columns per TMA copy (64 rows = 8 KiB), `slots` tiles in flight
    per block, `consume` what a block does per tile (module docstring)."""

    tile_rows: int = 64
    slots: int = 4
    consume: str = "none"

    def __post_init__(self):
        if self.tile_rows % 64 or not 64 <= self.tile_rows <= 256:
            raise ValueError(f"tile_rows must be 64, 128, 192 or 256 (a TMA box is at most 256 rows), got "
                             f"{self.tile_rows=}")
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots=}")
        if self.consume not in CONSUME:
            raise ValueError(f"consume must be one of {CONSUME}, got {self.consume=}")
        if self.consume in ("lag1", "hstream") and self.slots < 2:
            raise ValueError(f"lag1 refills the previous tile's slot while the current one is read: slots >= 2, got "
                             f"{self.slots=}")
        if self.smem_bytes() > SHARED_MEMORY_BYTES:
            raise ValueError(f"{self} needs {self.smem_bytes()} bytes of shared memory per block, more than "
                             f"{SHARED_MEMORY_BYTES}")

    def smem_bytes(self) -> int:
        ring = self.slots * self.tile_rows * COLS * 2
        if self.consume == "none":
            return ring
        h_tiles = self.slots if self.consume == "hstream" else 1
        return ring + h_tiles * ROWS * self.tile_rows * 2 + ROWS * COLS * 4

    def label(self) -> str:
        return f"{self.tile_rows * COLS * 2 // 1024:2d} KiB tiles x {self.slots:2d} slots, {self.consume}"


def _transforms():
    return (plgpu.TilingTransform((8, COLS)), plgpu.SwizzleTransform(128))


def _check(w, h, probe: StreamProbe):
    if w.ndim != 3 or w.shape[2] != COLS or w.shape[1] % probe.tile_rows or w.dtype != jnp.bfloat16:
        raise ValueError(f"w must be bfloat16 [B, T * tile_rows, {COLS}] with tile_rows={probe.tile_rows}; got "
                         f"{w.shape=} {w.dtype=}")
    want = (ROWS, w.shape[1] if probe.consume == "hstream" else probe.tile_rows)
    if h.shape != want or h.dtype != jnp.bfloat16:
        raise ValueError(f"h must be bfloat16 {list(want)} ([{ROWS}, tile_rows={probe.tile_rows}], with hstream "
                         f"[{ROWS}, T * tile_rows]); got {h.shape=} {h.dtype=}")
    return w.shape[0], w.shape[1] // probe.tile_rows


def stream_weights(w: jax.Array, h: jax.Array, probe: StreamProbe = StreamProbe(), *,
                   interpret: bool = False) -> jax.Array:
    """w bfloat16 [B, T * R, 64], h bfloat16 [64, R] ("hstream": [64, T * R]) -> [B, 64, 64]: float32
    accumulators, or ("none") the bfloat16 rows of each block's last tile (module docstring)."""
    blocks, n_tiles = _check(w, h, probe)
    r, slots = probe.tile_rows, probe.slots
    scratch = [plgpu.SMEM((slots, r, COLS), jnp.bfloat16, transforms=_transforms()),
               plgpu.Barrier(num_barriers=slots)]
    if probe.consume != "none":
        h_tiles = slots if probe.consume == "hstream" else 1
        scratch += [plgpu.SMEM((h_tiles, ROWS, r), jnp.bfloat16, transforms=_transforms()),
                    plgpu.Barrier(num_barriers=h_tiles), plgpu.SMEM((ROWS, COLS), jnp.float32)]
    out_dtype = jnp.bfloat16 if probe.consume == "none" else jnp.float32

    def body(w_gmem, h_gmem, out_gmem, ring, bars, *more):
        b = lax.axis_index("blocks")

        def fetch(t, slot):
            plgpu.copy_gmem_to_smem(w_gmem.at[b, pl.ds(t * r, r), :], ring.at[slot], bars.at[slot])
            if probe.consume == "hstream":
                h_smem, h_bar, _ = more
                plgpu.copy_gmem_to_smem(h_gmem.at[:, pl.ds(t * r, r)], h_smem.at[slot], h_bar.at[slot])

        for t in range(min(slots, n_tiles)):  # the stream starts before anything waits
            fetch(t, t)

        if probe.consume == "none":
            def step(t, carry):
                slot = lax.rem(t, slots)
                plgpu.barrier_wait(bars.at[slot])

                @pl.when(t + slots < n_tiles)
                def _():
                    fetch(t + slots, slot)

                return carry

            lax.fori_loop(0, n_tiles - 1, step, None)
            last = (n_tiles - 1) % slots
            plgpu.barrier_wait(bars.at[last])
            plgpu.copy_smem_to_gmem(ring.at[last, pl.ds(0, ROWS)], out_gmem.at[b])
            plgpu.wait_smem_to_gmem(0)
        else:
            h_smem, h_bar, out_smem = more
            if probe.consume != "hstream":  # one h tile for every weight tile, loaded once
                plgpu.copy_gmem_to_smem(h_gmem, h_smem.at[0], h_bar.at[0])
                plgpu.barrier_wait(h_bar.at[0])

            def scope(acc):
                def step(t, carry):
                    slot = lax.rem(t, slots)
                    plgpu.barrier_wait(bars.at[slot])
                    if probe.consume == "hstream":
                        plgpu.barrier_wait(h_bar.at[slot])
                        plgpu.wgmma(acc, h_smem.at[slot], ring.at[slot])
                    else:
                        plgpu.wgmma(acc, h_smem.at[0], ring.at[slot])
                    if probe.consume == "wgmma":
                        plgpu.wgmma_wait(0)

                        @pl.when(t + slots < n_tiles)
                        def _():
                            fetch(t + slots, slot)
                    else:  # lag1, hstream: tile t-1's wgmma is done once at most one is in flight
                        plgpu.wgmma_wait(1)
                        prev = t - 1 + slots

                        @pl.when((t >= 1) & (prev < n_tiles))
                        def _():
                            fetch(prev, lax.rem(t - 1, slots))

                    return carry

                lax.fori_loop(0, n_tiles, step, None)
                plgpu.wgmma_wait(0)
                out_smem[...] = acc[...]

            pl.run_scoped(scope, plgpu.ACC((ROWS, COLS), jnp.float32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[b])
            plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((blocks, ROWS, COLS), out_dtype), grid=(blocks,),
                        grid_names=("blocks",), scratch_types=scratch,
                        interpret=plgpu.InterpretGPUParams() if interpret else None)(w, h)


def stream_weights_reference(w: jax.Array, h: jax.Array, probe: StreamProbe = StreamProbe()) -> jax.Array:
    """What `stream_weights` returns, in plain JAX."""
    blocks, n_tiles = _check(w, h, probe)
    if probe.consume == "none":
        return w[:, (n_tiles - 1) * probe.tile_rows:][:, :ROWS]
    if probe.consume == "hstream":
        return jnp.einsum("MK,BKC->BMC", h.astype(jnp.float32), w.astype(jnp.float32),
                          precision=lax.Precision.HIGHEST)
    tiles_sum = w.astype(jnp.float32).reshape(blocks, n_tiles, probe.tile_rows, COLS).sum(1)
    return jnp.einsum("MR,BRC->BMC", h.astype(jnp.float32), tiles_sum, precision=lax.Precision.HIGHEST)


def _probes() -> tuple[StreamProbe, ...]:
    """Every consume mode at each (tile rows, slots) whose ring fits one block's shared memory."""
    out = []
    for c in CONSUME:
        for r, s in ((64, 4), (64, 8), (64, 16), (128, 4), (128, 8), (256, 2), (256, 4)):
            try:
                out.append(StreamProbe(r, s, c))
            except ValueError:  # too much shared memory for this mode (hstream rings h as well)
                continue
    return tuple(out)


PROBES = _probes()
TOTAL_BYTES = 18 * 2 * 1024 * 4096 * 2  # 18 layers of the expert's gate/up weight


def main() -> int:
    from device_time import device_us

    if jax.default_backend() != "gpu":
        sys.exit("weight_stream_probe: times a GPU kernel; JAX sees no GPU")
    sms = jax.devices()[0].core_count
    print(f"{jax.devices()[0].device_kind} ({sms} SMs), jax {jax.__version__}: {TOTAL_BYTES / 1e6:.0f} MB streamed "
          f"per call; CUPTI device time, median of 20")

    def report(label, us):
        print(f"  {label:48s} {us:9.1f} us  {TOTAL_BYTES / us / 1e3:7.0f} GB/s", flush=True)

    flat = jax.random.normal(jax.random.key(0), (TOTAL_BYTES // 2,), jnp.float32).astype(jnp.bfloat16)
    report("XLA copy (read + write counted as read)", device_us(jax.jit(lambda x: x + 1), flat) / 2)
    report("XLA sum over the bytes", device_us(jax.jit(lambda x: jnp.sum(x.astype(jnp.float32))), flat))
    for blocks in (sms, 2 * sms):
        for probe in PROBES:
            if probe.smem_bytes() * (blocks // sms) > SHARED_MEMORY_BYTES:
                continue
            per_block = TOTAL_BYTES // 2 // blocks // (probe.tile_rows * COLS) * probe.tile_rows
            w = flat[: blocks * per_block * COLS].reshape(blocks, per_block, COLS)
            h_cols = per_block if probe.consume == "hstream" else probe.tile_rows
            h = jax.random.normal(jax.random.key(1), (ROWS, h_cols), jnp.float32).astype(jnp.bfloat16)
            try:
                fn = jax.jit(lambda w, h, p=probe: stream_weights(w, h, p))
                us = device_us(fn, w, h) * TOTAL_BYTES / (w.size * 2)  # scaled to the full byte count
            except Exception as e:  # a variant that does not compile here: say so, time the others
                print(f"  {blocks} blocks, {probe.label()}: FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            report(f"{blocks} blocks, {probe.label()}", us)
    return 0


if __name__ == "__main__":
    sys.exit(main())

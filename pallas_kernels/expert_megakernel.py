"""The action expert's whole L-layer stack for one Euler step in ONE persistent Mosaic GPU kernel (issue 17's
denoise megakernel): the attention block of the expert-attention probe and the MLP of the MLP-stack probe (both
in git history, tag persistent-probes-2026-12; their card figures in docs/PERF.md), combined into one launch whose
per-block weight ring streams every layer's weights without stopping at a phase or layer boundary. The building
blocks (ring, lag1 GEMM, counted grid barrier, the attention-block phases) are rewritten here; the product imports
nothing from scripts/.

Axis legend: M the 64 rows (T = 50 action tokens padded to 64; rows >= T are padding), D width (1024), N q heads
(8), one kv head, H head dim (256), Q = (N + 2) H the fused q|k|v columns, F the MLP width (4096 = 32 B), S prefix
slots (a multiple of 64, of which `length` are valid), L layers, B blocks (the grid, one per SM, all resident), R
rows of a weight tile (its K extent), C 64 columns of a weight tile, SQ QKV K splits (Kq = D / SQ), SO = B / (D / C)
K splits of the out-proj and the down projection (Ko = N H / SO, Kd = F / SO), KT key tiles of 64 (S / 64 prefix
tiles + 1 own), U = D / 32 column units of the reduce and norm phases.

The computation per layer l (`expert_stack_reference`: upstream's functions, the fast path's `expert_layer` order,
on the T real rows; x float32 throughout):
1. h = bf16(gemma.ada_rms_norm(x, attn_scale_l, attn_shift_l)),
2. qkv = ops.expert_qkv_fused(h, Wqkv_l): bf16 GEMM, RoPE at positions length + t, q * H**-0.5,
3. o = ops.expert_attend_xla over prefix keys s < length and the T own keys,
4. x = x + bf16(bf16(o @ Wo_l) * attn_gate_l),
5. h2 = bf16(ada_rms_norm(x, ffw_scale_l, ffw_shift_l)),
6. act = bf16(gelu_tanh(bf16(h2 @ Wg_l)) * bf16(h2 @ Wu_l))  (the GeGLU in float32: `_geglu`),
7. x = x + bf16(bf16(act @ Wd_l) * ffw_gate_l),
8. h = bf16(ada_rms_norm(x, attn mods of layer l + 1)), after the last layer the final norm (final scale, shift).
Returns (the final-normed h bf16 [M, D], x float32 [M, D]).

Work split per layer (B = 128 at full size), a grid barrier after every phase but the last (11 per layer, 10
with fused_rope):
- A qkv (split-K): block b < Q / 64 SQ: column tile b % (Q / 64), split b // (Q / 64); float32 partial to qkv_part.
- B reduce + RoPE: block b < 2 (N + 2) x row groups: one head half-pair's columns (i, i + 128), 64 / groups rows;
  sums the SQ partials in order, bf16, rotates q and k (host cos/sin table of gemma.rope's radians), q * 1/16.
- with MegaTiles.fused_rope (default off), A and B are one phase, A': SQ = 1, and `pack_weights` orders Wqkv's
  columns (`fused_columns`) so that block b's 64-column tile holds, of head slot n = b // 4 (q heads, k, v) and
  j = b % 4, columns [n H + 32 j, +32) then [n H + H / 2 + 32 j, +32): the 32 pairs gemma.rope rotates together
  (first half / second half of the head) at frequencies [32 j, +32). Its epilogue (`_phase_qkv_rope`) rounds the
  whole-K float32 sum to bf16, rotates q and k with those frequencies' cos / sin (loaded during the GEMM), q * 1/16,
  bf16 (B's float32 operations, shared: `_rotate`), and stores the two halves at their original columns, so C
  onward read qkv unchanged. v is permuted too though it is not rotated: every tile's epilogue and store are then
  the same program (a branch on the slot only picks the rounding), and v's tiles cost the same either way. In
  interpret mode A' gives qkv bit-identical to A at SQ = 1 then B (tests/test_expert_megakernel.py).
  Why it can win although SQ = 1 gives the 40 QKV blocks twice the Wqkv bytes each (Kq = D: 16 tiles, a 44-tile
  stream per layer instead of 36 for 80 half-K blocks, the same bytes in all): the ring streams across phases and
  the layer is bound by its chain of phases and barriers, not by bytes, and this removes one phase and one grid
  barrier per layer (10 instead of 11) for 8 more tiles on 40 blocks' A.
- C attention (flash-decoding): block b < N KT: head b % N, key tile b // N (the last one: the own keys); partial
  o, row max m and row sum l of its 64 keys (invalid keys masked to upstream's BIG_NEG by a host 0/1 vector).
- D combine: head b % N, H / (B / N) columns: the key tiles' partials merged in key-tile order, o bf16.
- E out-proj (split-K): block b = s (D / 64) + n: o[:, s Ko:+Ko] @ Wo_l[s Ko:+Ko, 64n:+64] float32 to part[s].
- F reduce + gated residual: block u < U owns x[:, 32u:+32] in shared memory for the whole call: x += f32(bf16(
  bf16(sum_s part[s]) * attn_gate)) in split order, then its per-row sum of squares over its 32 columns to ssq[u].
- G norm (ffw mods): block u sums ssq[0..U-1] in order, h[:, 32u:+32] = bf16(x r bf16(1 + scale) + shift).
- M1 gate/up + GeGLU: block b's slab is [D, 32 gate cols | 32 up cols] (act columns [32b, +32)): h @ slab, the
  GeGLU of the two halves, act[:, 32b:+32] bf16.
- M2 down (split-K, like E): block b = s (D / 64) + n: act[:, s Kd:+Kd] @ Wd_l[s Kd:+Kd, 64n:+64] to part[s].
- F' reduce + gated residual with the ffw gate (F's program), G' norm with the next layer's attn mods or, after the
  last layer, the final mods (G's program; the host stacks them as `norms` [L + 1, 2, D]).
- prologue: F without the sum (ssq of x_in) and G for layer 0's attention norm.
Why this split: each phase's natural parallelism in [64, *] tiles that wgmma takes; the x ownership of the attention
probe (32 columns x all 64 rows per block) so the norm's row sums of squares are one [U, M] hand-off. The MLP's
phase 1 needs all of h2 (so G -> M1 stays a barrier) and the norm needs whole rows (so F -> G does too).

Hand-offs: 2 + 11 L - 1 rounds (2 + 10 L - 1 with fused_rope: `rounds_per_call`) of one global counter per call
(`_counted_barrier`: signal, wait without decrement until B (round + 1), async-proxy fences either side, TMA stores
awaited before signalling). No barrier follows the last layer's final norm (h goes out as the result). Block 0
winds the counter back (by B x those rounds) at the end once every block has signalled `done`.

THE point: one weight ring per block across the whole call. `pack_weights` gives block b one contiguous array of its
R-row tiles in stream order, per layer [its Wqkv slab (QKV blocks only)] [its Wo slab] [its M1 slab] [its M2 slab];
blocks without QKV work are zero-padded at the end (never read). The first `slots` copies are issued at kernel start
and each slot is refilled `slots` tiles on as soon as the wgmma reading it is done (lag1), with no regard to phase
or layer boundaries: while a block waits on a barrier, reduces or attends, its next tiles are in flight. The A
operands (h, o, act) come through an `act_slots` ring started after the barrier that made them. Prefix K/V are read
by the attention phase directly (TMA, not ringed). The small phases issue their static loads (kernel inputs no block
writes: prefix K / V and the key mask, the norms' scale / shift, the gates, B's cos / sin) before the grid barrier
ahead of them and wait for them after it (`_Hand`, `_prefetched`), so only the loads of what other blocks wrote
start after a barrier (tests/megakernel_schedule.py `late_static_loads` checks it).

Race-freedom (every buffer written in one phase, read only in the next, so the barrier between orders the write
before the read; its next write comes after a barrier that follows every read):
- h: written by G' (read by A) and by G (read by M1); G of layer l follows the barriers after A (its last reader),
  G' follows the one after M1.
- qkv_part A -> B; qkv B -> C; o_part, ml C -> D; o D -> E; act M1 -> M2; all rewritten a layer later. With
  fused_rope there is no qkv_part and qkv is written in A' and read in C (the barrier after A' orders them; A' of
  the next layer follows the barriers after C, its last reader); A' waits its cos / sin loads on bars 0 and 1 in
  the phase that issues them, as every small phase does.
- part: E -> F and M2 -> F'; M2 writes after the barriers following F, E (next layer) after those following F'.
- ssq: F -> G and F' -> G' (and the prologue -> G of layer 0); likewise one barrier apart at least.
- x lives in its owner block's shared memory (F, G, F', G' of the same block), stored once at the end.
- weight ring / A ring slots: a slot is refilled only after the wgmma reading it has retired (wgmma_wait(1)).

Simplified (the math is not): batch 1; S a multiple of 64; `length` enters as the host-made cos/sin table and 0/1
key vector (upstream's values); grid barriers everywhere; SQ = 2 and uneven weight bytes per block (QKV blocks
stream Wqkv too); padded rows t >= T are computed (they attend like real rows) but never keys, never compared; one
key tile per attention block; p to the PV wgmma through shared memory (the interpreter's wgmma takes no register A);
one tile size for the whole ring (64 rows: the attention phase's q/k/v leave no room for 16 KiB tiles).

On the CPU (Mosaic GPU interpret mode has no global semaphores) every phase's block program runs as its own launch
(`expert_stack_phases`), `expert_stack_emulated` replays the schedule in plain JAX (same tiles, split orders, key
tile order, rounding points), and the tests lower the persistent kernel for Hopper at full size.

Barriers that could go: fused_rope takes B's (above). Otherwise none of the 11 is redundant as written (every phase
reads what the one before wrote from other blocks: G's norm needs whole rows of x, M1 needs all of h2, F / F' all
SO partials). Merging would need redundant work instead: e.g. every M1 block re-normalizing the rows itself from
the ssq and all of x (a [64, D] float32 read per block instead of the G -> M1 hand-off), or split-K groups
(mlp_stack's sync="groups") for E -> F and M2 -> F' (only the column group's SO blocks).

Card run (one device call; a semaphore bug hangs, so wrap it in `timeout`):
`PYTHONPATH=$PWD:$PWD/scripts timeout 450 python3 -m pallas_kernels.expert_megakernel` (`main`; three variants
now, so more than the 300 s two took): correctness first
(`CARD_VARIANTS` at L = 18 and L = 1 against the reference on the 50 real rows, x and the final h, gate 1e-2;
second call bit-identical; finite; FAILED and exit 1 otherwise; a time-stamped line as each variant's L = 18 and
L = 1 executables finish compiling, so a slow compile and a hang read apart), then CUPTI device time of each at
L = 18 and L = 1, a per-layer line ((L18 - L1) / 17), and today's `pallas` expert
(scripts/megakernel_baseline.py: the product's expert_layer) timed the same way.
`... expert_megakernel 64,3,4 64,4,2` times those variants instead, without the baseline: each is MegaTiles'
fields in order, TILE_ROWS,SLOTS,ACT_SLOTS[,BLOCKS[,QKV_SPLITS[,FUSED_ROPE 0/1]]] (`_parse_variant`), e.g.
`64,4,4 64,4,4,128,1 64,4,4,128,1,1`: the default, its rings at SQ = 1 (what SQ = 1 alone costs) and with RoPE
fused (CARD_VARIANTS has the first and the last). Two instruments, after the timings: `--no-barriers` times each
variant without its grid barriers (`expert_stack(barriers=False)`: the phases race, nothing is compared; L = 18
minus it is what the barriers and the waits for the slowest block cost), and `--profile DIR` makes one call per
variant with Mosaic GPU's on-device profiler and prints `pallas_kernels.phase_profile`'s per-phase table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import sys
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64  # M
COLS = 64  # C
HALF = 32  # float32 columns in one 128-byte swizzled row; the reduce / norm column unit
GATE_COLS = 32  # act columns per M1 block (its slab is gate | up)
HEAD = 256  # H
ROPE_TILES = HEAD // 2 // HALF  # fused_rope: a head slot's 64-column tiles, one per 32 RoPE frequencies
TOKENS = 50  # T
KEY_TILE = 64
RMS_EPS = 1e-6
BIG_NEG = -2.3819763e38  # upstream's mask value
FULL_D, FULL_HEADS, FULL_F, FULL_S, FULL_LAYERS, FULL_LENGTH = 1024, 8, 4096, 576, 18, 572
SHARED_MEMORY_BYTES = 227 * 1024
GATE = 1e-2
NUM_BARS = 32  # >= max(2 SQ + 2, 2 KT, SO + 1) + 1; the last one is _load_x's
ATTN_SCALE, ATTN_SHIFT, ATTN_GATE, FFW_SCALE, FFW_SHIFT, FFW_GATE = range(6)  # rows of mods [L, 6, D]
W = plgpu.Layout.WGMMA


@dataclasses.dataclass(frozen=True)
class MegaTiles:
    """One variant: tile_rows (R) K rows per weight copy, `slots` weight tiles in flight per block, act_slots the A
    ring, `blocks` the grid (F / 32), qkv_splits (SQ) the QKV GEMM's K splits, fused_rope: RoPE in the QKV phase's
    epilogue (phase B and its barrier gone; needs SQ = 1; module docstring)."""

    tile_rows: int = 64
    slots: int = 4
    act_slots: int = 4
    blocks: int = 128
    qkv_splits: int = 2
    fused_rope: bool = False

    def __post_init__(self):
        if self.tile_rows not in (64, 128):
            raise ValueError(f"tile_rows must be 64 or 128, got {self.tile_rows=}")
        if self.slots < 2 or self.act_slots < 2:
            raise ValueError(f"lag1 rings need >= 2 slots, got {self.slots=} {self.act_slots=}")
        if self.blocks < 1 or self.qkv_splits < 1:
            raise ValueError(f"blocks and qkv_splits must be >= 1, got {self.blocks=} {self.qkv_splits=}")
        if self.fused_rope and self.qkv_splits != 1:
            raise ValueError(f"fused_rope rotates each QKV block's whole-K sum in its epilogue, so it needs "
                             f"qkv_splits 1 (no partial sums to reduce); got {self.qkv_splits=}")
        if self.smem_bytes() > SHARED_MEMORY_BYTES:
            raise ValueError(f"{self} needs {self.smem_bytes()} bytes of shared memory, more than "
                             f"{SHARED_MEMORY_BYTES}")

    def smem_bytes(self) -> int:
        """Kernel-lifetime buffers plus the largest phase scope (at the full width D = 1024)."""
        r = self.tile_rows
        life = self.slots * r * COLS * 2 + self.act_slots * ROWS * r * 2 + ROWS * HALF * 4
        attention = 3 * ROWS * HEAD * 2 + ROWS * COLS * 4 + ROWS * KEY_TILE * 2 + 3 * ROWS * 4
        reduce_ = (max(1, self.blocks // (FULL_D // COLS)) + 2) * ROWS * HALF * 4
        gemm = ROWS * COLS * 4 + 1024
        if self.fused_rope:  # cos / sin [2, M, 32] float32 + the bf16 halves [2, M, 32]
            gemm = max(gemm, 2 * ROWS * HALF * 4 + 2 * ROWS * HALF * 2 + 1024)
        return life + max(attention, reduce_, gemm) + 1024

    def label(self) -> str:
        return (f"{self.tile_rows * COLS * 2 // 1024} KiB x {self.slots} slots, act ring {self.act_slots}, "
                f"{self.blocks} blocks, SQ {self.qkv_splits}" + (", fused RoPE" if self.fused_rope else ""))


@dataclasses.dataclass(frozen=True)
class _Geo:
    d: int
    heads: int
    s: int
    layers: int
    blocks: int
    r: int
    sq: int
    q_cols: int  # Q
    q_tiles: int  # Q / 64
    nq: int  # QKV blocks
    kq: int
    t1: int  # QKV tiles per layer
    so: int  # out-proj and down K splits
    ko: int
    t2: int  # out-proj tiles per layer
    n_cols: int  # D / 64
    pairs: int
    row_groups: int
    kt: int
    chunk: int  # combine columns per block
    units: int  # U
    f: int
    kd: int
    tm1: int  # M1 tiles per layer
    tm2: int  # M2 tiles per layer
    tokens: int
    fused: bool = False  # MegaTiles.fused_rope

    @property
    def per_o(self) -> int:
        """Tiles per layer of a block without QKV work."""
        return self.t2 + self.tm1 + self.tm2

    @property
    def per_q(self) -> int:
        return self.t1 + self.per_o

    @property
    def rope_rows(self) -> int:
        return ROWS // self.row_groups


def _geometry(d: int, heads: int, s: int, layers: int, tiles: MegaTiles, tokens: int = TOKENS) -> _Geo:
    b, r, sq = tiles.blocks, tiles.tile_rows, tiles.qkv_splits
    if d % COLS or d < COLS:
        raise ValueError(f"D must be a positive multiple of {COLS}; got {d=}")
    if heads < 1 or s % KEY_TILE or s < KEY_TILE or layers < 1:
        raise ValueError(f"need heads >= 1, S a positive multiple of {KEY_TILE}, layers >= 1; got {heads=} {s=} "
                         f"{layers=}")
    if b % heads:  # the combine phase runs on every block: a remainder would write the next head's columns
        raise ValueError(f"combine: blocks must be a multiple of N; got {tiles.blocks=} {heads=}")
    if not 1 <= tokens <= ROWS:
        raise ValueError(f"tokens must be in [1, {ROWS}]; got {tokens=}")
    q_cols = (heads + 2) * HEAD
    q_tiles = q_cols // COLS
    if d % sq or (d // sq) % r or q_tiles * sq > b:
        raise ValueError(f"QKV: {q_tiles} column tiles x SQ splits must fit the grid and D / SQ be a multiple of "
                         f"tile_rows; got {d=} {tiles.qkv_splits=} {tiles.blocks=} {tiles.tile_rows=}")
    n_cols = d // COLS
    if b % n_cols or (heads * HEAD) % (b // n_cols) or ((heads * HEAD) // (b // n_cols)) % r:
        raise ValueError(f"out-proj: blocks must be D / {COLS} x SO with N H / SO a multiple of tile_rows; got "
                         f"{d=} {heads=} {tiles.blocks=} {tiles.tile_rows=}")
    so = b // n_cols
    f = GATE_COLS * b
    if f % so or (f // so) % r:
        raise ValueError(f"down: F = {GATE_COLS} blocks split SO ways must be a multiple of tile_rows; got "
                         f"{tiles.blocks=} {tiles.tile_rows=}")
    pairs = 2 * (heads + 2)
    row_groups = next((g for g in (4, 2, 1) if pairs * g <= b), 0)
    kt = s // KEY_TILE + 1
    if not row_groups or heads * kt > b:
        raise ValueError(f"RoPE needs {pairs} blocks and attention N KT = {heads * kt}; got {tiles.blocks=}")
    if max(2 * tiles.qkv_splits + 2, 2 * kt, so + 1) >= NUM_BARS:
        raise ValueError(f"more loads in one phase than the {NUM_BARS - 1} load barriers; got {s=} "
                         f"{tiles.qkv_splits=} {tiles.blocks=}")
    chunks = b // heads
    if chunks < 1 or HEAD % chunks or (HEAD // chunks) % 8:
        raise ValueError(f"combine: blocks / N must divide {HEAD} into multiples of 8; got {tiles.blocks=} "
                         f"{heads=}")
    units = d // HALF
    if units > b:
        raise ValueError(f"reduce / norm need D / {HALF} blocks; got {d=} {tiles.blocks=}")
    kq, ko, kd = d // sq, heads * HEAD // so, f // so
    return _Geo(d, heads, s, layers, b, r, sq, q_cols, q_tiles, q_tiles * sq, kq, kq // r, so, ko, ko // r, n_cols,
                pairs, row_groups, kt, HEAD // chunks, units, f, kd, d // r, kd // r, tokens, tiles.fused_rope)


# --- host-side per-call tables (exactly upstream's values) ----------------------------------------------------------


def rope_table(length) -> jax.Array:
    """cos / sin [2, M, H/2] float32 at positions length + t: gemma.rope's radians."""
    pos = jnp.asarray(length, jnp.int32) + jnp.arange(ROWS, dtype=jnp.int32)
    freq_exponents = (2.0 / HEAD) * jnp.arange(HEAD // 2, dtype=jnp.float32)
    timescale = 10_000 ** freq_exponents
    radians = pos[:, None] / timescale[None, :]
    return jnp.stack([jnp.cos(radians), jnp.sin(radians)])


def key_valid(length, s: int, tokens: int = TOKENS) -> jax.Array:
    """[KT 64] float32 1/0: prefix key s' valid iff s' < length, own key t valid iff t < T."""
    prefix = jnp.arange(s) < jnp.asarray(length, jnp.int32)
    own = jnp.arange(KEY_TILE) < tokens
    return jnp.concatenate([prefix, own]).astype(jnp.float32)


def norm_table(mods, final) -> jax.Array:
    """[L + 1, 2, D] float32: (scale, shift) of layer l's attention norm, the final norm last."""
    return jnp.concatenate([mods[:, ATTN_SCALE:ATTN_SHIFT + 1], final[None]]).astype(jnp.float32)


def gelu_tanh(x):
    """jax.nn.gelu(approximate=True) in float32 (skinny_matmul's formula, kept in this module: the schedule replay,
    tests/megakernel_schedule.py, swaps this module's jnp for recorders, which an imported function would escape)."""
    return x * (0.5 * (1.0 + jnp.tanh(jnp.float32(0.7978845608028654) * (x + 0.044715 * (x * x * x)))))


def _geglu(gate, up):
    """M1's rounding points: the float32 sums rounded to bf16 (upstream's einsum outputs), the GeGLU in float32, the
    activation rounded to bf16."""
    g = gate.astype(jnp.bfloat16).astype(jnp.float32)
    u = up.astype(jnp.bfloat16).astype(jnp.float32)
    return (gelu_tanh(g) * u).astype(jnp.bfloat16)


def fused_columns(heads: int) -> jax.Array:
    """fused_rope's Wqkv column order [(N + 2) H]: its 64-column tile 4 n + j (head slot n: the N q heads, k, v)
    holds columns [n H + 32 j, +32) then [n H + H / 2 + 32 j, +32), the 32 pairs gemma.rope rotates together at
    frequencies [32 j, +32)."""
    return jnp.arange((heads + 2) * HEAD).reshape(heads + 2, 2, ROPE_TILES, HALF).transpose(0, 2, 1, 3).reshape(-1)


def unfuse_columns(a, heads: int):
    """The inverse of `fused_columns` on a's last axis."""
    lead = a.shape[:-1]
    return a.reshape(*lead, heads + 2, ROPE_TILES, 2, HALF).swapaxes(-3, -2).reshape(*lead, (heads + 2) * HEAD)


def pack_weights(wqkv, wo, wg, wu, wd, tiles: MegaTiles = MegaTiles()) -> jax.Array:
    """wqkv [L, D, (N + 2) H], wo [L, N H, D], wg / wu [L, D, F], wd [L, F, D] bf16 -> w_tiles [B, L per_q R, 64]:
    block b's tiles in stream order (module docstring); with tiles.fused_rope, Wqkv's columns in `fused_columns`
    order first."""
    if wqkv.ndim != 3 or wo.ndim != 3 or wo.shape[0] != wqkv.shape[0] or wo.shape[2] != wqkv.shape[1] or \
            wqkv.shape[2] != wo.shape[1] + 2 * HEAD:
        raise ValueError(f"need wqkv [L, D, (N + 2) {HEAD}] and wo [L, N {HEAD}, D]; got {wqkv.shape=} {wo.shape=}")
    layers, d, _ = wqkv.shape
    g = _geometry(d, wo.shape[1] // HEAD, KEY_TILE, layers, tiles)
    if wg.shape != (layers, d, g.f) or wu.shape != wg.shape or wd.shape != (layers, g.f, d):
        raise ValueError(f"need wg, wu [L, D, F={g.f}] and wd [L, F, D] (F = {GATE_COLS} blocks); got {wg.shape=} "
                         f"{wu.shape=} {wd.shape=}")
    for name, w in (("wqkv", wqkv), ("wo", wo), ("wg", wg), ("wu", wu), ("wd", wd)):
        if w.dtype != jnp.bfloat16:
            raise ValueError(f"{name} must be bfloat16; got {w.dtype=}")
    if tiles.fused_rope:
        wqkv = wqkv[:, :, fused_columns(g.heads)]
    q = wqkv.reshape(layers, g.sq, g.kq, g.q_tiles, COLS).transpose(1, 3, 0, 2, 4)
    q = q.reshape(g.nq, layers, g.kq, COLS)  # block b = s * q_tiles + n
    o = wo.reshape(layers, g.so, g.ko, g.n_cols, COLS).transpose(1, 3, 0, 2, 4).reshape(g.blocks, layers, g.ko, COLS)
    gate, up = (w.reshape(layers, d, g.blocks, GATE_COLS).transpose(2, 0, 1, 3) for w in (wg, wu))
    m1 = jnp.concatenate([gate, up], axis=3)  # [B, L, D, 32 gate | 32 up]
    m2 = wd.reshape(layers, g.so, g.kd, g.n_cols, COLS).transpose(1, 3, 0, 2, 4).reshape(g.blocks, layers, g.kd, COLS)
    rest = jnp.concatenate([o, m1, m2], axis=2)  # [B, L, Ko + D + Kd, 64]
    with_q = jnp.concatenate([q, rest[:g.nq]], axis=2).reshape(g.nq, layers * g.per_q * g.r, COLS)
    others = rest[g.nq:].reshape(g.blocks - g.nq, layers * g.per_o * g.r, COLS)
    others = jnp.pad(others, ((0, 0), (0, layers * g.kq), (0, 0)))
    return jnp.concatenate([with_q, others], axis=0)


def _check(x, w_tiles, kp, vp, mods, final, length, tiles, tokens):
    if x.ndim != 2 or x.shape[0] != ROWS or x.dtype != jnp.float32:
        raise ValueError(f"x must be float32 [{ROWS}, D]; got {x.shape=} {x.dtype=}")
    if kp.ndim != 3 or kp.shape[2] != HEAD or kp.dtype != jnp.bfloat16:
        raise ValueError(f"prefix K/V must be bfloat16 [L, S, {HEAD}]; got {kp.shape=} {kp.dtype=}")
    if vp.shape != kp.shape or vp.dtype != kp.dtype:
        raise ValueError(f"prefix V must match K; got {kp.shape=} {vp.shape=} {vp.dtype=}")
    layers, s, _ = kp.shape
    if s % KEY_TILE:
        raise ValueError(f"prefix K/V's S must be a multiple of {KEY_TILE}; got {kp.shape=}")
    d = x.shape[1]
    if w_tiles.ndim != 3 or w_tiles.shape[0] != tiles.blocks or w_tiles.shape[2] != COLS or \
            w_tiles.dtype != jnp.bfloat16:
        raise ValueError(f"w_tiles must be bfloat16 [{tiles.blocks}, L per_q R, {COLS}] (pack_weights); got "
                         f"{w_tiles.shape=} {w_tiles.dtype=}")
    if d % COLS or not d:
        raise ValueError(f"x's width D must be a multiple of {COLS}; got {x.shape=}")
    so = tiles.blocks // (d // COLS)
    f = GATE_COLS * tiles.blocks
    rows = w_tiles.shape[1]
    ko = rows // layers - d // tiles.qkv_splits - d - (f // so if so else 0) if rows % layers == 0 else 0
    heads = ko * so // HEAD if so and ko > 0 and (ko * so) % HEAD == 0 else 0
    if not heads:
        raise ValueError(f"w_tiles' rows must be L (Kq + Ko + D + Kd) (pack_weights, L = kp's layers); got "
                         f"{w_tiles.shape=}, {layers=}, {d=}")
    g = _geometry(d, heads, s, layers, tiles, tokens)
    if mods.shape != (layers, 6, d):
        raise ValueError(f"mods must be [L={layers}, 6 (attn scale, shift, gate, ffw scale, shift, gate), D={d}]; got "
                         f"{mods.shape=}")
    if final.shape != (2, d):
        raise ValueError(f"final must be [2 (scale, shift), D={d}]; got {final.shape=}")
    length = jnp.asarray(length)
    if length.shape != () or not jnp.issubdtype(length.dtype, jnp.integer):
        raise ValueError(f"length must be an integer scalar; got {length.shape=} {length.dtype=}")
    if not isinstance(length, jax.core.Tracer) and not 0 <= int(length) <= s:
        raise ValueError(f"length must be in [0, S={s}]; got {int(length)=}")
    return g


def geometry(x, w_tiles, kp, vp, mods, final, length, tiles: MegaTiles = MegaTiles(), tokens: int = TOKENS) -> _Geo:
    """The sizes `expert_stack` derives from its operands (validated)."""
    return _check(x, w_tiles, kp, vp, mods, final, length, tiles, tokens)


# --- the block programs ---------------------------------------------------------------------------------------------


def _transforms(cols: int, dtype):
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _scratch(tiles: MegaTiles):
    r = tiles.tile_rows
    return [plgpu.SMEM((tiles.slots, r, COLS), jnp.bfloat16, transforms=_transforms(COLS, jnp.bfloat16)),
            plgpu.Barrier(num_barriers=tiles.slots),
            plgpu.SMEM((tiles.act_slots, ROWS, r), jnp.bfloat16, transforms=_transforms(COLS, jnp.bfloat16)),
            plgpu.Barrier(num_barriers=tiles.act_slots),
            plgpu.Barrier(num_barriers=NUM_BARS),  # the small phases' loads: one barrier per copy
            plgpu.SMEM((ROWS, HALF), jnp.float32)]  # the x share (reduce / norm blocks)


def _ctx(g, tiles, refs, scratch):
    w_ring, w_bar, a_ring, a_bar, bars, x_sh = scratch
    # step_base / step_tiles: a kernel looping over Euler steps (pallas_kernels.expert_loop) sets them to the step's
    # first stream index and the block's tiles per step; one step: 0 and None
    return types.SimpleNamespace(g=g, tiles=tiles, b=lax.axis_index("blocks"), w_ring=w_ring, w_bar=w_bar,
                                 a_ring=a_ring, a_bar=a_bar, bars=bars, x_sh=x_sh, step_base=0, step_tiles=None,
                                 **refs)


def _proxy_fence():
    """Orders this block's generic-proxy view of global memory against its async (TMA) proxy."""
    @plgpu.inline_mgpu()
    def fence(ctx):
        del ctx
        mgpu.utils.inline_ptx("fence.proxy.async.global;", has_side_effects=True)

    fence()


def _counted_barrier(sem, members, round_):
    """Round `round_` of a barrier of `members` blocks on one global semaphore: signal, then wait (no decrement)
    until every member's signal of this round is in (members x (round + 1)); async-proxy fences either side. sem
    None: no barrier (`expert_stack(barriers=False)`, a timing instrument)."""
    if sem is None:
        return
    _proxy_fence()
    plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
    plgpu.semaphore_wait(sem, members * (round_ + 1), decrement=False, memory_scope="gpu")
    _proxy_fence()


@dataclasses.dataclass(frozen=True)
class _Hand:
    """The hand-off into a phase of the persistent kernel: `barrier` the grid barrier after the phase before, under
    that phase's profiler scope `wait_name` ("<phase> | wait"), and `name` the phase's own scope. A phase issues its
    static loads (weights of the norm and the gates, prefix K / V, cos / sin, the key mask: nothing another block
    writes) under `before()` and ahead of the barrier, so their latency overlaps the wait; what other blocks wrote it
    loads after. `_NO_HAND` (one launch per phase, interpret mode): no barrier, no scopes."""

    wait_name: str | None = None
    barrier: Callable[[], None] | None = None
    name: str | None = None

    def before(self):
        return jax.named_scope(self.wait_name) if self.wait_name else contextlib.nullcontext()

    def sync(self):
        if self.barrier is not None:
            self.barrier()

    def phase(self):
        return jax.named_scope(self.name) if self.name else contextlib.nullcontext()


_NO_HAND = _Hand()


def _is_q(c):
    return c.b < c.g.nq


def _stop(c):
    """The block's tile count over the whole call."""
    g = c.g
    return jnp.where(_is_q(c), g.layers * g.per_q, g.layers * g.per_o)


def _offsets(c, layer):
    """The block's stream index of its first tile of each GEMM phase of `layer`."""
    g = c.g
    q = _is_q(c)
    base = jnp.asarray(layer, jnp.int32) * jnp.where(q, g.per_q, g.per_o) + c.step_base
    wo = base + jnp.where(q, g.t1, 0)
    return types.SimpleNamespace(qkv=base, wo=wo, m1=wo + g.t2, m2=wo + g.t2 + g.tm1)


def _fetch_w(c, t, stop):
    """Weight tile t (the block's t-th over the whole call) into ring slot t % slots, if t < stop."""
    @pl.when(t < stop)
    def _():
        slot = lax.rem(t, c.tiles.slots)
        row = t if c.step_tiles is None else lax.rem(t, c.step_tiles)  # a loop over steps re-streams the same tiles
        plgpu.copy_gmem_to_smem(c.w.at[c.b, pl.ds(row * c.g.r, c.g.r), :], c.w_ring.at[slot], c.w_bar.at[slot])


def _fill_ring(c, t0, stop):
    for k in range(c.tiles.slots):
        _fetch_w(c, jnp.asarray(t0, jnp.int32) + k, stop)


def _fetch_a(c, src, col0, j, depth):
    """A tile j of the phase, src[:, col0 + jR : col0 + (j+1)R], into A slot j % depth."""
    slot = j % depth if isinstance(j, int) else lax.rem(j, depth)
    plgpu.copy_gmem_to_smem(src.at[:, pl.ds(col0 + j * c.g.r, c.g.r)], c.a_ring.at[slot], c.a_bar.at[slot])


def _gemm_phase(c, acc, t0, n, src, col0, stop):
    """acc += sum_j A tile j @ weight tile t0 + j over the phase's n tiles. Weight refills run lag1 up to `stop`
    (the end of the whole call in the persistent kernel), so they cross the phase's end; the A ring starts here."""
    depth = c.tiles.act_slots
    for j in range(min(depth, n)):
        _fetch_a(c, src, col0, j, depth)

    def step(j, carry):
        t = t0 + j
        ws, as_ = lax.rem(t, c.tiles.slots), lax.rem(j, depth)
        plgpu.barrier_wait(c.w_bar.at[ws])
        plgpu.barrier_wait(c.a_bar.at[as_])
        plgpu.wgmma(acc, c.a_ring.at[as_], c.w_ring.at[ws])
        plgpu.wgmma_wait(1)  # tile t-1's wgmma is done: its slots are free

        @pl.when(j >= 1)
        def _():
            _fetch_w(c, t - 1 + c.tiles.slots, stop)
            if depth < n:
                @pl.when(j - 1 + depth < n)
                def _():
                    _fetch_a(c, src, col0, j - 1 + depth, depth)

        return carry

    lax.fori_loop(0, n, step, None)
    plgpu.wgmma_wait(0)
    _fetch_w(c, t0 + n - 1 + c.tiles.slots, stop)


def _gemm_to(c, t0, n, src, col0, stop, dst):
    """acc [M, 64] = the phase's n tiles (lag1 `_gemm_phase`), stored float32 to dst(q) [M, 32], q = 0, 1."""
    def scope(stage):
        def gemm(acc):
            _gemm_phase(c, acc, t0, n, src, col0, stop)
            out = acc[...]
            for q in range(2):
                stage.at[q][...] = out[:, q * HALF:(q + 1) * HALF]

        pl.run_scoped(gemm, plgpu.ACC((ROWS, COLS), jnp.float32))
        plgpu.commit_smem()
        for q in range(2):
            plgpu.copy_smem_to_gmem(stage.at[q], dst(q))
        plgpu.wait_smem_to_gmem(0, wait_read_only=False)

    pl.run_scoped(scope, plgpu.SMEM((2, ROWS, HALF), jnp.float32, transforms=_transforms(HALF, jnp.float32)))


def _store(src, dst):
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(src, dst)
    plgpu.wait_smem_to_gmem(0, wait_read_only=False)


def _phase_qkv(c, layer, stop):
    g = c.g
    split, col = lax.div(c.b, g.q_tiles), lax.rem(c.b, g.q_tiles)

    @pl.when(_is_q(c))
    def _():
        _gemm_to(c, _offsets(c, layer).qkv, g.t1, c.h, split * g.kq, stop,
                 lambda q: c.qkv_part.at[split, :, pl.ds(col * COLS + q * HALF, HALF)])


def _rotate(lo, hi, cos_sin, slot, heads, store):
    """Phase B's float32 RoPE of one column pair set (lo, hi already the bf16-rounded GEMM output in float32):
    q slots (slot < N) and k (slot == N) rotated with cos_sin() and rounded to bf16, q then * 1/16 (exact) and
    rounded again, v (slot > N) as is; store(0, lo bf16) and store(1, hi bf16) under the matching pl.when. Shared
    by phase B and the fused QKV epilogue, so both do the same float32 operations in the same order."""
    @pl.when(slot <= heads)  # q or k: RoPE
    def _():
        cos, sin = cos_sin()
        rot_lo = (lo * cos - hi * sin).astype(jnp.bfloat16).astype(jnp.float32)
        rot_hi = (hi * cos + lo * sin).astype(jnp.bfloat16).astype(jnp.float32)

        @pl.when(slot < heads)
        def _():
            store(0, (rot_lo * (HEAD ** -0.5)).astype(jnp.bfloat16))
            store(1, (rot_hi * (HEAD ** -0.5)).astype(jnp.bfloat16))

        @pl.when(slot == heads)
        def _():
            store(0, rot_lo.astype(jnp.bfloat16))
            store(1, rot_hi.astype(jnp.bfloat16))

    @pl.when(slot > heads)  # v
    def _():
        store(0, lo.astype(jnp.bfloat16))
        store(1, hi.astype(jnp.bfloat16))


def _phase_qkv_rope(c, layer, stop):
    """Phase A with fused_rope (phase B folded in): block b < Q / 64 computes column tile b of the `fused_columns`
    Wqkv over the whole K (SQ = 1): head slot n = b // 4, frequencies [32 j, +32) with j = b % 4. Its float32 sum is
    rounded to bf16 (where B rounds: upstream's GEMM output), q and k rotated with the cos / sin of those
    frequencies (B's float32 math, `_rotate`), and the two 32-column halves stored to qkv at their original columns
    n H + 32 j and n H + H / 2 + 32 j. The cos / sin copy is issued before the GEMM and waited after it."""
    g = c.g
    slot, j = lax.div(c.b, ROPE_TILES), lax.rem(c.b, ROPE_TILES)
    lo_col = slot * HEAD + j * HALF

    def scope(cs, out):
        for k in range(2):
            plgpu.copy_gmem_to_smem(c.cs.at[k, :, pl.ds(j * HALF, HALF)], cs.at[k], c.bars.at[k])

        def gemm(acc):
            _gemm_phase(c, acc, _offsets(c, layer).qkv, g.t1, c.h, 0, stop)
            return acc[...]

        y = pl.run_scoped(gemm, plgpu.ACC((ROWS, COLS), jnp.float32)).astype(jnp.bfloat16).astype(jnp.float32)
        for k in range(2):
            plgpu.barrier_wait(c.bars.at[k])

        def store(k, v):
            out.at[k][...] = v

        _rotate(y[:, :HALF], y[:, HALF:], lambda: tuple(plgpu.load(cs.at[k], layout=W) for k in range(2)), slot,
                g.heads, store)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out.at[0], c.qkv.at[:, pl.ds(lo_col, HALF)])
        plgpu.copy_smem_to_gmem(out.at[1], c.qkv.at[:, pl.ds(lo_col + HEAD // 2, HALF)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=False)

    @pl.when(_is_q(c))
    def _():
        pl.run_scoped(scope, plgpu.SMEM((2, ROWS, HALF), jnp.float32),
                      plgpu.SMEM((2, ROWS, HALF), jnp.bfloat16, transforms=_transforms(HALF, jnp.bfloat16)))


def _phase_outproj(c, layer, stop):
    g = c.g
    split, col = lax.div(c.b, g.n_cols), lax.rem(c.b, g.n_cols)
    _gemm_to(c, _offsets(c, layer).wo, g.t2, c.o, split * g.ko, stop,
             lambda q: c.part.at[split, :, pl.ds(col * COLS + q * HALF, HALF)])


def _phase_m1(c, layer, stop):
    """Block b: act[:, 32b:+32] = GeGLU of h @ its [D, 32 gate | 32 up] slab of this layer."""
    g = c.g

    def scope(act_out):
        def gemm(acc):
            _gemm_phase(c, acc, _offsets(c, layer).m1, g.tm1, c.h, 0, stop)
            both = acc[...]
            act_out[...] = _geglu(both[:, :GATE_COLS], both[:, GATE_COLS:])

        pl.run_scoped(gemm, plgpu.ACC((ROWS, COLS), jnp.float32))
        _store(act_out, c.act.at[:, pl.ds(c.b * GATE_COLS, GATE_COLS)])

    pl.run_scoped(scope, plgpu.SMEM((ROWS, GATE_COLS), jnp.bfloat16, transforms=_transforms(GATE_COLS, jnp.bfloat16)))


def _phase_m2(c, layer, stop):
    """Block b = s (D / 64) + n: part[s][:, 64n:+64] = act[:, s Kd:+Kd] @ its Wd slab."""
    g = c.g
    split, col = lax.div(c.b, g.n_cols), lax.rem(c.b, g.n_cols)
    _gemm_to(c, _offsets(c, layer).m2, g.tm2, c.act, split * g.kd, stop,
             lambda q: c.part.at[split, :, pl.ds(col * COLS + q * HALF, HALF)])


def _rope_block(c, hand=_NO_HAND):
    """Phase B: pair p = b % pairs (head p // 2, half p % 2), rows [rr r, +rr); cos / sin issued before the
    barrier (`_Hand`)."""
    g = c.g
    rr = g.rope_rows
    p, rgrp = lax.rem(c.b, g.pairs), lax.div(c.b, g.pairs)
    hd, half = lax.div(p, 2), lax.rem(p, 2)
    rows = pl.ds(rgrp * rr, rr)
    lo_col, hi_col = (4 * hd + half) * COLS, (4 * hd + half + 2) * COLS

    def loads(part, cs):
        for s in range(g.sq):
            plgpu.copy_gmem_to_smem(c.qkv_part.at[s, rows, pl.ds(lo_col, COLS)], part.at[0, s], c.bars.at[2 * s])
            plgpu.copy_gmem_to_smem(c.qkv_part.at[s, rows, pl.ds(hi_col, COLS)], part.at[1, s],
                                    c.bars.at[2 * s + 1])

    def static(cs):
        for k in range(2):
            plgpu.copy_gmem_to_smem(c.cs.at[k, rows, pl.ds(half * COLS, COLS)], cs.at[k], c.bars.at[2 * g.sq + k])

    def work(part, cs, out):
        loads(part, cs)
        for k in range(2 * g.sq + 2):
            plgpu.barrier_wait(c.bars.at[k])
        sums = []
        for i in range(2):
            tot = part.at[i, 0][...]
            for s in range(1, g.sq):
                tot = tot + part.at[i, s][...]
            sums.append(tot.astype(jnp.bfloat16).astype(jnp.float32))
        lo, hi = sums

        def store(k, v):
            out.at[k][...] = v

        _rotate(lo, hi, lambda: (cs.at[0][...], cs.at[1][...]), hd, g.heads, store)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out.at[0], c.qkv.at[rows, pl.ds(lo_col, COLS)])
        plgpu.copy_smem_to_gmem(out.at[1], c.qkv.at[rows, pl.ds(hi_col, COLS)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=False)

    _prefetched(c.b < g.pairs * g.row_groups, hand, lambda part, cs, out: static(cs), work,
                plgpu.SMEM((2, g.sq, rr, COLS), jnp.float32), plgpu.SMEM((2, rr, COLS), jnp.float32),
                plgpu.SMEM((2, rr, COLS), jnp.bfloat16))


def _prefetched(member, hand, static, work, *scratch):
    """A small phase's block program around its hand-off: shared memory for every block (so the barrier below is
    reached by all of them), then for members (`member`, a traced bool) static(*refs) issuing the copies nothing
    of this layer writes, the barrier, and work(*refs) (the copies of what other blocks wrote, the waits, the
    math)."""
    def scope(*refs):
        with hand.before():
            pl.when(member)(lambda: static(*refs))
            hand.sync()
        with hand.phase():
            pl.when(member)(lambda: work(*refs))

    pl.run_scoped(scope, *scratch)


def _attention_block(c, layer, hand=_NO_HAND):
    """Phase C: head n = b % N, key tile kt = b // N; partial (o, m, l) of the 64 q rows over its 64 keys. The key
    mask and a prefix key tile's K / V are issued before the barrier (`_Hand`), q (and the own keys) after."""
    g = c.g
    n, kt = lax.rem(c.b, g.heads), lax.div(c.b, g.heads)
    own = g.kt - 1
    bf = _transforms(COLS, jnp.bfloat16)

    def static(q_s, k_s, v_s, valid_s, *_):
        plgpu.copy_gmem_to_smem(c.valid.at[pl.ds(kt * KEY_TILE, KEY_TILE)], valid_s, c.bars.at[1])

        @pl.when(kt < own)
        def _():
            plgpu.copy_gmem_to_smem(c.kp.at[layer, pl.ds(kt * KEY_TILE, KEY_TILE), :], k_s, c.bars.at[2])
            plgpu.copy_gmem_to_smem(c.vp.at[layer, pl.ds(kt * KEY_TILE, KEY_TILE), :], v_s, c.bars.at[3])

    def work(q_s, k_s, v_s, valid_s, stage, m_s, l_s, p_s):
        plgpu.copy_gmem_to_smem(c.qkv.at[:, pl.ds(n * HEAD, HEAD)], q_s, c.bars.at[0])

        @pl.when(kt == own)
        def _():
            plgpu.copy_gmem_to_smem(c.qkv.at[:, pl.ds(g.heads * HEAD, HEAD)], k_s, c.bars.at[2])
            plgpu.copy_gmem_to_smem(c.qkv.at[:, pl.ds((g.heads + 1) * HEAD, HEAD)], v_s, c.bars.at[3])

        for k in range(3):
            plgpu.barrier_wait(c.bars.at[k])

        def qk(acc):
            plgpu.wgmma(acc, q_s, k_s.transpose((1, 0)))
            plgpu.wgmma_wait(0)
            return acc[...]

        s = pl.run_scoped(qk, plgpu.ACC((ROWS, KEY_TILE), jnp.float32))
        ok = lax.broadcast_in_dim(plgpu.load(valid_s, layout=W.reduce(0)), s.shape, [1])
        s = jnp.where(ok > 0.5, s, BIG_NEG)
        m = s.max(axis=1)
        p = jnp.exp(s - lax.broadcast_in_dim(m, s.shape, [0]))
        l_sum = p.sum(axis=1)
        p_s[...] = p.astype(jnp.bfloat16)  # through shared memory: the interpreter's wgmma takes no register A
        plgpu.commit_smem()
        plgpu.barrier_wait(c.bars.at[3])

        def pv(acc):
            plgpu.wgmma(acc, p_s, v_s)
            plgpu.wgmma_wait(0)
            return acc[...]

        o = pl.run_scoped(pv, plgpu.ACC((ROWS, HEAD), jnp.float32))
        m_s[...] = m
        l_s[...] = l_sum
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(m_s, c.ml.at[kt, n, 0])
        plgpu.copy_smem_to_gmem(l_s, c.ml.at[kt, n, 1])
        for j in range(HEAD // COLS):
            if j:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the stage is free again
            for q in range(2):
                stage.at[q][...] = o[:, j * COLS + q * HALF:j * COLS + (q + 1) * HALF]
            plgpu.commit_smem()
            for q in range(2):
                plgpu.copy_smem_to_gmem(stage.at[q], c.o_part.at[kt, n, :, pl.ds(j * COLS + q * HALF, HALF)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=False)

    _prefetched(c.b < g.heads * g.kt, hand, static, work,
                plgpu.SMEM((ROWS, HEAD), jnp.bfloat16, transforms=bf),
                plgpu.SMEM((KEY_TILE, HEAD), jnp.bfloat16, transforms=bf),
                plgpu.SMEM((KEY_TILE, HEAD), jnp.bfloat16, transforms=bf),
                plgpu.SMEM((KEY_TILE,), jnp.float32),
                plgpu.SMEM((2, ROWS, HALF), jnp.float32, transforms=_transforms(HALF, jnp.float32)),
                plgpu.SMEM((ROWS,), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32),
                plgpu.SMEM((ROWS, KEY_TILE), jnp.bfloat16, transforms=bf))


def _combine_block(c):
    """Phase D: head n = b % N, columns [chunk cc, +chunk) of the head: the key tiles' partials merged in order."""
    g = c.g
    n, cc = lax.rem(c.b, g.heads), lax.div(c.b, g.heads)
    cols = pl.ds(cc * g.chunk, g.chunk)

    def scope(o_s, ml_s, out):
        for k in range(g.kt):
            plgpu.copy_gmem_to_smem(c.o_part.at[k, n, :, cols], o_s.at[k], c.bars.at[k])
            plgpu.copy_gmem_to_smem(c.ml.at[k, n], ml_s.at[k], c.bars.at[g.kt + k])
        for k in range(g.kt):
            plgpu.barrier_wait(c.bars.at[g.kt + k])
        ms = [plgpu.load(ml_s.at[k, 0], layout=W.reduce(1)) for k in range(g.kt)]
        big = ms[0]
        for k in range(1, g.kt):
            big = jnp.maximum(big, ms[k])
        for k in range(g.kt):
            plgpu.barrier_wait(c.bars.at[k])
        num = den = None
        for k in range(g.kt):
            wk = jnp.exp(ms[k] - big)
            lk = plgpu.load(ml_s.at[k, 1], layout=W.reduce(1))
            ok = plgpu.load(o_s.at[k], layout=W)
            term = lax.broadcast_in_dim(wk, ok.shape, [0]) * ok
            num = term if num is None else num + term
            den = wk * lk if den is None else den + wk * lk
        out[...] = (num / lax.broadcast_in_dim(den, num.shape, [0])).astype(jnp.bfloat16)
        _store(out, c.o.at[:, pl.ds(n * HEAD + cc * g.chunk, g.chunk)])

    pl.run_scoped(scope, plgpu.SMEM((g.kt, ROWS, g.chunk), jnp.float32), plgpu.SMEM((g.kt, 2, ROWS), jnp.float32),
                  plgpu.SMEM((ROWS, g.chunk), jnp.bfloat16))


def _unit_cols(c):
    return pl.ds(c.b * HALF, HALF)


def _load_x(c, x_gmem):
    @pl.when(c.b < c.g.units)
    def _():
        plgpu.copy_gmem_to_smem(x_gmem.at[:, _unit_cols(c)], c.x_sh, c.bars.at[NUM_BARS - 1])
        plgpu.barrier_wait(c.bars.at[NUM_BARS - 1])


def _store_x(c, x_gmem):
    @pl.when(c.b < c.g.units)
    def _():
        _store(c.x_sh, x_gmem.at[:, _unit_cols(c)])


def _vec(c, smem, bar):
    """The [32] float32 column vector (of this unit) copied into smem on load barrier `bar`, in the WGMMA column
    layout once landed."""
    plgpu.barrier_wait(c.bars.at[bar])
    return lax.broadcast_in_dim(plgpu.load(smem, layout=W.reduce(0)), (ROWS, HALF), [1])


def _write_ssq(c, x):
    def scope(ssq_s):
        ssq_s[...] = jnp.sum(x * x, axis=1)
        _store(ssq_s, c.ssq.at[c.b])

    pl.run_scoped(scope, plgpu.SMEM((ROWS,), jnp.float32))


def _reduce_block(c, layer, gate_row, hand=_NO_HAND):
    """Phases F / F': x share += f32(bf16(bf16(sum_s part[s]) * gate)), then its per-row sum of squares; the gate
    issued before the barrier (`_Hand`), the partials after."""
    g = c.g

    def static(red, vec):
        plgpu.copy_gmem_to_smem(c.mods.at[layer, gate_row, _unit_cols(c)], vec, c.bars.at[g.so])

    def work(red, vec):
        for s in range(g.so):
            plgpu.copy_gmem_to_smem(c.part.at[s, :, _unit_cols(c)], red.at[s], c.bars.at[s])
        gate = _vec(c, vec, g.so)
        for s in range(g.so):
            plgpu.barrier_wait(c.bars.at[s])
        tot = plgpu.load(red.at[0], layout=W)
        for s in range(1, g.so):
            tot = tot + plgpu.load(red.at[s], layout=W)
        y = tot.astype(jnp.bfloat16).astype(jnp.float32)
        z = (y * gate).astype(jnp.bfloat16).astype(jnp.float32)
        x = plgpu.load(c.x_sh, layout=W) + z
        c.x_sh[...] = x
        _write_ssq(c, x)

    _prefetched(c.b < g.units, hand, static, work, plgpu.SMEM((g.so, ROWS, HALF), jnp.float32),
                plgpu.SMEM((HALF,), jnp.float32))


def _ssq_block(c):
    @pl.when(c.b < c.g.units)
    def _():
        _write_ssq(c, plgpu.load(c.x_sh, layout=W))


def _norm_block(c, table, layer, scale_row, shift_row, hand=_NO_HAND):
    """Phases G / G': h share = bf16(x r bf16(1 + scale) + shift), r from the summed row sums of squares; scale and
    shift are rows of table[layer] (mods: the ffw norm; norms: the next attention norm or the final one), issued
    before the barrier (`_Hand`), the sums of squares after."""
    g = c.g

    def static(ssq_s, vec, out):
        plgpu.copy_gmem_to_smem(table.at[layer, scale_row, _unit_cols(c)], vec.at[0], c.bars.at[1])
        plgpu.copy_gmem_to_smem(table.at[layer, shift_row, _unit_cols(c)], vec.at[1], c.bars.at[2])

    def work(ssq_s, vec, out):
        plgpu.copy_gmem_to_smem(c.ssq, ssq_s, c.bars.at[0])
        scale = _vec(c, vec.at[0], 1)
        shift = _vec(c, vec.at[1], 2)
        plgpu.barrier_wait(c.bars.at[0])
        tot = plgpu.load(ssq_s.at[0], layout=W.reduce(1))
        for u in range(1, g.units):
            tot = tot + plgpu.load(ssq_s.at[u], layout=W.reduce(1))
        r = 1.0 / jnp.sqrt(tot / g.d + RMS_EPS)
        x = plgpu.load(c.x_sh, layout=W)
        one_plus = (1.0 + scale).astype(jnp.bfloat16).astype(jnp.float32)
        h = (x * lax.broadcast_in_dim(r, x.shape, [0])) * one_plus + shift
        out[...] = h.astype(jnp.bfloat16)
        _store(out, c.h.at[:, _unit_cols(c)])

    _prefetched(c.b < g.units, hand, static, work, plgpu.SMEM((g.units, ROWS), jnp.float32),
                plgpu.SMEM((2, HALF), jnp.float32), plgpu.SMEM((ROWS, HALF), jnp.bfloat16))


# --- launches -------------------------------------------------------------------------------------------------------


def _buffer_types(g):
    f32, bf16 = jnp.float32, jnp.bfloat16
    return {"h": jax.ShapeDtypeStruct((ROWS, g.d), bf16),
            **({} if g.fused else {"qkv_part": jax.ShapeDtypeStruct((g.sq, ROWS, g.q_cols), f32)}),
            "qkv": jax.ShapeDtypeStruct((ROWS, g.q_cols), bf16),
            "o_part": jax.ShapeDtypeStruct((g.kt, g.heads, ROWS, HEAD), f32),
            "ml": jax.ShapeDtypeStruct((g.kt, g.heads, 2, ROWS), f32),
            "o": jax.ShapeDtypeStruct((ROWS, g.heads * HEAD), bf16),
            "act": jax.ShapeDtypeStruct((ROWS, g.f), bf16),
            "part": jax.ShapeDtypeStruct((g.so, ROWS, g.d), f32),
            "ssq": jax.ShapeDtypeStruct((g.units, ROWS), f32)}


def phase_names(tiles: MegaTiles = MegaTiles()) -> tuple[str, ...]:
    """The profiler scopes of one layer in order: each phase, then its barrier wait "<phase> | wait" (none after the
    last layer's last phase)."""
    phases = (("A' qkv+rope",) if tiles.fused_rope else ("A qkv", "B rope")) + (
        "C attention", "D combine", "E out-proj", "F reduce", "G norm", "M1 gate/up", "M2 down", "F' reduce",
        "G' norm")
    return tuple(n for p in phases for n in (p, f"{p} | wait"))


def profile_ranges(layers: int, tiles: MegaTiles = MegaTiles()) -> int:
    """Profiler ranges one block records per call: the prologue's 4 and the epilogue, each layer's scopes."""
    return 5 + len(phase_names(tiles)) * layers


def _launch(body, g, tiles, ins: dict, outs: dict, *, interpret=False, profile_dir=None):
    """plgpu.kernel over named inputs and outputs: body(c) with every ref as an attribute of c; profile_dir: the
    on-device profiler's trace directory (`expert_stack`)."""
    in_names, out_names = list(ins), list(outs)

    def kernel(*refs):
        n = len(in_names) + len(out_names)
        named = dict(zip(in_names + out_names, refs[:n], strict=True))
        body(_ctx(g, tiles, named, refs[n:]))

    out = plgpu.kernel(kernel, out_type=tuple(outs.values()), grid=(g.blocks,), grid_names=("blocks",),
                       scratch_types=_scratch(tiles),
                       compiler_params=plgpu.CompilerParams(
                           profile_space=profile_ranges(g.layers, tiles), profile_dir=profile_dir,
                           profile_bounds_check=True) if profile_dir else None,
                       interpret=plgpu.InterpretGPUParams() if interpret else None)(*ins.values())
    if interpret and not any(isinstance(o, jax.core.Tracer) for o in jax.tree.leaves(out)):
        out = jax.block_until_ready(out)  # interpret-mode callbacks: finish before other CPU work is dispatched
    return dict(zip(out_names, out, strict=True))


def barriers_per_layer(tiles: MegaTiles = MegaTiles()) -> int:
    """Grid barriers per layer (the last layer's last one aside): 11, or 10 with fused_rope (no phase B)."""
    return 10 if tiles.fused_rope else 11


def rounds_per_call(layers: int, tiles: MegaTiles = MegaTiles()) -> int:
    return 2 + barriers_per_layer(tiles) * layers - 1


def check_resident(tiles: MegaTiles, device=None) -> None:
    """Every block must be resident at once (the grid barriers wait for all of them): one block per SM, so the
    grid may not exceed the card's SM count (an H100 PCIe has 114; a MIG slice or an MPS share has fewer, which
    this cannot see: the kernel would hang there). Raises a ValueError naming both; a non-GPU device passes."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return
    sms = getattr(device, "core_count", None)
    if sms is not None and tiles.blocks > sms:
        raise ValueError(f"the megakernel's grid of {tiles.blocks} blocks (one per 32 GeGLU columns) needs that many "
                         f"SMs resident at once; {device.device_kind} has {sms}")


def _layer_body(c, arrive, i, stop, base, *, mods_row, norms_row, barrier_after):
    """Layer i's phases in the persistent kernel, their grid barriers rounds base .. base + per - 1 (the last one,
    after G', only where barrier_after: a traced bool, or True). mods_row: this layer's row of c.mods; norms_row:
    the row of c.norms the closing norm G' uses (the next layer's attention norm, or the final norm)."""
    tiles, g = c.tiles, c.g
    per = barriers_per_layer(tiles)
    names = phase_names(tiles)[::2]
    k = 0

    def hand():
        """The hand-off into the layer's phase k: the barrier after phase k - 1 (round base + k - 1) under that
        phase's wait scope; phase 0's barrier is the one ending the layer before (or the prologue)."""
        if k == 0:
            return _Hand(name=names[0])
        return _Hand(f"{names[k - 1]} | wait", functools.partial(_counted_barrier, arrive, g.blocks, base + k - 1),
                     names[k])

    def phase(run, *, takes_hand=False):
        """Phase k: run(hand) if it issues static loads ahead of its barrier (`_prefetched`), else the barrier then
        run() under the phase's scope."""
        nonlocal k
        h = hand()
        if takes_hand:
            run(h)
        else:
            with h.before():
                h.sync()
            with h.phase():
                run()
        k += 1

    if tiles.fused_rope:
        phase(lambda: _phase_qkv_rope(c, i, stop))  # A with B folded in: qkv read by C
    else:
        phase(lambda: _phase_qkv(c, i, stop))
        phase(lambda h: _rope_block(c, h), takes_hand=True)
    phase(lambda h: _attention_block(c, i, h), takes_hand=True)
    phase(lambda: _combine_block(c))
    phase(lambda: _phase_outproj(c, i, stop))
    phase(lambda h: _reduce_block(c, mods_row, ATTN_GATE, h), takes_hand=True)
    phase(lambda h: _norm_block(c, c.mods, mods_row, FFW_SCALE, FFW_SHIFT, h), takes_hand=True)
    phase(lambda: _phase_m1(c, i, stop))
    phase(lambda: _phase_m2(c, i, stop))
    phase(lambda h: _reduce_block(c, mods_row, FFW_GATE, h), takes_hand=True)
    phase(lambda h: _norm_block(c, c.norms, norms_row, 0, 1, h), takes_hand=True)  # next attention / final norm
    assert k == per, (k, per)

    def closing():  # the barrier after G' (round base + per - 1): the next layer's A (or what follows) reads h
        with jax.named_scope(f"{names[-1]} | wait"):
            _counted_barrier(arrive, g.blocks, base + per - 1)

    if barrier_after is True:
        closing()
    else:
        pl.when(barrier_after)(closing)


def expert_stack(x, w_tiles, kp, vp, mods, final, length, tiles: MegaTiles = MegaTiles(), tokens: int = TOKENS,
                 *, profile_dir: str | None = None, barriers: bool = True):
    """The L-layer expert stack (module docstring) as one persistent kernel: x float32 [64, D], w_tiles from
    `pack_weights`, prefix K/V bf16 [L, S, 256], mods [L, 6, D], final [2, D], length int32 scalar -> (final-normed
    h bf16 [64, D], x float32 [64, D]). Global semaphores: the card only (`expert_stack_phases` on the CPU).
    profile_dir: Mosaic GPU's on-device profiler records every phase and every barrier wait of every block (the
    named scopes, `phase_names`) and each call writes a trace there (`pallas_kernels.phase_profile` reads it);
    for measurement only: it costs shared memory and a store per scope. barriers=False: no grid barrier at all, so
    the phases race and the result is garbage: main()'s --no-barriers times it, to tell what the barriers and the
    waits for the slowest block cost from what the phases themselves do."""
    g = _check(x, w_tiles, kp, vp, mods, final, length, tiles, tokens)
    check_resident(tiles)
    ins = {"x": x, "w": w_tiles, "kp": kp, "vp": vp, "mods": mods.astype(jnp.float32),
           "norms": norm_table(mods, final), "cs": rope_table(length), "valid": key_valid(length, g.s, tokens)}
    rounds = rounds_per_call(g.layers, tiles)
    per = barriers_per_layer(tiles)

    def body(c):
        arrive = pl.get_global(plgpu.SemaphoreType.REGULAR) if barriers else None
        done = pl.get_global(plgpu.SemaphoreType.REGULAR) if barriers else None
        stop = _stop(c)
        with jax.named_scope("prologue"):
            _fill_ring(c, 0, stop)  # the weight stream starts before anything waits
            _load_x(c, c.x)
            _ssq_block(c)
        _norm_block(c, c.norms, 0, 0, 1, _Hand("prologue | wait", functools.partial(
            _counted_barrier, arrive, g.blocks, 0), "prologue norm"))
        with jax.named_scope("prologue norm | wait"):
            _counted_barrier(arrive, g.blocks, 1)

        def layer(i, carry):
            _layer_body(c, arrive, i, stop, 2 + per * i, mods_row=i, norms_row=i + 1, barrier_after=i + 1 < g.layers)
            return carry

        lax.fori_loop(0, g.layers, layer, None)
        with jax.named_scope("epilogue"):
            _store_x(c, c.x_out)
            if barriers:
                plgpu.semaphore_signal(done, 1, memory_scope="gpu")

                @pl.when(c.b == 0)
                def _():  # every block is past its last barrier: wind the counter back for the next call
                    plgpu.semaphore_wait(done, g.blocks, memory_scope="gpu")
                    plgpu.semaphore_signal(arrive, -g.blocks * rounds, memory_scope="gpu")

    outs = {"x_out": jax.ShapeDtypeStruct((ROWS, g.d), jnp.float32), **_buffer_types(g)}
    out = _launch(body, g, tiles, ins, outs, profile_dir=profile_dir)
    return out["h"], out["x_out"]


# --- the block programs as one launch per phase (no semaphores: interpret mode on the CPU) ---------------------------


def phase_ssq(x, g, tiles, *, interpret=False):
    def body(c):
        _load_x(c, c.x)
        _ssq_block(c)

    return _launch(body, g, tiles, {"x": x}, {"ssq": _buffer_types(g)["ssq"]}, interpret=interpret)["ssq"]


def phase_norm(x, ssq, table, g, tiles, *, layer, rows=(0, 1), interpret=False):
    """G / G': the norm with (scale, shift) = table[layer, rows] (mods [L, 6, D] with rows (3, 4): the ffw norm;
    `norm_table` with (0, 1): an attention norm, layer L the final one)."""
    def body(c):
        _load_x(c, c.x)
        _norm_block(c, c.tab, layer, *rows)

    return _launch(body, g, tiles, {"x": x, "ssq": ssq, "tab": table.astype(jnp.float32)},
                   {"h": _buffer_types(g)["h"]}, interpret=interpret)["h"]


def _gemm_launch(phase, src_name, src, out_name, w_tiles, g, tiles, layer, first, count, interpret):
    def body(c):
        t0 = first(_offsets(c, layer))
        stop = t0 + count
        if phase is _phase_qkv:  # the QKV blocks only
            pl.when(_is_q(c))(lambda: _fill_ring(c, t0, stop))
        else:
            _fill_ring(c, t0, stop)
        phase(c, layer, stop)

    return _launch(body, g, tiles, {src_name: src, "w": w_tiles}, {out_name: _buffer_types(g)[out_name]},
                   interpret=interpret)[out_name]


def phase_qkv(h, w_tiles, g, tiles, *, layer, interpret=False):
    return _gemm_launch(_phase_qkv, "h", h, "qkv_part", w_tiles, g, tiles, layer, lambda o: o.qkv, g.t1, interpret)


def phase_qkv_rope(h, w_tiles, length, g, tiles, *, layer, interpret=False):
    """A with fused_rope (B folded into its epilogue): h, w_tiles packed with tiles.fused_rope -> qkv bf16."""
    if not tiles.fused_rope:
        raise ValueError(f"phase_qkv_rope needs tiles packed and run with fused_rope; got {tiles.fused_rope=}")

    def body(c):
        t0 = _offsets(c, layer).qkv
        stop = t0 + g.t1
        pl.when(_is_q(c))(lambda: _fill_ring(c, t0, stop))
        _phase_qkv_rope(c, layer, stop)

    return _launch(body, g, tiles, {"h": h, "w": w_tiles, "cs": rope_table(length)}, {"qkv": _buffer_types(g)["qkv"]},
                   interpret=interpret)["qkv"]


def phase_outproj(o, w_tiles, g, tiles, *, layer, interpret=False):
    return _gemm_launch(_phase_outproj, "o", o, "part", w_tiles, g, tiles, layer, lambda o: o.wo, g.t2, interpret)


def phase_m1(h, w_tiles, g, tiles, *, layer, interpret=False):
    return _gemm_launch(_phase_m1, "h", h, "act", w_tiles, g, tiles, layer, lambda o: o.m1, g.tm1, interpret)


def phase_m2(act, w_tiles, g, tiles, *, layer, interpret=False):
    return _gemm_launch(_phase_m2, "act", act, "part", w_tiles, g, tiles, layer, lambda o: o.m2, g.tm2, interpret)


def phase_rope(qkv_part, length, g, tiles, *, interpret=False):
    return _launch(_rope_block, g, tiles, {"qkv_part": qkv_part, "cs": rope_table(length)},
                   {"qkv": _buffer_types(g)["qkv"]}, interpret=interpret)["qkv"]


def phase_attention(qkv, kp, vp, length, g, tiles, *, layer, interpret=False):
    t = _buffer_types(g)
    out = _launch(lambda c: _attention_block(c, layer), g, tiles,
                  {"qkv": qkv, "kp": kp, "vp": vp, "valid": key_valid(length, g.s, g.tokens)},
                  {"o_part": t["o_part"], "ml": t["ml"]}, interpret=interpret)
    return out["o_part"], out["ml"]


def phase_combine(o_part, ml, g, tiles, *, interpret=False):
    return _launch(_combine_block, g, tiles, {"o_part": o_part, "ml": ml}, {"o": _buffer_types(g)["o"]},
                   interpret=interpret)["o"]


def phase_reduce(x, part, mods, g, tiles, *, layer, gate_row, interpret=False):
    """F (gate_row ATTN_GATE) / F' (FFW_GATE): -> (x, ssq)."""
    def body(c):
        _load_x(c, c.x)
        _reduce_block(c, layer, gate_row)
        _store_x(c, c.x_out)

    t = _buffer_types(g)
    out = _launch(body, g, tiles, {"x": x, "part": part, "mods": mods.astype(jnp.float32)},
                  {"x_out": jax.ShapeDtypeStruct(x.shape, jnp.float32), "ssq": t["ssq"]}, interpret=interpret)
    return out["x_out"], out["ssq"]


def expert_stack_phases(x, w_tiles, kp, vp, mods, final, length, tiles: MegaTiles = MegaTiles(),
                        tokens: int = TOKENS, *, interpret=True):
    """`expert_stack` as one launch per phase (the persistent kernel's block programs, no semaphores); with
    tiles.fused_rope, A and B are one launch (`phase_qkv_rope`)."""
    g = _check(x, w_tiles, kp, vp, mods, final, length, tiles, tokens)
    norms = norm_table(mods, final)
    kw = dict(interpret=interpret)
    h = phase_norm(x, phase_ssq(x, g, tiles, **kw), norms, g, tiles, layer=0, **kw)
    for layer in range(g.layers):
        if tiles.fused_rope:
            qkv = phase_qkv_rope(h, w_tiles, length, g, tiles, layer=layer, **kw)
        else:
            qkv = phase_rope(phase_qkv(h, w_tiles, g, tiles, layer=layer, **kw), length, g, tiles, **kw)
        o_part, ml = phase_attention(qkv, kp, vp, length, g, tiles, layer=layer, **kw)
        o = phase_combine(o_part, ml, g, tiles, **kw)
        x, ssq = phase_reduce(x, phase_outproj(o, w_tiles, g, tiles, layer=layer, **kw), mods, g, tiles,
                              layer=layer, gate_row=ATTN_GATE, **kw)
        h = phase_norm(x, ssq, mods, g, tiles, layer=layer, rows=(FFW_SCALE, FFW_SHIFT), **kw)
        act = phase_m1(h, w_tiles, g, tiles, layer=layer, **kw)
        x, ssq = phase_reduce(x, phase_m2(act, w_tiles, g, tiles, layer=layer, **kw), mods, g, tiles, layer=layer,
                              gate_row=FFW_GATE, **kw)
        h = phase_norm(x, ssq, norms, g, tiles, layer=layer + 1, **kw)
    return h, x


# --- plain-JAX emulation of the schedule -----------------------------------------------------------------------------

_HI = lax.Precision.HIGHEST


def _bf(a):
    return a.astype(jnp.bfloat16).astype(jnp.float32)


def _slabs(w_tiles, g):
    """Per-block weight slabs of every layer from the stream: qkv [nq, L, Kq, 64]; wo, m1, m2 [B, L, *, 64]."""
    wq = w_tiles[:g.nq].reshape(g.nq, g.layers, g.per_q * g.r, COLS)
    wr = w_tiles[g.nq:, :g.layers * g.per_o * g.r].reshape(g.blocks - g.nq, g.layers, g.per_o * g.r, COLS)
    rest = jnp.concatenate([wq[:, :, g.kq:], wr]).astype(jnp.float32)
    return types.SimpleNamespace(qkv=wq[:, :, :g.kq].astype(jnp.float32), wo=rest[:, :, :g.ko],
                                 m1=rest[:, :, g.ko:g.ko + g.d], m2=rest[:, :, g.ko + g.d:])


def _tiled_gemm(a, wt, g, n):
    """Per block: float32 sums over its n weight tiles in stream order; a [B, M, n R], wt [B, n R, 64]."""
    acc = jnp.zeros((wt.shape[0], ROWS, COLS), jnp.float32)
    for j in range(n):
        ks = slice(j * g.r, (j + 1) * g.r)
        acc = acc + jnp.einsum("BMR,BRC->BMC", a[:, :, ks], wt[:, ks], precision=_HI)
    return acc


def ssq_emulated(x, g):
    return jnp.sum((x * x).reshape(ROWS, g.units, HALF), axis=2).T


def norm_emulated(x, ssq, table, g, *, layer, rows=(0, 1)):
    tot = ssq[0]
    for u in range(1, g.units):
        tot = tot + ssq[u]
    r = 1.0 / jnp.sqrt(tot / g.d + RMS_EPS)
    m = table.astype(jnp.float32)
    return ((x * r[:, None]) * _bf(1.0 + m[layer, rows[0]]) + m[layer, rows[1]]).astype(jnp.bfloat16)


def qkv_emulated(h, w_tiles, g, *, layer):
    """A: the SQ float32 partials [SQ, M, Q] (with fused_rope: SQ = 1, columns in `fused_columns` order)."""
    a = h.astype(jnp.float32).reshape(ROWS, g.sq, g.kq).transpose(1, 0, 2)
    acc = _tiled_gemm(jnp.repeat(a, g.q_tiles, axis=0), _slabs(w_tiles, g).qkv[:, layer], g, g.t1)
    return acc.reshape(g.sq, g.q_tiles, ROWS, COLS).transpose(0, 2, 1, 3).reshape(g.sq, ROWS, g.q_cols)


def qkv_rope_emulated(h, w_tiles, length, g, *, layer):
    """A with fused_rope: each block's whole-K float32 sum of its permuted tile, put back at the original columns
    (a permutation: no arithmetic), then B's roundings and rotation (`rope_emulated`, one split: no sum)."""
    return rope_emulated(unfuse_columns(qkv_emulated(h, w_tiles, g, layer=layer), g.heads), length, g)


def rope_emulated(qkv_part, length, g):
    tot = qkv_part[0]
    for s in range(1, g.sq):
        tot = tot + qkv_part[s]
    y = _bf(tot).reshape(ROWS, g.heads + 2, 2, HEAD // 2)
    lo, hi = y[:, :, 0], y[:, :, 1]
    cos, sin = rope_table(length)[:, :, None, :]
    rot = jnp.stack([_bf(lo * cos - hi * sin), _bf(hi * cos + lo * sin)], axis=2)
    scale = jnp.where(jnp.arange(g.heads + 2) < g.heads, HEAD ** -0.5, 1.0)[None, :, None, None]
    out = jnp.where((jnp.arange(g.heads + 2) <= g.heads)[None, :, None, None], rot * scale, y)
    return out.reshape(ROWS, g.q_cols).astype(jnp.bfloat16)


def attention_emulated(qkv, kp, vp, length, g, *, layer):
    q = qkv[:, :g.heads * HEAD].astype(jnp.float32).reshape(ROWS, g.heads, HEAD)
    keys = jnp.concatenate([kp[layer], qkv[:, g.heads * HEAD:(g.heads + 1) * HEAD]]).astype(jnp.float32)
    vals = jnp.concatenate([vp[layer], qkv[:, (g.heads + 1) * HEAD:]]).astype(jnp.float32)
    keys, vals = (a.reshape(g.kt, KEY_TILE, HEAD) for a in (keys, vals))
    ok = key_valid(length, g.s, g.tokens).reshape(g.kt, 1, 1, KEY_TILE) > 0.5
    s = jnp.einsum("MNH,KSH->KNMS", q, keys, precision=_HI)
    s = jnp.where(ok, s, BIG_NEG)
    m = s.max(-1)
    p = jnp.exp(s - m[..., None])
    l_sum = p.sum(-1)
    o = jnp.einsum("KNMS,KSH->KNMH", _bf(p), vals, precision=_HI)
    return o, jnp.stack([m, l_sum], axis=2)


def combine_emulated(o_part, ml, g):
    m, l_sum = ml[:, :, 0], ml[:, :, 1]
    big = m[0]
    for k in range(1, g.kt):
        big = jnp.maximum(big, m[k])
    num = den = None
    for k in range(g.kt):
        wk = jnp.exp(m[k] - big)
        num = wk[..., None] * o_part[k] if num is None else num + wk[..., None] * o_part[k]
        den = wk * l_sum[k] if den is None else den + wk * l_sum[k]
    o = num / den[..., None]  # [N, M, H]
    return o.transpose(1, 0, 2).reshape(ROWS, g.heads * HEAD).astype(jnp.bfloat16)


def _split_k(a, wt, g, k, n):
    """Split-K over SO splits of k columns: block b = s (D / 64) + n -> part [SO, M, D]."""
    a = a.astype(jnp.float32).reshape(ROWS, g.so, k).transpose(1, 0, 2)
    acc = _tiled_gemm(jnp.repeat(a, g.n_cols, axis=0), wt, g, n)
    return acc.reshape(g.so, g.n_cols, ROWS, COLS).transpose(0, 2, 1, 3).reshape(g.so, ROWS, g.d)


def outproj_emulated(o, w_tiles, g, *, layer):
    return _split_k(o, _slabs(w_tiles, g).wo[:, layer], g, g.ko, g.t2)


def m1_emulated(h, w_tiles, g, *, layer):
    a = jnp.broadcast_to(h.astype(jnp.float32), (g.blocks, ROWS, g.d))
    acc = _tiled_gemm(a, _slabs(w_tiles, g).m1[:, layer], g, g.tm1)
    act = _geglu(acc[..., :GATE_COLS], acc[..., GATE_COLS:])  # [B, M, 32]
    return act.transpose(1, 0, 2).reshape(ROWS, g.f)


def m2_emulated(act, w_tiles, g, *, layer):
    return _split_k(act, _slabs(w_tiles, g).m2[:, layer], g, g.kd, g.tm2)


def reduce_emulated(x, part, mods, g, *, layer, gate_row):
    tot = part[0]
    for s in range(1, g.so):
        tot = tot + part[s]
    x = x + _bf(_bf(tot) * mods.astype(jnp.float32)[layer, gate_row])
    return x, ssq_emulated(x, g)


def expert_stack_emulated(x, w_tiles, kp, vp, mods, final, length, tiles: MegaTiles = MegaTiles(),
                          tokens: int = TOKENS):
    """The persistent kernel's schedule in plain JAX (same tiles, split orders, key-tile order, rounding points)."""
    g = _check(x, w_tiles, kp, vp, mods, final, length, tiles, tokens)
    norms = norm_table(mods, final)
    h = norm_emulated(x, ssq_emulated(x, g), norms, g, layer=0)
    for layer in range(g.layers):
        if g.fused:
            qkv = qkv_rope_emulated(h, w_tiles, length, g, layer=layer)
        else:
            qkv = rope_emulated(qkv_emulated(h, w_tiles, g, layer=layer), length, g)
        o = combine_emulated(*attention_emulated(qkv, kp, vp, length, g, layer=layer), g)
        x, ssq = reduce_emulated(x, outproj_emulated(o, w_tiles, g, layer=layer), mods, g, layer=layer,
                                 gate_row=ATTN_GATE)
        h = norm_emulated(x, ssq, mods, g, layer=layer, rows=(FFW_SCALE, FFW_SHIFT))
        act = m1_emulated(h, w_tiles, g, layer=layer)
        x, ssq = reduce_emulated(x, m2_emulated(act, w_tiles, g, layer=layer), mods, g, layer=layer,
                                 gate_row=FFW_GATE)
        h = norm_emulated(x, ssq, norms, g, layer=layer + 1)
    return h, x


# --- the reference: upstream's functions ------------------------------------------------------------------------------


def expert_stack_reference(x, wqkv, wo, wg, wu, wd, kp, vp, mods, final, length, tokens: int = TOKENS):
    """Upstream's expert layers (pi05_jax.model.gemma: adaRMS, qkv + RoPE, masked attention over the valid prefix
    keys and the own tokens, gated residuals, GeGLU feed-forward; the fast path's `expert_layer` order) chained over
    L layers on the T real rows, x float32: -> (final-normed h bf16 [T, D], x float32 [T, D]). The fused columns of
    wqkv are split back into openpi's q_einsum [N, D, H] / kv_einsum [2, 1, D, H]."""
    from pi05_jax.model import gemma
    from pi05_jax.model.weights import weight_einsum

    layers, d, q_cols = wqkv.shape
    heads = q_cols // HEAD - 2
    x = x[None, :tokens]
    length = jnp.asarray(length, jnp.int32).reshape(1)
    positions = length[:, None] + jnp.arange(tokens, dtype=jnp.int32)[None, :]
    s = kp.shape[1]
    mask = jnp.concatenate([jnp.broadcast_to(jnp.arange(s)[None, None, :] < length[:, None, None], (1, tokens, s)),
                            jnp.ones((1, tokens, tokens), bool)], axis=-1)
    m = [[mods[layer, k][None, None, :] for k in range(6)] for layer in range(layers)]
    h = gemma.ada_rms_norm(x, m[0][ATTN_SCALE], m[0][ATTN_SHIFT]).astype(jnp.bfloat16)
    for layer in range(layers):
        w = wqkv[layer].reshape(d, heads + 2, HEAD)
        attn = {"q_einsum_1": {"w": jnp.transpose(w[:, :heads], (1, 0, 2))},
                "kv_einsum_1": {"w": jnp.transpose(w[:, heads:], (1, 0, 2))[:, None]}}
        q, k, v = gemma.qkv(h, attn, "_1", positions)
        o = gemma.masked_attention(q, jnp.concatenate([kp[layer][None, :, None], k], 1),
                                   jnp.concatenate([vp[layer][None, :, None], v], 1), mask)
        x = x + weight_einsum("BTNH,NHD->BTD", o, wo[layer].reshape(heads, HEAD, d)) * m[layer][ATTN_GATE]
        h2 = gemma.ada_rms_norm(x, m[layer][FFW_SCALE], m[layer][FFW_SHIFT]).astype(jnp.bfloat16)
        mlp = {"gating_einsum": jnp.stack([wg[layer], wu[layer]]), "linear": wd[layer]}
        x = x + gemma.feed_forward(h2, mlp) * m[layer][FFW_GATE]
        scale, shift = (m[layer + 1][ATTN_SCALE], m[layer + 1][ATTN_SHIFT]) if layer + 1 < layers else \
            (final[0][None, None], final[1][None, None])
        h = gemma.ada_rms_norm(x, scale, shift).astype(jnp.bfloat16)
    return h[0], x[0]


def rel_err(got, want, x0=None) -> float:
    """|got - want| / |want| (Frobenius) on the rows of want; with x0, of what the layers added."""
    rows = want.shape[0]
    got, want = jnp.asarray(got, jnp.float32)[:rows], jnp.asarray(want, jnp.float32)
    if x0 is not None:
        x0 = jnp.asarray(x0, jnp.float32)[:rows]
        got, want = got - x0, want - x0
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


X_RMS = 8.0  # random_problem's x: see its docstring


def random_problem(key, layers: int, d: int, heads: int, s: int, f: int):
    """x [64, D] float32 (normal x X_RMS); bf16 weights wqkv [L, D, Q], wo [L, N H, D], wg / wu [L, D, F],
    wd [L, F, D] (1/sqrt(K)); prefix K/V [L, S, 256] (unit normal, bf16); mods [L, 6, D] bf16 (0.1 x normal,
    gates around 1); final [2, D].
    Each layer adds O(1) to x (the norms keep it so: RMS 8 -> 8.5 over 18 layers). At x of unit RMS those additions
    move every next norm's input by O(1), so bf16 roundings compound over the layers: measured (CPU, L = 18) the
    emulation 1.8e-2 off the reference and upstream's own bf16 chain 1.4e-2 off upstream's functions on float32
    copies, past the 1e-2 gate for any bf16 schedule; at RMS 8 the emulation is under it (the residual dominates
    the stream, as in the trained model)."""
    kx, kq, ko, kg, ku, kd, kk, kv, km, kf = jax.random.split(key, 10)

    def w(k, shape, fan_in):
        return (jax.random.normal(k, shape, jnp.float32) * fan_in ** -0.5).astype(jnp.bfloat16)

    x = X_RMS * jax.random.normal(kx, (ROWS, d), jnp.float32)
    wqkv = w(kq, (layers, d, (heads + 2) * HEAD), d)
    wo = w(ko, (layers, heads * HEAD, d), heads * HEAD)
    wg, wu = w(kg, (layers, d, f), d), w(ku, (layers, d, f), d)
    wd = w(kd, (layers, f, d), f)
    kp = jax.random.normal(kk, (layers, s, HEAD)).astype(jnp.bfloat16)
    vp = jax.random.normal(kv, (layers, s, HEAD)).astype(jnp.bfloat16)
    mods = 0.1 * jax.random.normal(km, (layers, 6, d))
    mods = mods.at[:, ATTN_GATE].add(1.0).at[:, FFW_GATE].add(1.0).astype(jnp.bfloat16)
    final = (0.1 * jax.random.normal(kf, (2, d))).astype(jnp.bfloat16)
    return x, wqkv, wo, wg, wu, wd, kp, vp, mods, final


LAYER_BYTES = (FULL_D * (FULL_HEADS + 2) * HEAD + FULL_HEADS * HEAD * FULL_D + 3 * FULL_D * FULL_F) * 2
# weight ring 32 KiB + A ring 32 KiB; 48 KiB + 16 KiB; the default's rings with RoPE fused into the QKV phase
CARD_VARIANTS = (MegaTiles(), MegaTiles(64, 6, 2), MegaTiles(64, 4, 4, 128, 1, True))


def _parse_variant(arg: str) -> MegaTiles:
    """TILE_ROWS,SLOTS,ACT_SLOTS[,BLOCKS[,QKV_SPLITS[,FUSED_ROPE]]]: MegaTiles' fields in order, FUSED_ROPE 0 or 1."""
    vals = [int(v) for v in arg.split(",")]
    if len(vals) > 6 or (len(vals) == 6 and vals[5] not in (0, 1)):
        raise ValueError(f"at most 6 fields, the last (fused_rope) 0 or 1; got {arg=}")
    return MegaTiles(*vals[:5], *(bool(v) for v in vals[5:]))


def _parse_variants(argv) -> tuple[tuple[MegaTiles, ...], bool]:
    """`python3 -m pallas_kernels.expert_megakernel [VARIANT ...]` (`_parse_variant`): those variants instead of
    CARD_VARIANTS, without today's chain (a sweep)."""
    if not argv:
        return CARD_VARIANTS, True
    try:
        return tuple(_parse_variant(a) for a in argv), False
    except (TypeError, ValueError) as ex:
        sys.exit(f"expert_megakernel: variants are TILE_ROWS,SLOTS,ACT_SLOTS[,BLOCKS[,QKV_SPLITS[,FUSED_ROPE]]] "
                 f"(e.g. 64,4,4 or 64,4,4,128,1,1); {ex}")


def _profile_variants(timed, profile_dir, compiled) -> bool:
    """main()'s --profile: per variant, a second executable with Mosaic GPU's on-device profiler, called once after
    a warm-up of the plain one (the profiler writes the first call's trace only); its outputs must equal the plain
    call's bit for bit; then `phase_profile`'s table, the profiled call's span scaled to the plain call's time.
    Returns True if a variant failed."""
    import numpy as np

    from pallas_kernels import phase_profile

    broken = False
    for tiles, fn, args, us in timed:
        sub = pathlib.Path(profile_dir) / tiles.label().replace(" ", "").replace(",", "_")
        sub.mkdir(parents=True, exist_ok=True)
        prof = jax.jit(functools.partial(expert_stack, tiles=tiles, profile_dir=str(sub)))
        try:
            compiled(prof, args, f"{tiles.label()}, L=18, profiled")
            want = [np.asarray(a) for a in fn(*args)]
            got = [np.asarray(a) for a in prof(*args)]
            jax.effects_barrier()  # the trace is written by a host callback: let it finish
            stats, per_us = phase_profile.summarize(phase_profile.load(phase_profile.latest_trace(sub)), us)
        except Exception as ex:  # say so, go on with the next variant
            print(f"  profile of {tiles.label()}: FAILED {type(ex).__name__}: {str(ex)[:800]}", flush=True)
            broken = True
            continue
        same = all(a.tobytes() == b.tobytes() for a, b in zip(want, got, strict=True))
        print(f"profile, {tiles.label()} (outputs bit-identical to the plain call: {same}; trace in {sub}):",
              flush=True)
        print(phase_profile.format_table(stats, per_us, layers=FULL_LAYERS), flush=True)
        broken |= not same
    return broken


def main(argv=None) -> int:
    import numpy as np

    argv = list(sys.argv[1:] if argv is None else argv)
    profile_dir = None
    if "--profile" in argv:  # --profile DIR: after the timings, one profiled call of each variant (phase_profile)
        at = argv.index("--profile")
        if at + 1 >= len(argv):
            sys.exit("expert_megakernel: --profile needs a directory for the traces")
        profile_dir = argv.pop(at + 1)
        argv.pop(at)
        pathlib.Path(profile_dir).mkdir(parents=True, exist_ok=True)
    no_barriers = "--no-barriers" in argv  # after the timings, each variant without its grid barriers (racy)
    argv = [a for a in argv if a != "--no-barriers"]
    variants, with_today = _parse_variants(argv)
    start = time.monotonic()

    def compiled(fn, args, what):  # AOT first (fn's cache keeps it), so a slow compile and a hang read apart
        t = time.monotonic()
        fn.lower(*args).compile()
        print(f"  [{time.monotonic() - start:5.0f} s] {what} compiled in {time.monotonic() - t:.0f} s; calling it "
              f"(a hang stops here)", flush=True)

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
    from device_time import device_us  # scripts/device_time.py: CUPTI device time

    if jax.default_backend() != "gpu":
        sys.exit("expert_megakernel: runs a GPU kernel; JAX sees no GPU")
    dev = jax.devices()[0]
    print(f"{dev.device_kind} ({dev.core_count} SMs), jax {jax.__version__}: {FULL_LAYERS}-layer expert stack, "
          f"M={ROWS} D={FULL_D} N={FULL_HEADS} H={HEAD} F={FULL_F} S={FULL_S} length={FULL_LENGTH}, "
          f"{LAYER_BYTES / 1e6:.1f} MB of weights per layer", flush=True)
    prob = random_problem(jax.random.key(0), FULL_LAYERS, FULL_D, FULL_HEADS, FULL_S, FULL_F)
    x, wqkv, wo, wg, wu, wd, kp, vp, mods, final = prob
    length = jnp.int32(FULL_LENGTH)
    one = tuple(a[:1] for a in (wqkv, wo, wg, wu, wd, kp, vp, mods))
    ref_h, ref_x = jax.jit(expert_stack_reference)(*prob, length)
    ref1_h, ref1_x = jax.jit(expert_stack_reference)(x, *one, final, length)
    print(f"x RMS: in {float(jnp.sqrt(jnp.mean(x ** 2))):.2f}, after {FULL_LAYERS} layers (reference) "
          f"{float(jnp.sqrt(jnp.mean(ref_x ** 2))):.2f}", flush=True)
    emu_h, emu_x = jax.jit(expert_stack_emulated)(x, pack_weights(wqkv, wo, wg, wu, wd), kp, vp, mods, final,
                                                  length)
    print(f"correctness: rel err vs reference on the {TOKENS} real rows (x: what the layers add; h: the final "
          f"norm), L=18 / L=1, gate {GATE:.0e}; the emulation of this schedule: x {rel_err(emu_x, ref_x, x):.2e} "
          f"h {rel_err(emu_h, ref_h):.2e}", flush=True)
    runs, broken = [], False
    for tiles in variants:
        w18 = pack_weights(wqkv, wo, wg, wu, wd, tiles)
        w1 = pack_weights(*one[:5], tiles)
        args18 = (x, w18, kp, vp, mods, final, length)
        args1 = (x, w1, one[5], one[6], one[7], final, length)
        fn = jax.jit(functools.partial(expert_stack, tiles=tiles))
        try:
            compiled(fn, args18, f"{tiles.label()}, L=18")
            h1, x1 = (np.asarray(a) for a in fn(*args18))
            h2, x2 = (np.asarray(a) for a in fn(*args18))
            compiled(fn, args1, f"{tiles.label()}, L=1")
            hl1, xl1 = fn(*args1)
            errs = (rel_err(x1, ref_x, x), rel_err(h1, ref_h), rel_err(xl1, ref1_x, x), rel_err(hl1, ref1_h))
        except Exception as ex:  # a variant that does not compile here: say so, time the others, exit 1 at the end
            print(f"  {tiles.label()}: FAILED {type(ex).__name__}: {str(ex)[:800]}", flush=True)
            broken = True
            continue
        same = bool((h1.view(np.uint16) == h2.view(np.uint16)).all() and (x1 == x2).all())
        finite = bool(np.isfinite(x1).all() and np.isfinite(h1.astype(np.float32)).all())
        print(f"  {tiles.label():50s} L18 x {errs[0]:.2e} h {errs[1]:.2e} / L1 x {errs[2]:.2e} h {errs[3]:.2e}  "
              f"bit-identical {same}  finite {finite}", flush=True)
        if not (max(errs) <= GATE and same and finite):
            print(f"FAILED: wrong answer ({tiles.label()})", flush=True)
            return 1
        runs.append((tiles, fn, args18, args1))

    def report(label, us, layers=FULL_LAYERS):
        print(f"  {label:60s} {us:8.1f} us  {us / layers:6.2f} us/layer  {layers * LAYER_BYTES / us / 1e3:6.0f} GB/s",
              flush=True)
        return us

    print("CUPTI device time, median of 20:", flush=True)
    timed = []
    for tiles, fn, args18, args1 in runs:
        us = report(f"megakernel, {tiles.label()}", device_us(fn, *args18))
        us1 = report(f"megakernel, {tiles.label()}, L=1", device_us(fn, *args1), layers=1)
        print(f"  per layer (L=18 minus L=1, over 17): {(us - us1) / (FULL_LAYERS - 1):.2f} us", flush=True)
        timed.append((tiles, fn, args18, us))
        if no_barriers:  # the same kernel racing (wrong answers, never compared): the phases and the ring alone
            racy = jax.jit(functools.partial(expert_stack, tiles=tiles, barriers=False))
            try:
                compiled(racy, args18, f"{tiles.label()}, L=18, no barriers")
                us_racy = report(f"  without grid barriers (racy, timing only), {tiles.label()}",
                                 device_us(racy, *args18))
                print(f"  the barriers and the waits for stragglers: {(us - us_racy) / FULL_LAYERS:.2f} us per layer",
                      flush=True)
            except Exception as ex:
                print(f"  no-barriers run of {tiles.label()}: FAILED {type(ex).__name__}: {str(ex)[:600]}", flush=True)
                broken = True
    if profile_dir is not None:
        broken |= _profile_variants(timed, profile_dir, compiled)
    if not with_today:
        return 1 if broken else 0
    from megakernel_baseline import pallas_expert_chain  # scripts/: the product's expert

    today = jax.jit(pallas_expert_chain)
    w_t = jnp.stack([jnp.swapaxes(wg, 1, 2), jnp.swapaxes(wu, 1, 2)], axis=1)  # [L, 2, F, D]: geglu_matmul's layout
    targs = (x, wqkv, wo, w_t, wd, kp, vp, mods, final, length)
    targs1 = (x, wqkv[:1], wo[:1], w_t[:1], wd[:1], kp[:1], vp[:1], mods[:1], final, length)
    try:
        th, tx = today(*targs)
        print(f"  (today's chain: rel err vs reference x {rel_err(tx, ref_x, x):.2e} h {rel_err(th, ref_h):.2e})",
              flush=True)
        us = report("today: pallas' expert_layer (its Ops, bf16 residual)", device_us(today, *targs))
        us1 = report("today, L=1", device_us(today, *targs1), layers=1)
        print(f"  per layer (L=18 minus L=1, over 17): {(us - us1) / (FULL_LAYERS - 1):.2f} us", flush=True)
    except Exception as ex:  # the baseline does not compile: say so
        print(f"  today: FAILED {type(ex).__name__}: {str(ex)[:600]}", flush=True)
        broken = True
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

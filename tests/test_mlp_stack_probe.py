"""scripts/mlp_stack_probe.py: each phase's block program computes what the plain-JAX emulation of the schedule does
(Mosaic GPU interpret mode, small and real sizes), the emulation and the chained phases match the reference chain,
the group hand-offs (sync="groups") wait for exactly the blocks that made what the next phase reads, the isolation
variant without compute runs its block programs, and the persistent kernel (global semaphores: card only) lowers for
Hopper at full size, every tile variant and every variant the card run measures, with its weight ring's refills
bounded by the whole call's tile count, not a phase's, so its one device call runs working kernels."""

from __future__ import annotations

import functools
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import mlp_stack_probe as msp

SMALL_D, SMALL_F = 256, 512  # 16 blocks: 4 column slices x 4 splits of 128, phase-3 shares of 16 rows
SMALL = [msp.StackTiles(64, 2, 16, "stream", 2), msp.StackTiles(128, 3, 16, "stream", 3),
         msp.StackTiles(64, 4, 16, "resident")]
FULL = msp.StackTiles()  # 8 KiB x 8 slots, act ring 4, 128 blocks


@functools.cache
def _problem(layers, d, f, tiles):
    x, w1, w2 = msp.random_problem(jax.random.key(layers), layers, d, f)
    return x, w1, w2, msp.tile_weights(w1, w2, tiles)


def _close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want), np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("tiles, d, f", [(t, SMALL_D, SMALL_F) for t in SMALL] + [(FULL, msp.FULL_D, msp.FULL_F)],
                         ids=lambda v: v.label().replace(" ", "") if isinstance(v, msp.StackTiles) else str(v))
def test_each_phase_matches_its_emulation(tiles, d, f):
    layers = 2
    x, _, _, wt = _problem(layers, d, f, tiles)
    layer = layers - 1  # the second layer's tiles: the offsets into the block's one array
    h = x.astype(jnp.bfloat16)
    act = msp.phase1(h, wt, tiles, layer=layer, interpret=True)
    want_act = msp.phase1_emulated(h, wt, tiles, layer=layer)
    # float32 sums in another order can move a bf16 rounding of gate/up by one ulp; nearly all entries agree
    assert np.mean(np.asarray(act) == np.asarray(want_act)) > 0.99
    _close(act.astype(jnp.float32), want_act.astype(jnp.float32), 1e-3)
    part = msp.phase2(want_act, wt, tiles, d=d, layer=layer, interpret=True)
    _close(part, msp.phase2_emulated(want_act, wt, tiles, d=d, layer=layer), 1e-6)
    x_new, h_new = msp.phase3(x, part, tiles, interpret=True)
    want_x, want_h = msp.phase3_emulated(x, part)
    np.testing.assert_array_equal(np.asarray(x_new), np.asarray(want_x))  # the same adds in the same order
    np.testing.assert_array_equal(np.asarray(h_new), np.asarray(want_h))


@pytest.mark.parametrize("tiles", SMALL[:2], ids=lambda t: t.label().replace(" ", ""))
def test_chained_phases_match_the_reference(tiles):
    """Three launches per layer (the block programs, no semaphores) against the float32 reference chain, the error
    taken on what the layers added (x_out - x). Measured here: 4.5e-5 and 1.1e-5 (bf16 roundings of gate/up, act
    and h moved by the sum order); the card's gate is 1e-2."""
    x, w1, w2, wt = _problem(2, SMALL_D, SMALL_F, tiles)
    got = msp.mlp_stack_phases(x, wt, tiles, interpret=True)
    assert msp.rel_err(got, msp.mlp_stack_reference(x, w1, w2), x) < 3e-3


@pytest.mark.parametrize("layers, d, f, tiles", [(3, SMALL_D, SMALL_F, SMALL[0]), (2, msp.FULL_D, msp.FULL_F, FULL)],
                         ids=["small_3_layers", "full_2_layers"])
def test_emulated_schedule_matches_the_reference(layers, d, f, tiles):
    """The schedule (tiles, phase order, split order) in plain JAX, error on x_out - x. Measured: 1.4e-6 small (3
    layers), 3.3e-4 full (2 layers); at 18 layers 5.3e-3 (and XLA's bf16 chain 5.4e-3), hence the card's 1e-2."""
    x, w1, w2, wt = _problem(layers, d, f, tiles)
    assert msp.rel_err(msp.mlp_stack_emulated(x, wt, tiles), msp.mlp_stack_reference(x, w1, w2), x) < 3e-3


def test_tile_weights_puts_each_blocks_slabs_in_order():
    tiles = SMALL[0]
    _, w1, w2, wt = _problem(2, SMALL_D, SMALL_F, tiles)
    per_block = wt.reshape(tiles.blocks, 2, SMALL_D + SMALL_F // 4, msp.COLS)
    b, layer = 5, 1  # phase 1: act columns 160..191; phase 2: split 1, column slice 1
    np.testing.assert_array_equal(per_block[b, layer, :SMALL_D, :32], w1[layer, 0, :, 160:192])
    np.testing.assert_array_equal(per_block[b, layer, :SMALL_D, 32:], w1[layer, 1, :, 160:192])
    np.testing.assert_array_equal(per_block[b, layer, SMALL_D:], w2[layer, 128:256, 64:128])


def _kernel_jaxpr(tiles, layers):
    x = jax.ShapeDtypeStruct((msp.ROWS, msp.FULL_D), jnp.float32)
    w = jax.ShapeDtypeStruct((tiles.blocks, layers * (msp.FULL_D + msp.FULL_F // 8), msp.COLS), jnp.bfloat16)
    fn = jax.jit(functools.partial(msp.mlp_stack, tiles=tiles))
    return fn, x, w, str(jax.make_jaxpr(fn)(x, w))


# per sync mode: (semaphore_signal, semaphore_wait) sites in the kernel's jaxpr and the global semaphores' shapes.
# grid: prologue + 3 per layer, done, wind-back; groups: prologue + 3 per layer, 2 group wind-backs, done, wind-back
SEMAPHORES = {"grid": (6, 5, ["[]", "[]"]), "groups": (8, 5, ["[]", "[]", "[8]", "[16]"]), "none": (0, 0, [])}


@pytest.mark.parametrize("tiles", tuple(dict.fromkeys(msp.VARIANTS + msp.CARD_VARIANTS)),
                         ids=lambda t: t.label().replace(" ", ""))
def test_the_persistent_kernel_lowers_for_hopper_at_full_size(tiles):
    layers = msp.FULL_LAYERS
    fn, x, w, jaxpr = _kernel_jaxpr(tiles, layers)
    lowered = fn.trace(x, w).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
    # every weight refill (in both phases' loops and after each) is bounded by the call's last tile, not its phase's
    total = layers * (msp.FULL_D + msp.FULL_F // 8) // tiles.tile_rows
    assert len(re.findall(rf"= lt \w+ {total}:i32\[\]", jaxpr)) == 4, total
    signals, waits, shapes = SEMAPHORES[tiles.sync]
    assert (jaxpr.count("semaphore_signal"), jaxpr.count("semaphore_wait")) == (signals, waits)
    assert re.findall(r"get_global\[what=Ref<gmem>\{semaphore(\[\d*\])", jaxpr) == shapes
    assert ("wgmma" in jaxpr) == tiles.compute


def test_card_variants():
    """main() measures the best-known tiles under grid and group barriers (correct) and two isolation variants."""
    assert [(t.sync, t.compute, t.correct) for t in msp.CARD_VARIANTS] == [
        ("grid", True, True), ("groups", True, True), ("none", True, False), ("grid", False, False),
        ("none", False, False)]
    assert {(t.tile_rows, t.slots, t.h_mode, t.act_slots) for t in msp.CARD_VARIANTS} == {(128, 4, "stream", 4)}


@pytest.mark.parametrize("d, f", [(SMALL_D, SMALL_F), (msp.FULL_D, msp.FULL_F)])
def test_group_hand_offs_cover_what_each_block_reads(d, f):
    """The index maps of the block programs: phase 1 block b writes act columns [32b, 32b + 32); phase 2 block b
    reads act columns [s Kd, (s+1) Kd) (s = b // (D/64)) and writes partials[s] columns [64n, 64n + 64)
    (n = b % (D/64)); phase 3 block b reads partials[k] over its share (module's `_share`) for every k. With
    sync="groups" block b waits after phase 1 for the blocks of its split (b // (D/64)) and after phase 2 for those
    of its column slice (b % (D/64)): exactly the writers of what it reads next."""
    g = msp._geometry(d, f, 1, msp.StackTiles(blocks=f // 32))
    act_writer = {col: b for b in range(g.blocks) for col in range(32 * b, 32 * b + 32)}
    for b in range(g.blocks):
        s, n = b // g.n_cols, b % g.n_cols
        split_group = {p for p in range(g.blocks) if p // g.n_cols == s}
        assert {act_writer[col] for col in range(s * g.kd, (s + 1) * g.kd)} == split_group
        assert len(split_group) == g.n_cols
        # the share of b (rows [rs (b // n_cols), +rs), columns [64n, +64)) lies in column slice n, whose partials
        # are written by blocks k * n_cols + n, one per split k
        part_writers = {k * g.n_cols + n for k in range(g.splits)}
        col_group = {p for p in range(g.blocks) if p % g.n_cols == n}
        assert part_writers == col_group and len(col_group) == g.splits
    # the shares tile [M, D] exactly once, each inside its block's column slice
    cover = np.zeros((msp.ROWS, d), int)
    for b in range(g.blocks):
        r0, c0 = (b // g.n_cols) * g.rs, (b % g.n_cols) * msp.COLS
        cover[r0:r0 + g.rs, c0:c0 + msp.COLS] += 1
    assert (cover == 1).all()


def test_the_no_compute_block_programs_run():
    """compute=False (interpret mode, small): the same loads, stores and ring refills without wgmma or epilogue
    arithmetic; phase 3 leaves x as it was."""
    tiles = msp.StackTiles(64, 2, 16, "stream", 2, compute=False)
    x, _, _, wt = _problem(2, SMALL_D, SMALL_F, SMALL[0])
    act = msp.phase1(x.astype(jnp.bfloat16), wt, tiles, layer=1, interpret=True)
    part = msp.phase2(act, wt, tiles, d=SMALL_D, layer=1, interpret=True)
    assert act.shape == (msp.ROWS, SMALL_F) and part.shape == (4, msp.ROWS, SMALL_D)
    x_new, h_new = msp.phase3(x, jnp.ones_like(part), tiles, interpret=True)
    np.testing.assert_array_equal(np.asarray(x_new), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(h_new), np.asarray(x.astype(jnp.bfloat16)))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(tile_rows=96), "tile_rows"), (dict(slots=1), "slots >= 2"), (dict(h_mode="smem"), "h_mode"),
    (dict(act_slots=1), "act_slots >= 2"), (dict(tile_rows=256, slots=4, h_mode="resident"), "shared memory"),
    (dict(blocks=0), "blocks"), (dict(sync="cluster"), "sync must be"), (dict(compute=1), "compute must be"),
])
def test_bad_variants_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        msp.StackTiles(**kwargs)


def test_bad_operands_are_named():
    tiles = SMALL[0]
    x, _, _, wt = _problem(2, SMALL_D, SMALL_F, tiles)
    with pytest.raises(ValueError, match="x must be float32"):
        msp.mlp_stack(x.astype(jnp.bfloat16), wt, tiles)
    with pytest.raises(ValueError, match="w_tiles' rows"):
        msp.mlp_stack(x, wt[:, :-64], tiles)
    with pytest.raises(ValueError, match="F must be 32"):
        msp.tile_weights(jnp.zeros((1, 2, SMALL_D, 256), jnp.bfloat16), jnp.zeros((1, 256, SMALL_D), jnp.bfloat16),
                         tiles)

"""pallas_kernels/expert_loop.py: the whole Euler loop in one persistent kernel. On the CPU: the exact three-part
split of float32 x, the "in" and "out" block programs (Mosaic GPU interpret mode) against their emulation, "in"
against the float32 projection it stands for, the loop's launches per phase against the emulation and the
reference (the fast path's step on upstream's functions), the emulation against the reference at full size, the
persistent kernel lowered for Hopper at full size (10 steps, 18 layers) and its copy / wait schedule replayed
across step boundaries; bad operands are named."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import expert_loop as el
from pallas_kernels import expert_megakernel as em
from pi05_jax.model.linear import promoted_dense
from tests import megakernel_schedule as schedule

LOOP_SMALL = em.MegaTiles(64, 2, 2, 32, 1)  # 16 QKV blocks of 32: the last block is free for the out-projection
SMALL_SIZE = (256, 2, 128, 1024)  # D, heads, S, F (= 32 blocks x 32)
FULL_SIZE = (em.FULL_D, em.FULL_HEADS, em.FULL_S, em.FULL_F)
LENGTH = {128: 100, 576: em.FULL_LENGTH}


@functools.cache
def _problem(steps, layers, size, tiles):
    d, heads, s, f = size
    p = el.random_loop_problem(jax.random.key(steps * 10 + layers), steps, layers, d, heads, s, f)
    x0, wqkv, wo, wg, wu, wd, kp, vp, mods, final, w_in, b_in, w_out, b_out = p
    wt = el.pack_loop_weights(wqkv, wo, wg, wu, wd, w_out, tiles)
    length = jnp.int32(LENGTH[s])
    args = (x0, wt, kp, vp, mods, final, w_in, b_in, b_out, length)
    ref_args = (x0, wqkv, wo, wg, wu, wd, kp, vp, mods, final, w_in, b_in, w_out, b_out, length)
    return args, ref_args, el._check(*args, tiles, em.TOKENS)


def test_split3_is_exact():
    x = jax.random.normal(jax.random.key(0), (64, 32)) * jnp.logspace(-6, 6, 32)[None, :]
    parts = el.split3(x)
    assert parts.dtype == jnp.bfloat16 and parts.shape == (3, 64, 32)
    np.testing.assert_array_equal(np.asarray(parts.astype(jnp.float32).sum(0)), np.asarray(x))
    assert not np.array_equal(np.asarray(parts[0].astype(jnp.float32)), np.asarray(x))  # hi alone is not x


def test_in_phase_is_the_float32_action_in_projection():
    """"in" in interpret mode equals its emulation bit for bit; the emulation's sum over the three parts is the
    float32 GEMM to float32 rounding (so the bf16 tokens are promoted_dense's but where a sum sits on a rounding
    tie); the row sums of squares are the prologue's of those tokens."""
    args, _, g = _problem(2, 1, SMALL_SIZE, LOOP_SMALL)
    x0, w_in, b_in = args[0], args[6], args[7]
    xs = el.split3(x0)
    tok, ssq = el.phase_in(xs, w_in, b_in, g, LOOP_SMALL, interpret=True)
    want = el.in_emulated(xs, w_in, b_in)
    np.testing.assert_array_equal(np.asarray(tok), np.asarray(want))
    np.testing.assert_allclose(np.asarray(ssq), np.asarray(em.ssq_emulated(want, g)), rtol=1e-6)
    parts = sum(jnp.einsum("MA,AD->MD", xs[p].astype(jnp.float32), w_in.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST) for p in range(3))
    whole = jnp.einsum("MA,AD->MD", x0, w_in.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    assert em.rel_err(parts, whole) < 1e-6
    upstream = promoted_dense(x0, w_in, b_in).astype(jnp.bfloat16).astype(jnp.float32)
    assert np.mean(np.asarray(want) == np.asarray(upstream)) > 0.999


def test_out_phase_matches_its_emulation():
    """"out": v through the last block's out-tiles, the bf16 Dense and the bf16 dt v, then x's parts exact."""
    args, ref_args, g = _problem(2, 1, SMALL_SIZE, LOOP_SMALL)
    x0, wt, b_out = args[0], args[1], args[8]
    h = (0.5 * jax.random.normal(jax.random.key(1), (em.ROWS, g.d))).astype(jnp.bfloat16)
    dt = -0.1
    x, parts = el.phase_out(x0, h, wt, b_out, g, LOOP_SMALL, dt=dt, interpret=True)
    want = el.out_emulated(x0, h, wt, b_out, g, LOOP_SMALL, dt=dt)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(parts.astype(jnp.float32).sum(0)), np.asarray(x))
    w_out, b_out_ = ref_args[12], ref_args[13]
    upstream = x0 + dt * promoted_dense(h, w_out, b_out_)  # the fast path's update, as JAX rounds it
    assert np.mean(np.asarray(want) == np.asarray(upstream)) > 0.999


def test_the_loop_phases_match_the_emulation_and_the_reference():
    """Two steps of one layer, small, as launches per phase, on the T real rows: against the emulation and against
    the fast path's step on upstream's functions at the stack's gate (measured 1.9e-3 of what the steps add to x).
    "in" and "out" are exact (above); the stack's phases are the emulation's program but for the order of float32
    sums, which moves a bf16 rounding of h here and there (0.09% of h's entries in step 0 of this draw) and it
    spreads through the next step: measured 7.7e-4, gated as the stack's chained phases are (5e-3)."""
    args, ref_args, _ = _problem(2, 1, SMALL_SIZE, LOOP_SMALL)
    t = em.TOKENS
    x0 = args[0][:t]
    got = el.expert_loop_phases(*args, dt=-0.5, tiles=LOOP_SMALL)
    emu = el.expert_loop_emulated(*args, dt=-0.5, tiles=LOOP_SMALL)
    ref = el.expert_loop_reference(*ref_args, dt=-0.5)
    assert em.rel_err(got[:t], emu[:t], x0) < 5e-3
    assert em.rel_err(got[:t], ref, x0) < em.GATE
    assert got.shape == (em.ROWS, el.ACTION) and np.isfinite(np.asarray(got)).all()


def test_emulated_loop_matches_the_reference_at_full_size():
    """Full size, 2 steps of 2 layers."""
    args, ref_args, _ = _problem(2, 2, FULL_SIZE, em.MegaTiles())
    emu = jax.jit(functools.partial(el.expert_loop_emulated, dt=-0.5))(*args)
    ref = jax.jit(functools.partial(el.expert_loop_reference, dt=-0.5))(*ref_args)
    assert em.rel_err(emu[:em.TOKENS], ref, args[0][:em.TOKENS]) < em.GATE


def test_the_loop_kernel_lowers_for_hopper_at_full_size():
    """10 steps of 18 layers in one Mosaic GPU kernel: one call site, the stack's barrier sites plus the loop's.
    (fused_rope changes only the stack's layer body, whose own lowering test covers it.)"""
    tiles = em.MegaTiles()
    steps, layers = 10, em.FULL_LAYERS
    g = em._geometry(em.FULL_D, em.FULL_HEADS, em.FULL_S, layers, tiles)
    sds, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    args = (sds((em.ROWS, el.ACTION), jnp.float32), sds((tiles.blocks, layers * g.per_q * g.r, em.COLS), bf),
            sds((layers, em.FULL_S, em.HEAD), bf), sds((layers, em.FULL_S, em.HEAD), bf),
            sds((steps, layers, 6, em.FULL_D), bf), sds((steps, 2, em.FULL_D), bf), sds((el.ACTION, em.FULL_D), bf),
            sds((em.FULL_D,), bf), sds((el.ACTION,), bf), sds((), jnp.int32))
    fn = jax.jit(functools.partial(el.expert_loop, tiles=tiles, dt=-0.1))
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1 and "wgmma" in jaxpr
    per = em.barriers_per_layer(tiles)
    # per layer `per` sites; per step the barrier after "out" (under i > 0), after "in", after the first norm;
    # done and the wind-back
    assert (jaxpr.count("semaphore_signal"), jaxpr.count("semaphore_wait")) == (per + 3 + 2, per + 3 + 1)
    assert el.rounds_per_call(steps, layers, tiles) == steps * (3 + per * layers) - 1


@pytest.mark.parametrize("tiles", (em.MegaTiles(), em.MegaTiles(64, 4, 4, 128, 1, True), em.MegaTiles(64, 3, 4)),
                         ids=("default", "fused_rope", "3slots"))
def test_every_ring_wait_of_the_loop_kernel_completes_across_steps(tiles):
    """tests/megakernel_schedule.py over 3 steps of 2 layers: each block's stream restarts its rows every step
    without restarting the ring, the last block's out-tiles (A = h) follow its layers', every wait has its copy,
    every block waits the same rounds, all of them."""
    problems, rounds, _ = schedule.check_loop(tiles, steps=3, layers=2)
    assert not problems, {b: p[:2] for b, p in list(problems.items())[:3]}
    assert rounds == {tuple(tiles.blocks * (k + 1) for k in range(el.rounds_per_call(3, 2, tiles)))}


def test_the_loop_schedule_check_sees_a_wrong_step_length(monkeypatch):
    """Not vacuous: a stream length per step one tile off makes the second step read the wrong rows."""
    real = el._step_tiles
    monkeypatch.setattr(el, "_step_tiles", lambda c: real(c) + 1)
    problems, _, _ = schedule.check_loop(em.MegaTiles(), steps=2, layers=2)
    assert len(problems) == em.MegaTiles().blocks
    assert any("want rows" in p for p in problems[0])


def test_bad_operands_are_named():
    args, ref_args, _ = _problem(2, 1, SMALL_SIZE, LOOP_SMALL)
    x0, wt, kp, vp, mods, final, w_in, b_in, b_out, length = args
    bad = {
        "x0": ((x0[:, :16], *args[1:]), "x0"),
        "w_in": ((x0, wt, kp, vp, mods, final, w_in.astype(jnp.float32), b_in, b_out, length), "w_in"),
        "mods": ((x0, wt, kp, vp, mods[0], final, w_in, b_in, b_out, length), r"\[I, L, 6, D\]"),
        "b_out": ((x0, wt, kp, vp, mods, final, w_in, b_in, b_in, length), "b_out"),
    }
    for _, (a, needle) in bad.items():
        with pytest.raises(ValueError, match=needle):
            el.expert_loop_emulated(*a, dt=-0.5, tiles=LOOP_SMALL)
    wqkv, wo, wg, wu, wd = ref_args[1:6]
    with pytest.raises(ValueError, match="last block"):  # 16 blocks, all of them QKV blocks
        el.pack_loop_weights(wqkv, wo, wg[..., :512], wu[..., :512], wd[:, :512], ref_args[12],
                             em.MegaTiles(64, 2, 2, 16, 1))
    with pytest.raises(ValueError, match="w_out"):
        el.pack_loop_weights(wqkv, wo, wg, wu, wd, ref_args[12][:, :16], LOOP_SMALL)
    big = el.random_loop_problem(jax.random.key(5), 1, 1, *FULL_SIZE)
    with pytest.raises(ValueError, match="L Kq >= D"):  # one layer at SQ 2: 512 rows of padding for 1024
        el.pack_loop_weights(*big[1:6], big[12], em.MegaTiles())


def test_main_parses_its_variants_before_it_needs_a_gpu():
    """The card run's argv (MegaTiles' fields, as expert_megakernel's main takes them) is checked first."""
    with pytest.raises(SystemExit, match="TILE_ROWS"):
        el.main(["64,4,4,128,1,2"])
    for argv in ([], ["64,4,4"]):
        with pytest.raises(SystemExit, match="JAX sees no GPU"):
            el.main(argv)

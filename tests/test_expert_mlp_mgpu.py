"""pallas_kernels.expert_mlp_mgpu: each phase's tile code in Mosaic GPU interpret mode against the plain-JAX
reference, the schedule's emulation against the reference, the persistent kernel lowered for Hopper on the CPU,
and (marker gpu) the persistent kernel on the card."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import expert_mlp_mgpu as em
from tests.conftest import assert_kernel_matches, rel_err

SMALL = em.ExpertMlpTiles(gate_cols=32, down_cols=64, down_splits=2, block_k=64, weight_slots=4, act_slots=2)
FULL = em.ExpertMlpTiles()
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def _weights(d, f, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    g = (jax.random.normal(k[0], (2, d, f)) * d ** -0.5).astype(dtype)
    w = (jax.random.normal(k[1], (f, d)) * f ** -0.5).astype(dtype)
    h = jax.random.normal(k[2], (em.ROWS, d)).astype(dtype)
    return h, g, w


def _act_reference(h, g):
    x = h.astype(jnp.float32)
    gate, up = (jnp.einsum("MD,DF->MF", x, g[i].astype(jnp.float32), precision="highest").astype(h.dtype)
                .astype(jnp.float32) for i in (0, 1))
    return (em.gelu_tanh(gate) * up).astype(h.dtype)


@pytest.mark.parametrize("d,f,tiles", [(128, 512, SMALL), (1024, 4096, FULL)], ids=["small", "expert"])
def test_phases_in_interpret_mode_match_the_reference(d, f, tiles):
    h, g, w = _weights(d, f, jnp.bfloat16)
    tiled = em.tile_weights(g, w, tiles)
    act = em.gate_up_phase(h, tiled, tiles, interpret=True)
    assert_kernel_matches(act, _act_reference(h, g), jnp.bfloat16, bf16_tol=BF16_TOL)
    part = em.down_phase(act, tiled, tiles, interpret=True)
    assert part.shape == (tiles.down_splits, em.ROWS, d)
    assert_kernel_matches(part.sum(0), em.expert_mlp_reference(h, g, w), jnp.bfloat16, bf16_tol=BF16_TOL)
    # the same partials as the schedule's emulation (same items, same K order, float32 accumulation)
    emulated = em.expert_mlp_emulated(h, tiled, tiles)
    assert rel_err(part.sum(0), emulated) <= 1e-6


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("d,f,tiles", [(128, 512, SMALL), (1024, 4096, FULL)], ids=["small", "expert"])
def test_emulated_schedule_matches_the_reference(d, f, tiles, dtype):
    h, g, w = _weights(d, f, dtype, seed=1)
    got = em.expert_mlp_emulated(h, em.tile_weights(g, w, tiles), tiles)
    assert_kernel_matches(got, em.expert_mlp_reference(h, g, w), dtype, bf16_tol=BF16_TOL)


def test_tile_weights_is_a_permutation():
    _, g, w = _weights(128, 512, jnp.float32)
    tiled = em.tile_weights(g, w, SMALL)
    assert sorted(np.asarray(tiled["gate_up"]).ravel().tolist()) == sorted(np.asarray(g).ravel().tolist())
    assert sorted(np.asarray(tiled["down"]).ravel().tolist()) == sorted(np.asarray(w).ravel().tolist())


def test_bad_inputs_name_what_is_wrong():
    h, g, w = _weights(128, 512, jnp.bfloat16)
    tiled = em.tile_weights(g, w, SMALL)
    with pytest.raises(ValueError, match="bfloat16"):
        em.gate_up_phase(h.astype(jnp.float32), tiled, SMALL)
    with pytest.raises(ValueError, match="h must be"):
        em.gate_up_phase(h[:50], tiled, SMALL)
    with pytest.raises(ValueError, match="down_cols must be 2"):
        em.ExpertMlpTiles(gate_cols=32, down_cols=128)
    with pytest.raises(ValueError, match="gating_einsum"):
        em.tile_weights(g[0], w, SMALL)


def test_persistent_kernel_lowers_for_hopper():
    d, f = 1024, 4096
    h = jax.ShapeDtypeStruct((50, d), jnp.bfloat16)
    tiled = {"gate_up": jax.ShapeDtypeStruct((f // 32, d, 64), jnp.bfloat16),
             "down": jax.ShapeDtypeStruct((d // 64, f, 64), jnp.bfloat16)}
    text = jax.jit(functools.partial(em.expert_mlp, tiles=FULL, interpret=False)).trace(h, tiled).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.parametrize("m", [50, 100], ids=["batch1", "batch2"])
def test_persistent_kernel_on_the_card(m):
    h, g, w = _weights(1024, 4096, jnp.bfloat16, seed=2)
    h = jax.random.normal(jax.random.key(3), (m, 1024)).astype(jnp.bfloat16)
    tiled = em.tile_weights(g, w)
    run = jax.jit(em.expert_mlp)
    got, again = run(h, tiled), run(h, tiled)
    assert_kernel_matches(got, em.expert_mlp_reference(h, g, w), jnp.bfloat16, bf16_tol=BF16_TOL)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(again))  # the semaphores were back at 0

"""scripts/weight_stream_probe.py: every variant reads what it claims (Mosaic GPU interpret mode against the plain-JAX
reference) and lowers for Hopper at the sizes the card run uses, so its one device call measures working kernels."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import weight_stream_probe as wsp

SMALL = [wsp.StreamProbe(64, 2, "none"), wsp.StreamProbe(128, 3, "none"), wsp.StreamProbe(64, 1, "wgmma"),
         wsp.StreamProbe(128, 3, "wgmma"), wsp.StreamProbe(64, 2, "lag1"), wsp.StreamProbe(256, 3, "lag1"),
         wsp.StreamProbe(64, 2, "hstream"), wsp.StreamProbe(128, 4, "hstream")]


@pytest.mark.parametrize("tiles", [1, 5], ids=["one_tile", "five_tiles"])
@pytest.mark.parametrize("probe", SMALL, ids=lambda p: p.label().replace(" ", ""))
def test_every_variant_returns_what_it_streamed(probe, tiles):
    blocks = 3
    w = jax.random.normal(jax.random.key(0), (blocks, tiles * probe.tile_rows, wsp.COLS)).astype(jnp.bfloat16)
    h_cols = tiles * probe.tile_rows if probe.consume == "hstream" else probe.tile_rows
    h = jax.random.normal(jax.random.key(1), (wsp.ROWS, h_cols)).astype(jnp.bfloat16)
    got = np.asarray(wsp.stream_weights(w, h, probe, interpret=True).astype(jnp.float32), np.float64)
    want = np.asarray(wsp.stream_weights_reference(w, h, probe).astype(jnp.float32), np.float64)
    if probe.consume == "none":
        np.testing.assert_array_equal(got, want)
    else:  # float32 accumulation of bf16 products, in another order than the reference's
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_the_card_variants_lower_for_hopper():
    for blocks in (132, 264):
        for probe in wsp.PROBES:
            if probe.smem_bytes() * (blocks // 132) > wsp.SHARED_MEMORY_BYTES:
                continue
            w = jax.ShapeDtypeStruct((blocks, 4 * probe.tile_rows, wsp.COLS), jnp.bfloat16)
            h = jax.ShapeDtypeStruct((wsp.ROWS, 4 * probe.tile_rows if probe.consume == "hstream" else
                                      probe.tile_rows), jnp.bfloat16)
            lowered = jax.jit(lambda w, h, p=probe: wsp.stream_weights(w, h, p)).trace(w, h).lower(
                lowering_platforms=("cuda",))
            assert "mosaic_gpu" in lowered.as_text(), probe


@pytest.mark.parametrize("kwargs, needle", [
    (dict(tile_rows=96), "tile_rows"), (dict(slots=0), "slots"), (dict(consume="tma"), "consume"),
    (dict(consume="lag1", slots=1), "slots >= 2"), (dict(tile_rows=256, slots=8), "shared memory"),
])
def test_bad_variants_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        wsp.StreamProbe(**kwargs)


def test_bad_operands_are_named():
    probe = wsp.StreamProbe(64, 2, "wgmma")
    w = jnp.zeros((2, 100, wsp.COLS), jnp.bfloat16)
    with pytest.raises(ValueError, match="tile_rows=64"):
        wsp.stream_weights(w, jnp.zeros((wsp.ROWS, 64), jnp.bfloat16), probe, interpret=True)

"""The persistent expert kernel's measuring instruments: its profile scopes are the phases and barrier waits
`phase_names` lists, once per layer in order; the profiled kernel lowers for Hopper at full size; `phase_profile`
reads a trace of Mosaic GPU's format into per-phase microseconds (checked on a trace built here with known
durations); the kernel without its grid barriers (main()'s --no-barriers timing) has no semaphore left and
lowers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import expert_megakernel as em
from pallas_kernels import phase_profile

FUSED = em.MegaTiles(64, 4, 4, 128, 1, True)


def _args(layers, tiles):
    g = em._geometry(em.FULL_D, em.FULL_HEADS, em.FULL_S, layers, tiles)
    sds = jax.ShapeDtypeStruct
    kp = sds((layers, em.FULL_S, em.HEAD), jnp.bfloat16)
    return (sds((em.ROWS, em.FULL_D), jnp.float32),
            sds((tiles.blocks, layers * g.per_q * g.r, em.COLS), jnp.bfloat16), kp, kp,
            sds((layers, 6, em.FULL_D), jnp.bfloat16), sds((2, em.FULL_D), jnp.bfloat16), sds((), jnp.int32))


def _sub_jaxprs(params):
    for v in params.values():
        for w in v if isinstance(v, (tuple, list)) else (v,):
            if hasattr(w, "eqns"):
                yield w
            elif hasattr(getattr(w, "jaxpr", None), "eqns"):
                yield w.jaxpr


def _kernel_jaxpr(jaxpr):
    for e in jaxpr.eqns:
        if e.primitive.name == "mpmd_map":  # plgpu.kernel
            return next(_sub_jaxprs(e.params))
        for sub in _sub_jaxprs(e.params):
            if (found := _kernel_jaxpr(sub)) is not None:
                return found
    return None


def _regions(jaxpr, path=()):
    """The named regions Mosaic GPU's lowering opens (as pallas/mosaic_gpu/lowering.py does: per jaxpr, a region
    per name pushed between consecutive equations' name stacks), as (enclosing primitives, name) in order."""
    out, last = [], []
    for e in jaxpr.eqns:
        new = [s.name for s in e.source_info.name_stack.stack]
        common = 0
        while common < min(len(last), len(new)) and last[common] == new[common]:
            common += 1
        out += [(path, n) for n in new[common:]]
        last = new
        for sub in _sub_jaxprs(e.params):
            out += _regions(sub, (*path, e.primitive.name))
    return out


@pytest.mark.parametrize("tiles", (em.MegaTiles(), FUSED), ids=("default", "fused_rope"))
def test_the_kernels_scopes_are_its_phases_and_waits_once_per_layer(tiles):
    kernel = _kernel_jaxpr(jax.make_jaxpr(functools.partial(em.expert_stack, tiles=tiles))(*_args(2, tiles)).jaxpr)
    assert kernel is not None
    regions = _regions(kernel)
    in_layer = [n for p, n in regions if "scan" in p]  # the layer loop's body (the last wait under its pl.when)
    assert tuple(in_layer) == em.phase_names(tiles)
    # the loop body is lowered once and runs per layer; the prologue's 4 and the epilogue outside it
    outside = [n for p, n in regions if "scan" not in p]
    assert outside == ["prologue", "prologue | wait", "prologue norm", "prologue norm | wait", "epilogue"]
    assert em.profile_ranges(em.FULL_LAYERS, tiles) == len(outside) + len(in_layer) * em.FULL_LAYERS


def test_the_profiled_kernel_lowers_for_hopper_at_full_size(monkeypatch):
    """With profile_dir the Mosaic module records every scope (the trace's host callback cannot lower for cuda on a
    CPU-only jax, so it is left out here; the card writes it)."""
    monkeypatch.setattr(jax.debug, "callback", lambda *a, **k: None)
    tiles = em.MegaTiles()
    fn = jax.jit(functools.partial(em.expert_stack, tiles=tiles, profile_dir="/nonexistent"))
    plain = jax.jit(functools.partial(em.expert_stack, tiles=tiles))
    args = _args(em.FULL_LAYERS, tiles)
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert len(text) > len(plain.trace(*args).lower(lowering_platforms=("cuda",)).as_text())
    # 4 bytes a trace entry, 4 entries a range, one trace (warpgroup) per block: inside the card's shared memory
    assert tiles.smem_bytes() + 16 * em.profile_ranges(em.FULL_LAYERS, tiles) <= em.SHARED_MEMORY_BYTES


def _trace(durations, starts_ns, gap=3):
    """A trace as Mosaic GPU writes it: per block (tid) B/E pairs; ts = (block start ns + cycles) / 1e3."""
    events = []
    for tid, (blocks_scopes, start) in enumerate(zip(durations, starts_ns, strict=True)):
        t = 0
        for name, cycles in blocks_scopes:
            events.append({"name": name, "ph": "B", "ts": (start + t) / 1e3, "pid": 1, "tid": tid + 1})
            t += cycles
            events.append({"name": name, "ph": "E", "ts": (start + t) / 1e3, "pid": 1, "tid": tid + 1})
            t += gap
    return {"displayTimeUnit": "ns", "traceEvents": events}


def test_summarize_gives_each_scopes_slowest_median_and_fastest_block():
    rng = np.random.default_rng(0)
    blocks, layers, ghz = 5, 4, 1.8
    names = ("P", "P | wait", "Q", "Q | wait")
    cyc = rng.integers(500, 5000, size=(blocks, layers, len(names)))
    durations = [[(n, int(cyc[b, j, k])) for j in range(layers) for k, n in enumerate(names)]
                 for b in range(blocks)]
    trace = _trace(durations, starts_ns=rng.integers(0, 10**6, size=blocks))
    spans = [cyc[b].sum() + 3 * (layers * len(names) - 1) for b in range(blocks)]
    kernel_us = float(np.median(spans)) / (ghz * 1e3)
    stats, per_us = phase_profile.summarize(trace, kernel_us)
    assert per_us == pytest.approx(ghz * 1e3, rel=1e-9)
    assert [s.name for s in stats] == list(names)
    for k, s in enumerate(stats):
        us = cyc[:, :, k] / (ghz * 1e3)  # [blocks, layers]
        assert s.count == layers
        assert s.slowest == pytest.approx(np.median(us.max(0)), rel=1e-6)
        assert s.median == pytest.approx(np.median(us), rel=1e-6)
        assert s.fastest == pytest.approx(np.median(us.min(0)), rel=1e-6)
    table = phase_profile.format_table(stats, per_us, layers=layers)
    chain = stats[0].slowest + stats[1].fastest + stats[2].slowest + stats[3].fastest
    assert f"= {chain:.2f} us" in table


def test_nested_scopes_fold_into_the_outer_one_and_a_truncated_trace_is_named():
    ev = [("P", "B", 0), ("inner", "B", 1), ("inner", "E", 2), ("P", "E", 4), ("Q", "B", 5), ("Q", "E", 9)]
    trace = {"traceEvents": [{"name": n, "ph": ph, "ts": t, "pid": 1, "tid": 1} for n, ph, t in ev]}
    assert phase_profile.block_ranges(trace) == {1: [("P", 0, 4), ("Q", 5, 9)]}
    trace["traceEvents"].pop(2)  # "inner" never ends
    with pytest.raises(ValueError, match="'P' without its begin"):
        phase_profile.block_ranges(trace)
    with pytest.raises(ValueError, match="kernel_us"):
        phase_profile.summarize(trace, 0.0)


def test_latest_trace_names_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        phase_profile.latest_trace(tmp_path)
    (tmp_path / "a-1-trace.json").write_text("{}")
    assert phase_profile.latest_trace(tmp_path).name == "a-1-trace.json"


def test_the_kernel_without_barriers_has_no_semaphore_and_lowers():
    tiles = em.MegaTiles()
    args = _args(2, tiles)
    with_barriers = str(jax.make_jaxpr(functools.partial(em.expert_stack, tiles=tiles))(*args))
    fn = functools.partial(em.expert_stack, tiles=tiles, barriers=False)
    racy = str(jax.make_jaxpr(fn)(*args))
    assert "semaphore_wait" in with_barriers and "semaphore" not in racy and "wgmma" in racy
    assert "mosaic_gpu" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_main_parses_its_instruments_before_it_needs_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="--profile needs a directory"):
        em.main(["64,4,4", "--profile"])
    with pytest.raises(SystemExit, match="JAX sees no GPU"):  # parsed: the variants, --profile DIR, --no-barriers
        em.main(["--no-barriers", "--profile", str(tmp_path / "p"), "64,4,4"])
    assert (tmp_path / "p").is_dir()
    with pytest.raises(SystemExit, match="TILE_ROWS"):
        em.main(["--no-barriers", "64,4,4,128,1,2"])

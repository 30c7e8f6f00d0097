"""Timing one implementation: compile, the one-jit sample, each phase jitted alone, memory, executed FLOPs.

Every timed call is `block_until_ready`'d. Warm runs are interleaved (total, vision, prefill, denoise, then again:
`timed_rounds`, which scripts/gpu_measure.py also uses across implementations) so drift on a shared machine hits
every figure alike. Latency statistics are over warm runs: median, p10, p90.
The phases are separate executables fed with the previous phase's real output; their medians should add up to
the one-jit total within PHASE_SUM_TOLERANCE, and the result says whether they do. An implementation with a
host-side plan (made by `sampler.sample_prepared` before every call) has it timed on its own.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np

from pi05_jax.bench import hardware, jaxpr_flops
from pi05_jax.bench.implementations import Phased
from pi05_jax.bench.roofline import PHASES

PHASE_SUM_TOLERANCE = 0.10
WARMUP_RUNS = 2


def stats(seconds: list[float]) -> dict:
    a = np.asarray(seconds, np.float64)
    return {"median_s": float(np.median(a)), "p10_s": float(np.percentile(a, 10)),
            "p90_s": float(np.percentile(a, 90)), "min_s": float(a.min()), "mean_s": float(a.mean()), "n": len(a)}


def compile_timed(fn, args) -> tuple[object, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def call_timed(compiled, args) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, time.perf_counter() - t0


def executable_memory(compiled) -> dict:
    """XLA's static memory plan of one executable (arguments, outputs, temporaries), where it reports one."""
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # not every backend implements it
        return {"available": False, "reason": f"memory_analysis() failed: {type(e).__name__}: {e}"}
    if m is None:
        return {"available": False, "reason": "memory_analysis() returned None on this backend"}
    arg, out, tmp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
    alias = m.alias_size_in_bytes
    return {"available": True, "argument_bytes": arg, "output_bytes": out, "temp_bytes": tmp, "alias_bytes": alias,
            "total_bytes": arg + out + tmp - alias}


def executed_flops(p: Phased, params, obs, noise, vision_out, prefix) -> dict:
    counts = {"vision": jaxpr_flops.matmul_flops(p.vision, params, obs),
              "prefill": jaxpr_flops.matmul_flops(p.prefill, params, obs, vision_out),
              "denoise": jaxpr_flops.matmul_flops(p.denoise, params, prefix, noise)}
    return {ph: {"matmul_flops": c.flops, "exact": c.exact, "opaque": sorted(set(c.opaque)),
                 "inexact": sorted(set(c.inexact))} for ph, c in counts.items()}


@dataclasses.dataclass
class Compiled:
    """One implementation's executables, compiled and called once: the one-jit sample and (with phases) each
    phase alone, fed with the previous phase's real output. `calls` maps "total" / "vision" / "prefill" /
    "denoise" / "prepare" (the host work before every call, where the implementation has it) to a thunk that
    makes one call; `timed_rounds` times them."""

    sample: object
    compile_s: float
    first_call_s: float
    actions: object
    phase_compile_s: dict
    vision_out: object
    prefix: object
    calls: dict


def compile_calls(p: Phased, obs, noise, *, say, phases: bool = True) -> Compiled:
    params = p.params
    say(f"[{p.name}] compiling the one-jit sample" + (f" ({p.variant})" if p.variant != p.name else ""))
    sample_c, compile_s = compile_timed(p.sample, (params, obs, noise))
    actions, first_s = call_timed(sample_c, (params, obs, noise))
    calls = {"total": lambda: sample_c(params, obs, noise)}
    phase_compile_s, vision_out, prefix = {}, None, None
    if phases:
        say(f"[{p.name}] compiled in {compile_s:.1f} s, first call {first_s * 1e3:.1f} ms; compiling the phases")
        vision_c, phase_compile_s["vision"] = compile_timed(p.vision, (params, obs))
        vision_out, _ = call_timed(vision_c, (params, obs))
        prefill_c, phase_compile_s["prefill"] = compile_timed(p.prefill, (params, obs, vision_out))
        prefix, _ = call_timed(prefill_c, (params, obs, vision_out))
        denoise_c, phase_compile_s["denoise"] = compile_timed(p.denoise, (params, prefix, noise))
        call_timed(denoise_c, (params, prefix, noise))
        calls.update(vision=lambda: vision_c(params, obs), prefill=lambda: prefill_c(params, obs, vision_out),
                     denoise=lambda: denoise_c(params, prefix, noise))
    else:
        say(f"[{p.name}] compiled in {compile_s:.1f} s, first call {first_s * 1e3:.1f} ms")
    if p.prepare is not None:
        calls["prepare"] = p.prepare
    if p.prepare_host is not None:
        calls["prepare_host"] = p.prepare_host
    return Compiled(sample=sample_c, compile_s=compile_s, first_call_s=first_s, actions=actions,
                    phase_compile_s=phase_compile_s, vision_out=vision_out, prefix=prefix, calls=calls)


def timed_rounds(calls: Mapping[str, Callable[[], object]], runs: int, *,
                 warmup: int = WARMUP_RUNS) -> dict[str, list[float]]:
    """`warmup + runs` rounds; each round makes one call of every entry in turn (interleaved, so drift hits all
    alike), timed from the call to `block_until_ready` of its result. Returns the `runs` timed seconds per key."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(warmup + runs):
        for key, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
    return times


def run_implementation(p: Phased, obs, noise, *, runs: int, say) -> dict:
    params = p.params
    c = compile_calls(p, obs, noise, say=say)
    sample_c, compile_s, first_s, actions = c.sample, c.compile_s, c.first_call_s, c.actions
    vision_out, prefix = c.vision_out, c.prefix
    say(f"[{p.name}] timing {runs} warm runs (after {WARMUP_RUNS} warm-up)")
    times = timed_rounds(c.calls, runs)
    total = stats(times["total"])
    prepare = stats(times["prepare"]) if p.prepare is not None else None
    prepare_host = stats(times["prepare_host"]) if p.prepare_host is not None else None
    phases = {ph: stats(times[ph]) for ph in PHASES}
    phase_sum = sum(phases[ph]["median_s"] for ph in PHASES)
    ratio = phase_sum / total["median_s"]
    _, peak, mem_reason = hardware.bytes_in_use()
    actions = np.asarray(actions, np.float32)
    return {
        "name": p.name,
        "variant": p.variant,
        "description": p.description,
        "compile_s": compile_s,
        "first_call_s": first_s,
        "time_to_first_action_s": compile_s + first_s,
        "phase_compile_s": c.phase_compile_s,
        "total": total,
        "hz": 1.0 / total["median_s"],
        "host_prepare": prepare,
        "host_prepare_served": prepare_host,
        "host_prepare_note": None if prepare is None else (
            "host work before every call (the plan from the masks, sampler.sample_prepared); not in 'total'. "
            "host_prepare: from this run's device-resident observation (its masks are device-to-host reads); "
            "host_prepare_served: from the same masks as host arrays, as a request brings them to `pi05 serve`"),
        "phases": phases,
        "phase_sum_s": phase_sum,
        "phase_sum_over_total": ratio,
        "phases_add_up": abs(ratio - 1.0) <= PHASE_SUM_TOLERANCE,
        "phase_sum_tolerance": PHASE_SUM_TOLERANCE,
        "memory": {
            "device_peak_bytes": peak,
            "device_peak_note": ("allocator peak of the process so far (implementations run in the order listed, "
                                 "so later ones include earlier peaks)" if peak is not None else mem_reason),
            "executable": executable_memory(sample_c),
        },
        "executed": executed_flops(p, params, obs, noise, vision_out, prefix),
        "actions": actions,
        "actions_finite": bool(np.all(np.isfinite(actions))),
    }


def run_bridged_vision(impl, engines, params, obs, num_steps: int, *, runs: int, say) -> dict:
    """The vision phase of `impl` through the engine(s) (bridges.vision_bridge.bridged: same layout, the
    engine as the tower) and through XLA, each jitted alone, warm runs interleaved; the engine's tokens are compared
    with XLA's. A failure (e.g. no engine for this layout's image count) is recorded, not raised."""
    from bridges.vision_bridge import bridged as bridge
    from pi05_jax.bench.implementations import phased

    kind = engines.engines[0].manifest.kind
    out = {"kind": kind, "engines": [str(e.path) for e in engines.engines]}
    try:
        bridged = phased(bridge(impl, engines), params, obs, num_steps)
        xla = phased(impl, params, obs, num_steps)
        say(f"[{impl.name}] compiling the vision phase through the {kind} engine ({bridged.variant})")
        bridged_c, compile_s = compile_timed(bridged.vision, (bridged.params, obs))
        xla_c, _ = compile_timed(xla.vision, (xla.params, obs))
        calls = {"bridged": lambda: bridged_c(bridged.params, obs), "xla": lambda: xla_c(xla.params, obs)}
        outs = {key: jax.block_until_ready(call()) for key, call in calls.items()}
        times = timed_rounds(calls, runs)
    except Exception as e:  # an engine that does not fit this implementation's layout must not hide the rest
        say(f"[{impl.name}] vision through the {kind} engine FAILED: {type(e).__name__}: {e}")
        return {**out, "error": f"{type(e).__name__}: {str(e)[:500]}"}

    def floats(tree):
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)
                               if np.issubdtype(np.asarray(x).dtype, np.floating)])

    a, b = floats(outs["bridged"]), floats(outs["xla"])
    bridged_s, xla_s = stats(times["bridged"]), stats(times["xla"])
    return {**out, "variant": bridged.variant, "compile_s": compile_s, "vision": bridged_s, "xla_vision": xla_s,
            "speedup_vs_xla": xla_s["median_s"] / bridged_s["median_s"],
            "tokens_rel_err_vs_xla": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
            "note": "both vision phases jitted alone, warm runs interleaved; a large tokens_rel_err_vs_xla means "
                    "the engine was built from other weights (e.g. bench's random weights)"}

"""Start-up, measured in fresh processes: cold, then warm with JAX's persistent compilation cache.

The parent makes an empty cache directory and runs this module twice as `python -m pi05_jax.bench.startup`
with the same selection (the first implementation listed). Each child reports, as one JSON line:
imports, weights (checkpoint load, or random init when there is no checkpoint), compile (trace + lower + compile,
or a cache hit), the first call, the time to first action (weights + compile + first call) and device memory after
the weights are on the device and at peak. The first child fills the cache, the second should find it.

The gates the project holds for the full bf16 model on an H100 are reported next to the figures, with whether
they apply to this run.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: the child's imports are part of its start-up

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

MARKER = "PI05_STARTUP "
GATES = {"cold_s": 60.0, "warm_s": 15.0, "peak_memory_bytes": 10e9}
GATES_APPLY_TO = "the full pi0.5 model in bfloat16 on an H100"


def _child_args(sel, cache_dir: str) -> list[str]:
    spec = {"checkpoint": sel.checkpoint, "preset": sel.preset, "dtype": sel.dtype, "views": sel.views,
            "prompt_len": sel.prompt_len, "steps": sel.steps, "batch": sel.batch, "kernels": sel.kernels[0],
            "seed": sel.seed, "device": sel.device, "cache_dir": cache_dir}
    return [sys.executable, "-m", "pi05_jax.bench.startup", "--spec", json.dumps(spec)]


def _cache_entries(path: pathlib.Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def _run_child(sel, cache_dir: pathlib.Path, label: str, say) -> dict:
    env = dict(os.environ)
    if sel.device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    # The parent already holds the GPU's preallocated pool (75% by default): the child allocates on demand.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    before = _cache_entries(cache_dir)
    say(f"start-up ({label}): fresh process, compilation cache {'empty' if before == 0 else 'warm'}")
    t_spawn = time.time()
    proc = subprocess.run(_child_args(sel, str(cache_dir)), capture_output=True, text=True, env=env,
                          cwd=pathlib.Path(__file__).resolve().parents[2])
    wall = time.time() - t_spawn
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"start-up child exited {proc.returncode}: {' | '.join(tail)[:600]}"}
    result = json.loads(lines[-1][len(MARKER):])
    result["process_wall_s"] = wall
    result["spawn_to_first_action_s"] = result.pop("first_action_unix") - t_spawn
    result["cache_entries_before"] = before
    result["cache_entries_after"] = _cache_entries(cache_dir)
    return result


def gates_apply(sel, device_kind: str) -> bool:
    from pi05_jax.config import preset

    return sel.config == preset("full") and sel.dtype == "bfloat16" and "H100" in device_kind


def measure_startup(sel, *, say) -> dict:
    import jax

    with tempfile.TemporaryDirectory(prefix="pi05-jax-cache-") as d:
        cache = pathlib.Path(d)
        cold = _run_child(sel, cache, "cold", say)
        warm = _run_child(sel, cache, "warm", say)
    out = {"implementation": sel.kernels[0], "cold": cold, "warm": warm,
           "method": "two fresh subprocesses sharing a new jax_compilation_cache_dir (min compile time and entry "
                     "size 0, so every executable is cached); cold fills it, warm reads it. The children allocate "
                     "device memory on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false unless set): the parent process "
                     "holds the preallocated pool"}
    if "error" not in warm and "error" not in cold:
        out["warm_cache_hit"] = warm["cache_entries_after"] == warm["cache_entries_before"] > 0
    peaks = [r["device_peak_bytes"] for r in (cold, warm) if r.get("device_peak_bytes")]
    peak = max(peaks) if peaks else None
    out["gates"] = {
        "applies_to_this_run": gates_apply(sel, jax.devices()[0].device_kind),
        "applies_to": GATES_APPLY_TO,
        "weights_note": None if sel.checkpoint else "no checkpoint: 'weights' is random init on the device, not a "
                                                    "checkpoint load",
        "cold_s_max": GATES["cold_s"], "warm_s_max": GATES["warm_s"],
        "peak_memory_bytes_max": GATES["peak_memory_bytes"],
        "cold_ok": ("error" not in cold) and cold["time_to_first_action_s"] <= GATES["cold_s"],
        "warm_ok": ("error" not in warm) and warm["time_to_first_action_s"] <= GATES["warm_s"],
        "memory_ok": None if not peak else peak <= GATES["peak_memory_bytes"],
    }
    return out


# --- the child -------------------------------------------------------------------------------------------------------


def _child(spec: dict) -> dict:
    import jax

    if spec["device"] == "cpu":
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import numpy as np

    from pi05_jax import implementations
    from pi05_jax.bench import hardware
    from pi05_jax.bench.implementations import phased
    from pi05_jax.bench.selection import random_weights
    from pi05_jax.synthetic import synthetic_noise, synthetic_observation

    imports_s = time.perf_counter() - _T0
    t0 = time.perf_counter()
    if spec["checkpoint"]:
        from checkpoints.openpi_io import load_params
        from pi05_jax.runtime import DTYPES

        config, params = load_params(spec["checkpoint"], dtype=DTYPES[spec["dtype"]])
        source = "checkpoint load"
    else:
        from pi05_jax.config import preset

        config = preset(spec["preset"])
        params = random_weights(config, seed=spec["seed"], dtype=spec["dtype"])
        source = "random init (no checkpoint)"
    params = jax.block_until_ready(params)
    weights_s = time.perf_counter() - t0
    after_load, _, mem_reason = hardware.bytes_in_use()
    obs = jax.device_put(synthetic_observation(config, batch=spec["batch"], views=spec["views"],
                                               prompt_len=spec["prompt_len"], seed=spec["seed"]))
    noise = jax.device_put(synthetic_noise(config, batch=spec["batch"], seed=spec["seed"]))
    t0 = time.perf_counter()
    p = phased(implementations.get(spec["kernels"]), params, obs, spec["steps"])
    compiled = jax.jit(p.sample).lower(p.params, obs, noise).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    actions = np.asarray(jax.block_until_ready(compiled(p.params, obs, noise)))
    first_s = time.perf_counter() - t0
    first_action_unix = time.time()
    _, peak, _ = hardware.bytes_in_use()
    return {"imports_s": imports_s, "weights_s": weights_s, "weights_source": source, "compile_s": compile_s,
            "first_call_s": first_s, "time_to_first_action_s": weights_s + compile_s + first_s,
            "process_to_first_action_s": time.perf_counter() - _T0, "first_action_unix": first_action_unix,
            "device_bytes_after_load": after_load, "device_peak_bytes": peak, "device_memory_note": mem_reason,
            "actions_finite": bool(np.all(np.isfinite(actions)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pi05_jax.bench.startup",
                                     description="one start-up measurement (run by `pi05 bench --startup`)")
    parser.add_argument("--spec", required=True, help="JSON selection written by the parent")
    args = parser.parse_args(argv)
    result = _child(json.loads(args.spec))
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

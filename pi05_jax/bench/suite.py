"""One `pi05 bench` run, start to end, as one JSON-ready document.

Order: the card's ceilings (before anything else is on the device), weights and inputs, the roofline for the
configuration, every implementation in the order listed, the projection to other hardware, then start-up in
fresh subprocesses when asked. Nothing here prints except progress (stderr); `report` renders the document.
"""

from __future__ import annotations

import datetime
import pathlib
import shlex
import subprocess
import sys

import numpy as np

from pi05_jax.bench import hardware, roofline
from pi05_jax.bench.implementations import phased, resolve
from pi05_jax.bench.roofline import FLOOR, PADDED, PHASES
from pi05_jax.bench.runner import run_bridged_vision, run_implementation
from pi05_jax.bench.selection import Selection, build

PROJECTION_LABEL = ("PROJECTION from published peak specs (dense, datasheet figures), not a measurement: "
                    "the floor these cards would reach with the same FLOPs and bytes")


def commit() -> dict:
    root = pathlib.Path(__file__).resolve().parents[2]

    def git(*args) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "dirty": bool(status) if status is not None else None}


def canonical_command(sel: Selection, extra: list[str]) -> str:
    src = ["--checkpoint", sel.checkpoint] if sel.checkpoint else ["--preset", sel.preset]
    args = ["pi05", "bench", *src, "--views", str(sel.views), "--prompt-len", str(sel.prompt_len), "--steps",
            str(sel.steps), "--batch", str(sel.batch), "--kernels", ",".join(sel.kernels), "--dtype", sel.dtype,
            "--runs", str(sel.runs), *extra]
    return shlex.join(args)


def token_accounting(executed: dict, floor_flops: int, padded_flops: int) -> str:
    """What an implementation's executed matmul FLOPs say about the tokens it computes."""
    if not executed["exact"]:
        return "unknown (" + ", ".join(executed["opaque"] + executed["inexact"]) + " not counted)"
    f = executed["matmul_flops"]
    if f == padded_flops:
        return "padded (exactly upstream's padded work)"
    if floor_flops <= f <= 1.05 * floor_flops:
        return "valid (within 5% of the floor's count)"
    return f"other ({f / floor_flops:.2f}x the floor's count, {f / padded_flops:.2f}x padded)"


def roofline_section(sel: Selection, params, ceilings: dict, datasheet: dict) -> tuple[dict, dict]:
    """The floor at the ceilings measured on this card; `datasheet` (hardware.datasheet_rates) adds the floor at
    the card's datasheet figures beside it, where the card is known."""
    work = roofline.Workload(batch=sel.batch, views=sel.views, prompt_len=sel.prompt_len, num_steps=sel.steps)
    weight_bytes = roofline.weight_bytes_from_params(params)
    act_bytes = np.dtype("float32").itemsize if sel.dtype == "float32" else 2
    costs = roofline.phase_costs(sel.config, work, FLOOR, weight_bytes=weight_bytes, act_bytes=act_bytes)
    padded = roofline.phase_costs(sel.config, work, PADDED, weight_bytes=weight_bytes, act_bytes=act_bytes)
    rates = roofline.Rates(matmul_flops_per_s=ceilings["matmul"]["flops_per_s"],
                           bytes_per_s=ceilings["bandwidth"]["bytes_per_s"])
    fl = roofline.floor(costs, rates)
    known = datasheet["bytes_per_s"] is not None and datasheet["matmul_flops_per_s"] is not None
    sheet = roofline.floor(costs, roofline.Rates(datasheet["matmul_flops_per_s"], datasheet["bytes_per_s"])) \
        if known else None
    phases = {}
    for ph in PHASES:
        c, pc = costs[ph], padded[ph]
        phases[ph] = {"flops": c.flops, "bytes": c.bytes, "flops_detail": c.flops_detail,
                      "bytes_detail": c.bytes_detail, **fl[ph], "padded_flops": pc.flops, "padded_bytes": pc.bytes,
                      "datasheet_floor_s": sheet[ph]["floor_s"] if sheet else None}
    section = {
        "accounting": {"floor": FLOOR.description, "padded": PADDED.description,
                       "counted": "matmul FLOPs; bytes of weights + phase inputs/outputs + KV cache (ideal fusion)"},
        "workload": {"prefix_tokens_valid": roofline.prefix_tokens(sel.config, work, FLOOR),
                     "prefix_tokens_padded": roofline.prefix_tokens(sel.config, work, PADDED),
                     "euler_steps": work.euler_steps},
        "weight_bytes_source": "sizes of the params on the device (a quantized leaf counts its stored arrays)",
        "weight_bytes_total": int(sum(weight_bytes.values())),
        "rates": {"matmul_flops_per_s": rates.matmul_flops_per_s, "bytes_per_s": rates.bytes_per_s,
                  "source": "measured on this card at the start of the run (ceilings)"},
        "datasheet": {**datasheet, "meaning": "the card's datasheet figures, beside the measured rates; the floor "
                                              "uses the measured ones"},
        "phases": phases,
        "total_floor_s": fl["total"]["floor_s"],
        "datasheet_total_floor_s": sheet["total"]["floor_s"] if sheet else None,
    }
    return section, costs


def projection_section(costs: dict, dtype: str, eff: dict | None) -> dict:
    entries = []
    for spec in hardware.PUBLISHED:
        peak = spec.matmul_flops_per_s.get(dtype)
        entry = {"card": spec.name, "note": spec.note, "bytes_per_s": spec.bytes_per_s, "matmul_flops_per_s": peak}
        if peak is None:
            entry.update(phases=None, total_floor_s=None,
                         reason=f"no published {dtype} matmul rate for {spec.name}")
            entries.append(entry)
            continue
        fl = roofline.floor(costs, roofline.Rates(peak, spec.bytes_per_s))
        entry["phases"] = {ph: fl[ph]["floor_s"] for ph in PHASES}
        entry["total_floor_s"] = fl["total"]["floor_s"]
        if eff:
            fe = roofline.floor(costs, roofline.Rates(peak * eff["matmul"], spec.bytes_per_s * eff["bandwidth"]))
            entry["total_floor_at_measured_efficiency_s"] = fe["total"]["floor_s"]
        entries.append(entry)
    return {"label": PROJECTION_LABEL, "dtype": dtype,
            "efficiency_applied": eff and {**eff, "meaning": "this card's measured ceilings / its published peaks, "
                                                             "applied to every card"},
            "entries": entries}


def run_bench(sel: Selection, *, say, startup: bool = False, extra_args: list[str] | None = None,
              vision_engines=None, compare_checkpoint: str | None = None) -> dict:
    """`vision_engines` (a bridges.vision_bridge.EngineSet): also time each implementation's vision phase through
    the engine(s), next to its XLA vision phase (result key "vision_bridged"). `compare_checkpoint`: a second
    checkpoint of the same architecture (e.g. `pi05 quantize`'s output of --checkpoint); every implementation is
    timed on its weights too, right after the same implementation on --checkpoint's, named `<impl>@<dir name>`."""
    from pi05_jax.runtime import DTYPES

    info = hardware.device_info()
    say(f"jax {info['jax_version']} on {info['device_kind']} ({info['platform']}); measuring ceilings")
    ceilings = hardware.measure_ceilings(DTYPES[sel.dtype])
    say(f"ceilings: {ceilings['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s copy, "
        f"{ceilings['matmul']['flops_per_s'] / 1e12:.2f} TFLOP/s {sel.dtype} matmul")
    built = build(sel, say)
    weight_sets = [(None, built.params)]
    if compare_checkpoint is not None:
        weight_sets.append((compare_checkpoint, load_compared(sel, compare_checkpoint, say)))
    in_use, _, mem_reason = hardware.bytes_in_use()
    datasheet = hardware.datasheet_rates(info["device_kind"], DTYPES[sel.dtype])
    section, costs = roofline_section(sel, built.params, ceilings, datasheet)

    results = []
    for impl in resolve(",".join(sel.kernels)):
        for ckpt, params in weight_sets:
            name = impl.name if ckpt is None else f"{impl.name}@{compared_label(ckpt)}"
            try:
                p = phased(impl, params, built.obs, sel.steps)
                r = run_implementation(p, built.obs, built.noise, runs=sel.runs, say=say)
            except Exception as e:  # one broken implementation must not hide the others' figures
                say(f"[{name}] FAILED: {type(e).__name__}: {e}")
                results.append({"name": name, "error": f"{type(e).__name__}: {str(e)[:500]}"})
                continue
            r["name"], r["checkpoint"] = name, ckpt or sel.checkpoint
            if vision_engines is not None:
                r["vision_bridged"] = run_bridged_vision(impl, vision_engines, params, built.obs, sel.steps,
                                                         runs=sel.runs, say=say)
            results.append(r)
    _annotate(results, section)

    eff = hardware.efficiency(ceilings, info["device_kind"], DTYPES[sel.dtype])
    doc = {
        "schema": "pi05-bench/1",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **commit(),
        "command": canonical_command(sel, extra_args or []),
        "argv": sys.argv,
        "device": info,
        "selection": sel.as_dict(),
        "ceilings": ceilings,
        "load": {"weights_s": built.weights_s, "weights_source": built.weights_source,
                 "device_bytes_in_use_after_load": in_use,
                 "device_memory_note": mem_reason},
        "roofline": section,
        "implementations": results,
        "projection": projection_section(costs, hardware.dtype_key(DTYPES[sel.dtype]), eff),
    }
    if startup:
        from pi05_jax.bench.startup import measure_startup

        doc["startup"] = measure_startup(sel, say=say)
    return doc


def compared_label(checkpoint: str) -> str:
    return pathlib.Path(checkpoint).resolve().name or "compared"


def load_compared(sel: Selection, checkpoint: str, say) -> dict:
    """--compare-checkpoint's params, in --dtype; its architecture must be --checkpoint's (the same inputs run on
    both, and the floor is counted once)."""
    import jax

    from checkpoints.errors import CheckpointError
    from checkpoints.openpi_io import load_params, read_config
    from pi05_jax.commands.common import UsageError
    from pi05_jax.runtime import DTYPES

    try:
        config = read_config(checkpoint)
    except (CheckpointError, FileNotFoundError) as e:
        raise UsageError(f"--compare-checkpoint: {e}") from e
    if config != sel.config:
        diff = [f"{k}: {v} vs {getattr(config, k)}" for k, v in vars(sel.config).items() if getattr(config, k) != v]
        raise UsageError(f"--compare-checkpoint {checkpoint} is not the architecture of --checkpoint "
                         f"{sel.checkpoint} ({'; '.join(diff)}): compare checkpoints of one model, e.g. a "
                         f"checkpoint and its `pi05 quantize` output")
    say(f"loading --compare-checkpoint {checkpoint}")
    _, params = load_params(checkpoint, dtype=DTYPES[sel.dtype], progress=say)
    return jax.block_until_ready(params)


def _annotate(results: list[dict], section: dict) -> None:
    """Ratios against the first implementation, distance from the floor, token accounting; drop raw actions."""
    ok = [r for r in results if "error" not in r]
    first = ok[0] if ok and ok[0] is results[0] else None
    for r in ok:
        r["vs_floor"] = {ph: r["phases"][ph]["median_s"] / section["phases"][ph]["floor_s"] for ph in PHASES}
        r["vs_floor"]["total"] = r["total"]["median_s"] / section["total_floor_s"]
        r["token_accounting"] = {ph: token_accounting(r["executed"][ph], section["phases"][ph]["flops"],
                                                      section["phases"][ph]["padded_flops"]) for ph in PHASES}
        if first is not None:
            r["speedup_vs_first"] = first["total"]["median_s"] / r["total"]["median_s"]
            a, b = r["actions"].astype(np.float64), first["actions"].astype(np.float64)
            r["actions_rel_err_vs_first"] = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
            r["actions_cos_vs_first"] = float(np.sum(a * b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
        else:
            r["speedup_vs_first"] = None
            r["actions_rel_err_vs_first"] = None
            r["actions_cos_vs_first"] = None
    for r in ok:
        r.pop("actions")
    if results and "error" in results[0]:
        for r in ok:
            r["ratio_note"] = f"no ratio: the first implementation ({results[0]['name']}) failed"

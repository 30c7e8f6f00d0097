"""Rendering a bench document: the readable stdout table, the JSON file, the PNG chart."""

from __future__ import annotations

import json
import pathlib

from pi05_jax.bench.roofline import PHASES

PHASE_COLORS = {"vision": "#4C72B0", "prefill": "#DD8452", "denoise": "#55A868"}


def _ms(s: float | None) -> str:
    """Seconds as milliseconds, three significant digits (0.000123 s -> '0.123')."""
    return "n/a" if s is None else f"{s * 1e3:.3g}"


def _bytes(b: int | None) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header), *(fmt.format(*map(str, r)) for r in rows)]


def text(doc: dict) -> str:
    sel, dev, ceil = doc["selection"], doc["device"], doc["ceilings"]
    lines = [
        f"pi05 bench: {sel['source']}, {sel['dtype']}, batch {sel['batch']}, {sel['views']} valid view(s), "
        f"{sel['prompt_len']}-token prompt, {sel['steps']} steps",
        f"device: {dev['device_kind']} ({dev['platform']}), jax {dev['jax_version']}, commit "
        f"{(doc.get('commit') or 'unknown')[:12]}{' (uncommitted changes)' if doc.get('dirty') else ''}, "
        f"{doc['date']}",
        f"ceilings measured at the start: copy {ceil['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s (read+write), "
        f"{sel['dtype']} matmul {ceil['matmul']['flops_per_s'] / 1e12:.2f} TFLOP/s",
        f"weights: {doc['load']['weights_source']} {doc['load']['weights_s']:.2f} s; device memory after load: "
        f"{_bytes(doc['load']['device_bytes_in_use_after_load'])}"
        + (f" ({doc['load']['device_memory_note']})" if doc["load"]["device_memory_note"] else ""),
        "",
        f"latency over {sel['runs']} warm runs, ms: median [p10 - p90]; phases jitted alone, medians",
    ]
    rows = []
    for r in doc["implementations"]:
        if "error" in r:
            rows.append([r["name"], "FAILED", r["error"][:60], "", "", "", "", "", "", "", "", ""])
            continue
        t = r["total"]
        mem = r["memory"]["device_peak_bytes"]
        exe = r["memory"]["executable"]
        plan = f"plan {_bytes(exe['total_bytes'])}" if exe["available"] else "no plan"
        mem_s = f"{_bytes(mem)} ({plan})" if mem is not None else f"n/a ({plan})"
        speed = "" if r.get("speedup_vs_first") is None else f"{r['speedup_vs_first']:.2f}x"
        err = "" if r.get("actions_rel_err_vs_first") is None else f"{r['actions_rel_err_vs_first']:.1e}"
        add = f"{r['phase_sum_over_total'] * 100:.0f}% {'ok' if r['phases_add_up'] else 'NO'}"
        prep = "-"
        if r.get("host_prepare"):
            served = r.get("host_prepare_served")
            prep = (f"{_ms(served['median_s'])} / " if served else "") + _ms(r["host_prepare"]["median_s"])
        rows.append([r["name"], f"{r['compile_s']:.1f} s", f"{_ms(t['median_s'])} [{_ms(t['p10_s'])} - "
                     f"{_ms(t['p90_s'])}]", f"{r['hz']:.1f}", *(_ms(r["phases"][p]["median_s"]) for p in PHASES),
                     add, prep, mem_s, speed, err])
    lines += _table(["impl", "compile", "total", "Hz", "vision", "prefill", "denoise", "sum/total", "host prep",
                     "peak mem", "speedup vs first", "rel err vs first"], rows)
    if any(r.get("host_prepare") for r in doc["implementations"]):
        lines.append("  host prep: the host work before each call (the plan from the masks, sampler.sample_prepared; "
                     "not in total): with the masks as a request brings them (host arrays, as `pi05 serve` gets "
                     "them) / from this run's device-resident observation (device-to-host reads)")
    lines.append("  peak mem: the device allocator's peak so far in this process (n/a where the backend keeps no "
                 "statistics); plan: XLA's memory plan of the one-jit executable (arguments + outputs + temporaries)")
    lines += _bridged_vision_lines(doc["implementations"])

    rl = doc["roofline"]
    ok = [r for r in doc["implementations"] if "error" not in r]
    w = rl["workload"]
    lines += ["", f"roofline: the floor counts valid tokens ({w['prefix_tokens_valid']} prefix tokens; upstream "
                  f"computes {w['prefix_tokens_padded']} padded), adaRMS precomputed, {w['euler_steps']} steps"]
    lines += _rates_lines(rl, sel["dtype"])
    sheet = rl.get("datasheet_total_floor_s") is not None
    rows = []
    for ph in PHASES:
        f = rl["phases"][ph]
        rows.append([ph, f"{f['flops'] / 1e9:.2f}", f"{f['bytes'] / 1e6:.1f}", _ms(f["floor_s"]), f["bound"],
                     *([_ms(f["datasheet_floor_s"])] if sheet else []), *(f"{r['vs_floor'][ph]:.1f}x" for r in ok)])
    rows.append(["total", f"{sum(rl['phases'][p]['flops'] for p in PHASES) / 1e9:.2f}",
                 f"{sum(rl['phases'][p]['bytes'] for p in PHASES) / 1e6:.1f}", _ms(rl["total_floor_s"]), "",
                 *([_ms(rl["datasheet_total_floor_s"])] if sheet else []),
                 *(f"{r['vs_floor']['total']:.1f}x" for r in ok)])
    lines += _table(["phase", "GFLOP", "MB", "floor ms", "bound", *(["floor ms at datasheet"] if sheet else []),
                     *(f"{r['name']} / floor" for r in ok)], rows)
    for r in ok:
        acc = "; ".join(f"{ph} {r['token_accounting'][ph]}" for ph in PHASES)
        lines.append(f"  {r['name']} computes: {acc}")

    pr = doc["projection"]
    lines += ["", pr["label"] + f" ({pr['dtype']})"]
    rows = []
    for e in pr["entries"]:
        if e["total_floor_s"] is None:
            rows.append([e["card"], f"{e['bytes_per_s'] / 1e9:.0f}", "n/a", "", "", "", "n/a", "", ""])
            continue
        eff = e.get("total_floor_at_measured_efficiency_s")
        rows.append([e["card"], f"{e['bytes_per_s'] / 1e9:.0f}", f"{e['matmul_flops_per_s'] / 1e12:.0f}",
                     *(_ms(e["phases"][p]) for p in PHASES), _ms(e["total_floor_s"]),
                     f"{1 / e['total_floor_s']:.0f}", _ms(eff) if eff else ""])
    lines += _table(["card", "GB/s", "TFLOP/s", "vision", "prefill", "denoise", "floor ms", "Hz",
                     "at this card's efficiency"], rows)

    if "startup" in doc:
        lines += ["", *startup_text(doc["startup"])]
    return "\n".join(lines)


def _rates_lines(rl: dict, dtype: str) -> list[str]:
    """The rates the floor divides by (measured on this card) beside the card's datasheet figures."""
    rates, sheet = rl["rates"], rl.get("datasheet") or {"card": "unknown"}
    measured = (rates["bytes_per_s"], rates["matmul_flops_per_s"])
    published = (sheet.get("bytes_per_s"), sheet.get("matmul_flops_per_s"))
    def fmt(x: float) -> str:
        return f"{x:.0f}" if x >= 100 else f"{x:.3g}"

    rows = []
    for label, scale, m, d in (("copy GB/s", 1e9, measured[0], published[0]),
                               (f"{dtype} matmul TFLOP/s", 1e12, measured[1], published[1])):
        memory = f" {sheet['memory']}" if d is not None and label.startswith("copy") and sheet.get("memory") else ""
        rows.append([label, fmt(m / scale), "unknown" if d is None else fmt(d / scale) + memory,
                     "" if d is None else f"{m / d * 100:.0f}%"])
    return _table(["rate", "measured (the floor's)", f"datasheet ({sheet['card']})", "measured / datasheet"], rows)


def startup_text(st: dict) -> list[str]:
    lines = [f"start-up ({st['implementation']}), fresh processes: cold cache, then warm persistent cache"]
    rows = []
    for label in ("cold", "warm"):
        r = st[label]
        if "error" in r:
            rows.append([label, "FAILED", r["error"][:80], "", "", "", "", ""])
            continue
        rows.append([label, f"{r['imports_s']:.1f}", f"{r['weights_s']:.1f}", f"{r['compile_s']:.1f}",
                     f"{r['first_call_s']:.2f}", f"{r['time_to_first_action_s']:.1f}",
                     _bytes(r["device_bytes_after_load"]), _bytes(r["device_peak_bytes"])])
    lines += _table(["run", "imports s", "weights s", "compile s", "first call s", "to first action s",
                     "mem after load", "mem peak"], rows)
    g = st["gates"]
    verdict = "apply to this run" if g["applies_to_this_run"] else "do not apply to this run (shown for reference)"
    lines.append(f"  gates for {g['applies_to']} {verdict}: cold <= {g['cold_s_max']:.0f} s "
                 f"{'ok' if g['cold_ok'] else 'NO'}, warm <= {g['warm_s_max']:.0f} s {'ok' if g['warm_ok'] else 'NO'},"
                 f" memory <= {g['peak_memory_bytes_max'] / 1e9:.0f} GB "
                 f"{'n/a' if g['memory_ok'] is None else ('ok' if g['memory_ok'] else 'NO')}")
    if "warm_cache_hit" in st:
        lines.append(f"  warm run found the cache: {'yes' if st['warm_cache_hit'] else 'NO'}")
    return lines


def _plain(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def write_json(doc: dict, path: str) -> pathlib.Path:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=_plain) + "\n")
    return out


def write_plot(doc: dict, path: str) -> pathlib.Path:
    """Stacked phase medians per implementation, the floor as its own bar, one-jit totals as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["implementations"] if "error" not in r]
    labels = [r["name"] for r in ok] + ["floor (this card)"]
    parts = [{p: r["phases"][p]["median_s"] * 1e3 for p in PHASES} for r in ok]
    parts.append({p: doc["roofline"]["phases"][p]["floor_s"] * 1e3 for p in PHASES})
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.7 * len(labels)))
    y = list(range(len(labels)))[::-1]
    for yi, part in zip(y, parts, strict=True):
        left = 0.0
        for p in PHASES:
            ax.barh(yi, part[p], left=left, color=PHASE_COLORS[p], edgecolor="white",
                    label=p if yi == y[0] else None)
            left += part[p]
        ax.text(left, yi, f" {left:.3g} ms", va="center", fontsize=8)
    for yi, r in zip(y, ok, strict=False):
        t = r["total"]
        ax.errorbar(t["median_s"] * 1e3, yi, xerr=[[(t["median_s"] - t["p10_s"]) * 1e3],
                                                    [(t["p90_s"] - t["median_s"]) * 1e3]],
                    fmt="kD", markersize=5, capsize=3, label="one-jit total (median, p10-p90)" if yi == y[0] else None)
    ax.set_yticks(y, labels)
    ax.set_xlabel("ms per call")
    sel = doc["selection"]
    ax.set_title(f"{doc['device']['device_kind']}: {sel['source']}, {sel['dtype']}, batch {sel['batch']}, "
                 f"{sel['views']} views, {sel['prompt_len']} tokens, {sel['steps']} steps", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _bridged_vision_lines(impls: list[dict]) -> list[str]:
    """The vision phase through XLA and through the engine (--vision tensorrt|builtin), side by side."""
    bridged = [r for r in impls if "vision_bridged" in r]
    if not bridged:
        return []
    rows = []
    for r in bridged:
        v = r["vision_bridged"]
        if "error" in v:
            rows.append([r["name"], _ms(r["phases"]["vision"]["median_s"]), "FAILED", v["error"][:70], ""])
            continue
        rows.append([r["name"], f"{_ms(v['xla_vision']['median_s'])} [{_ms(v['xla_vision']['p10_s'])} - "
                     f"{_ms(v['xla_vision']['p90_s'])}]", f"{_ms(v['vision']['median_s'])} [{_ms(v['vision']['p10_s'])}"
                     f" - {_ms(v['vision']['p90_s'])}]", f"{v['speedup_vs_xla']:.2f}x",
                     f"{v['tokens_rel_err_vs_xla']:.1e}"])
    kind = bridged[0]["vision_bridged"]["kind"]
    lines = ["", f"vision phase, XLA vs the {kind} engine ({', '.join(bridged[0]['vision_bridged']['engines'])}), "
                 f"ms: median [p10 - p90], each jitted alone, runs interleaved"]
    lines += _table(["impl", "vision XLA", f"vision {kind}", "speedup", "tokens rel err vs XLA"], rows)
    lines.append("  tokens rel err: the engine's tokens vs the XLA tower's on the same images; large when the engine "
                 "was built from other weights (e.g. bench's random weights without --checkpoint)")
    return lines

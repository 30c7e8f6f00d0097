"""GPU check of `pi05 bench` / `pi05 profile` (the tooling, not the model): run on the GPU machine, ~3 minutes.

  python scripts/gpu_bench_profile.py [--skip-full]

1. bench, tiny preset, reference + compact: GPU memory statistics present, phases add up, floor <= measured.
2. profile, tiny preset: device-kernel mode, share of kernel time attributed to a phase, top kernels; and the raw
   structure of the Perfetto trace (process / thread names, arg keys of device events) so the reader can be
   fixed if the GPU trace differs from what it expects. Again with --no-cuda-graphs.
3. bench, full preset, reference, 5 runs (skipped when steps 1-2 took too long or with --skip-full).
Writes JSON/PNG/traces under $OUT (or /tmp/pi05_gpu_bench); prints a compact summary.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import pathlib
import subprocess
import sys
import time

T0 = time.perf_counter()
OUT = pathlib.Path(os.environ.get("OUT", "/tmp/pi05_gpu_bench"))
PHASES = ("vision", "prefill", "denoise")
PI05 = [sys.executable, "-m", "pi05_jax.cli"]


def sh(args: list[str], timeout: int) -> tuple[int, str]:
    t = time.perf_counter()
    try:
        r = subprocess.run(PI05 + args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  TIMEOUT after {timeout}s: pi05 {' '.join(args)}")
        return 124, ""
    print(f"  pi05 {' '.join(args)}  -> rc {r.returncode} in {time.perf_counter() - t:.0f}s")
    if r.returncode != 0:
        print("  stderr tail: " + " | ".join(r.stderr.strip().splitlines()[-6:]))
    return r.returncode, r.stdout


def check_bench(path: pathlib.Path) -> None:
    doc = json.loads(path.read_text())
    rl = doc["roofline"]
    print(f"  device {doc['device']['device_kind']} ({doc['device']['platform']}); ceilings "
          f"{doc['ceilings']['bandwidth']['bytes_per_s'] / 1e12:.2f} TB/s copy, "
          f"{doc['ceilings']['matmul']['flops_per_s'] / 1e12:.0f} TFLOP/s matmul; weights "
          f"{doc['load']['weights_s']:.1f}s ({doc['load']['weights_source']}); mem after load "
          f"{doc['load']['device_bytes_in_use_after_load']}")
    print("  floor ms: " + ", ".join(f"{p} {rl['phases'][p]['floor_s'] * 1e3:.3g} ({rl['phases'][p]['bound']})"
                                      for p in PHASES) + f", total {rl['total_floor_s'] * 1e3:.3g}")
    for r in doc["implementations"]:
        if "error" in r:
            print(f"  {r['name']}: ERROR {r['error'][:300]}")
            continue
        below = all(rl["phases"][p]["floor_s"] <= r["phases"][p]["median_s"] for p in PHASES)
        print(f"  {r['name']}: total {r['total']['median_s'] * 1e3:.3g} ms [{r['total']['p10_s'] * 1e3:.3g}-"
              f"{r['total']['p90_s'] * 1e3:.3g}], phases " + "/".join(f"{r['phases'][p]['median_s'] * 1e3:.3g}"
                                                                       for p in PHASES)
              + f", sum/total {r['phase_sum_over_total']:.2f} ({'ok' if r['phases_add_up'] else 'NO'}), "
              f"compile {r['compile_s']:.1f}s, peak {r['memory']['device_peak_bytes']}, floor<=measured {below}, "
              f"speedup {r.get('speedup_vs_first')}, rel err vs first {r.get('actions_rel_err_vs_first')}")
        print(f"    accounting: {r['token_accounting']}")


def trace_structure(trace_dir: pathlib.Path) -> None:
    files = sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    if not files:
        print("  no perfetto trace found")
        return
    with gzip.open(files[-1], "rt") as f:
        events = json.load(f)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    per_thread = collections.Counter((procs.get(e["pid"], "?"), threads.get((e["pid"], e.get("tid")), "?"))
                                     for e in events if e.get("ph") == "X")
    print("  events per (process, thread):")
    for (p, t), n in per_thread.most_common(14):
        print(f"    {n:6d}  {p} | {t}")
    dev = [e for e in events if e.get("ph") == "X" and procs.get(e["pid"], "").startswith("/device:")]
    keys = collections.Counter(k for e in dev for k in e.get("args", {}))
    print(f"  device events {len(dev)}; arg keys: {dict(keys.most_common(20))}")
    for e in dev[:3]:
        print(f"    sample: {json.dumps(e)[:400]}")


def check_profile(path: pathlib.Path) -> None:
    doc = json.loads(path.read_text())
    for s in doc["implementations"]:
        if "error" in s:
            print(f"  {s['name']}: ERROR {s['error'][:300]}")
            continue
        print(f"  {s['name']}: mode {s['mode']}, {s['events']} events, {s['total_us_per_call'] / 1e3:.3g} ms "
              f"kernel time/call vs {s['wall_s_per_call'] * 1e3:.3g} ms wall, attributed "
              f"{s['attributed_share'] * 100:.0f}%, phases " +
              ", ".join(f"{p} {v['share'] * 100:.0f}%" for p, v in s["phases"].items()))
        for k in s["top"][:8]:
            print(f"    {k['share'] * 100:5.1f}%  {k['phase']:>12}  {k['name'][:90]}")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    print("1. bench tiny (reference, compact)")
    sh(["bench", "--preset", "tiny", "--kernels", "reference,compact", "--runs", "10", "--quiet",
        "--json", str(OUT / "tiny.json"), "--plot", str(OUT / "tiny.png")], timeout=150)
    if (OUT / "tiny.json").exists():
        check_bench(OUT / "tiny.json")
    for i, (label, extra) in enumerate((("", []), (" --no-cuda-graphs", ["--no-cuda-graphs"]))):
        print(f"2{'ab'[i]}. profile tiny{label}")
        tdir = OUT / f"trace{i}"
        kernels = "reference" if extra else "reference,compact"
        sh(["profile", "--preset", "tiny", "--kernels", kernels, "--runs", "3", "--top", "8", "--quiet",
            "--trace-dir", str(tdir), "--json", str(OUT / f"profile{i}.json"), *extra], timeout=120)
        if (OUT / f"profile{i}.json").exists():
            check_profile(OUT / f"profile{i}.json")
        if i == 0:
            trace_structure(tdir / "reference")
    elapsed = time.perf_counter() - T0
    if "--skip-full" in sys.argv or elapsed > 80:
        print(f"3. full-size bench skipped ({elapsed:.0f}s elapsed)")
    else:
        print("3. bench full (reference), 2 views + 60 tokens, 10 steps")
        sh(["bench", "--preset", "full", "--kernels", "reference", "--runs", "5", "--quiet",
            "--json", str(OUT / "full.json"), "--plot", str(OUT / "full.png")], timeout=int(max(60, 170 - elapsed)))
        if (OUT / "full.json").exists():
            check_bench(OUT / "full.json")
    print(f"done in {time.perf_counter() - T0:.0f}s; files in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

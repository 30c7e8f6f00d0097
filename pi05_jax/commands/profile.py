"""`pi05 profile`: an XLA profiler trace of a few warm calls, and the top kernels by device time with their phase.

Each implementation listed gets its own trace under --trace-dir/<name>/ (loadable in TensorBoard/xprof from the
xplane file and in Perfetto, ui.perfetto.dev, from perfetto_trace.json.gz). The summary reads the Perfetto JSON:
kernels ranked by device time, their share of the total, and the phase (vision, prefill, denoise) each belongs to.
"""

from __future__ import annotations

import os
import time

from pi05_jax.commands.common import Progress, UsageError, formatter

EPILOG = """\
Phases are attributed through named scopes (phase_vision, phase_prefill, phase_denoise) around each phase; the
compiled HLO's metadata maps every op, and so every kernel, to one. On the CPU there are no device kernels: the
summary lists the XLA ops the CPU runtime executed instead, and says so.
On a GPU, XLA may run parts of the program as CUDA graphs (command buffers); --no-cuda-graphs turns them off so
every kernel carries its op name (timings then include per-kernel launches).

examples:
  pi05 profile --preset tiny --trace-dir /tmp/trace --runs 2
  pi05 profile --preset full --kernels reference,pallas --trace-dir traces/ --top 30 --json top.json
"""


def register(sub) -> None:
    p = sub.add_parser("profile", help="profiler trace of warm calls; top kernels by device time, per phase",
                       description=__doc__, epilog=EPILOG, formatter_class=formatter())
    from pi05_jax.bench.selection import add_selection_args

    add_selection_args(p, runs_default=3, runs_help="warm calls inside the trace (default: %(default)s)")
    p.add_argument("--trace-dir", required=True, metavar="DIR", help="where the traces go (one folder per "
                   "implementation)")
    p.add_argument("--top", type=int, default=20, metavar="N", help="kernels to list (default: %(default)s)")
    p.add_argument("--json", metavar="OUT.json", default=None, help="write the summaries as JSON")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="disable XLA's GPU command buffers so each kernel is traced with its op name")
    p.set_defaults(run=run)


def profile_one(p, built, *, trace_dir, runs: int, top: int, say) -> dict:
    import jax

    from pi05_jax.bench import trace

    args = (p.params, built.obs, built.noise)
    compiled = jax.jit(p.sample).lower(*args).compile()
    hlo_text = compiled.as_text()
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    out_dir = os.path.join(trace_dir, p.name)
    say(f"[{p.name}] tracing {runs} warm calls into {out_dir}")
    walls = []
    jax.profiler.start_trace(out_dir, create_perfetto_trace=True)
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            walls.append(time.perf_counter() - t0)
    finally:
        jax.profiler.stop_trace()
    path = trace.find_perfetto_trace(out_dir)
    summary = trace.summarize(path, hlo=trace.parse_hlo(hlo_text), modules={trace.module_name(hlo_text)},
                              calls=runs, top=top)
    summary["name"] = p.name
    summary["trace_dir"] = out_dir
    summary["wall_s_per_call"] = sum(walls) / len(walls)
    return summary


def launches_line(summary: dict, steps: int | None) -> str:
    """Kernels launched per call by phase, and the denoise's per Euler step (issue 6 asks for it before/after)."""
    what = "kernels launched" if summary["mode"] == "device" else "XLA ops executed"
    parts = []
    for ph, v in sorted(summary["phases"].items(), key=lambda kv: -kv[1]["time_us"]):
        n = v.get("launches_per_call", 0.0)
        per_step = f" ({n / steps:.0f} per Euler step)" if ph == "denoise" and steps else ""
        parts.append(f"{ph} {n:.0f}{per_step}")
    return f"  {what} per call: " + ", ".join(parts)


def text(summary: dict, steps: int | None = None) -> str:
    lines = [f"{summary['name']}: {summary['note']}",
             f"  {summary['calls']} calls traced, {summary['wall_s_per_call'] * 1e3:.3g} ms wall per call, "
             f"{summary['total_us_per_call'] / 1e3:.3g} ms of "
             f"{'kernel' if summary['mode'] == 'device' else 'op'} time per call, "
             f"{summary['distinct_kernels']} distinct; {summary['attributed_share'] * 100:.0f}% attributed to a phase",
             "  by phase: " + ", ".join(f"{ph} {v['share'] * 100:.1f}%" for ph, v in
                                        sorted(summary["phases"].items(), key=lambda kv: -kv[1]["time_us"])),
             launches_line(summary, steps)]
    timeline = summary.get("timeline")
    if timeline:
        lines.append(f"  stream timeline per call: busy {timeline['busy_us'] / 1e3:.3g} ms (the kernels' spans), "
                     f"{timeline['overlap_us'] / 1e3:.3g} ms overlapped by a next kernel "
                     f"({timeline['early_launches']:.0f} launched before the one before them ended: PDL), "
                     f"{timeline['gap_us'] / 1e3:.3g} ms idle between kernels")
    rows = [(f"{k['share'] * 100:5.1f}%", f"{k['time_us_per_call'] / 1e3:.3g}", str(k["count"]), k["phase"],
             k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "...") for k in summary["top"]]
    header = ("share", "ms/call", "count", "phase", "kernel" if summary["mode"] == "device" else "XLA op")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for r in [header, *rows]:
        lines.append("  " + "  ".join(c.rjust(w) if i < 3 else c.ljust(w) for i, (c, w) in
                                      enumerate(zip(r, widths, strict=True))).rstrip())
    lines.append(f"  trace: {summary['trace']}")
    in_graphs = sum(k["time_us_per_call"] for k in summary["top"]
                    if str(k.get("hlo_op", "")).startswith("command_buffer"))
    if summary["mode"] == "device" and summary["attributed_share"] < 0.5 and in_graphs > 0:
        lines.append("  note: most kernels ran inside CUDA graphs (XLA command buffers), which hide the HLO op each "
                     "kernel came from; rerun with --no-cuda-graphs to attribute them to phases")
    return "\n".join(lines)


def run(args) -> int:
    if args.top < 1:
        raise UsageError(f"--top must be >= 1, got {args.top}")
    if args.no_cuda_graphs:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    from pi05_jax.bench import report
    from pi05_jax.bench.implementations import phased, resolve
    from pi05_jax.bench.selection import Selection, build

    say = Progress(args.quiet)
    sel = Selection.from_args(args)
    built = build(sel, say)
    summaries, failed = [], []
    for impl in resolve(",".join(sel.kernels)):
        try:
            s = profile_one(phased(impl, built.params, built.obs, sel.steps), built, trace_dir=args.trace_dir,
                            runs=sel.runs, top=args.top, say=say)
        except Exception as e:  # report and go on with the others
            say(f"[{impl.name}] FAILED: {type(e).__name__}: {e}")
            failed.append(impl.name)
            summaries.append({"name": impl.name, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            continue
        summaries.append(s)
        print(text(s, steps=sel.steps))
    doc = {"schema": "pi05-profile/1", "selection": sel.as_dict(), "implementations": summaries}
    if args.json:
        print(f"wrote {report.write_json(doc, args.json)}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0

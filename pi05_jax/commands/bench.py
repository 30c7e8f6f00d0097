"""`pi05 bench`: latency of each implementation, split by phase, next to the floor this card allows.

In one run: the card's ceilings (copy bandwidth, a large matmul in the dtype), then for each implementation
listed: compile time, the one-jit sample's latency (median, p10, p90 of warm runs) and rate, each phase
(vision, prefill, denoise) jitted and timed alone, peak device memory, the speedup over the first implementation;
the roofline (FLOPs and bytes per phase counted by hand, the floor, how far each phase is from it) and a
projection of the floor to other cards from their published specs.
"""

from __future__ import annotations

from pi05_jax.commands.common import Progress, formatter

EPILOG = """\
Without --checkpoint the weights are random (real architecture, never zeros; nothing is written to disk) and
the inputs synthetic: speed does not depend on weight values. Timings are warm runs with block_until_ready.
The floor counts valid tokens only (valid views x 256 + prompt tokens) and is max(FLOPs / matmul rate,
bytes / copy bandwidth) per phase, with both ceilings measured at the start of the run (the copy: a plain
device-to-device copy of a multi-GiB buffer, read + write bytes); the card's datasheet figures, where its
device_kind is known, are shown beside them with the floor they would give.

examples:
  pi05 bench --preset tiny --runs 5                               quick check on the CPU
  pi05 bench --preset full --views 2 --prompt-len 60 --steps 10 --kernels reference --json ref.json --plot ref.png
  pi05 bench --preset full --kernels reference,pallas             speedup of pallas over reference, same run
  pi05 bench --checkpoint ckpt/pi05_libero --startup               adds cold/warm start-up in fresh processes
  pi05 bench --checkpoint ckpt/ --batch 1 --views 2 --kernels reference,compact \\
      --vision tensorrt --vision-engine siglip_v3.plan,siglip_v2.plan
                          also times each implementation's vision phase through the engine, next to XLA's
                          (the reference layout encodes batch x 3 view slots, compacting paths batch x --views)
Log results in docs/PERF.md (card, commit, date, the exact command, the figures).
"""


def register(sub) -> None:
    p = sub.add_parser("bench", help="per-phase latency, roofline floor, projection to other hardware",
                       description=__doc__, epilog=EPILOG, formatter_class=formatter())
    from bridges.vision_bridge import add_vision_args
    from pi05_jax.bench.selection import add_selection_args

    add_selection_args(p, runs_default=20, runs_help="timed warm runs per implementation (default: %(default)s)")
    add_vision_args(p)
    p.add_argument("--json", metavar="OUT.json", default=None, help="write every figure as JSON")
    p.add_argument("--plot", metavar="OUT.png", default=None, help="write the phase-breakdown chart (PNG)")
    p.add_argument("--startup", action="store_true",
                   help="also measure start-up (weights, compile, first action, memory) in two fresh processes: "
                        "cold, then with JAX's persistent compilation cache warm")
    p.set_defaults(run=run)


def run(args) -> int:
    from bridges.vision_bridge import open_engines
    from pi05_jax.bench import report
    from pi05_jax.bench.selection import Selection
    from pi05_jax.bench.suite import run_bench

    say = Progress(args.quiet)
    sel = Selection.from_args(args)
    engines = open_engines(args.vision, args.vision_engine, out_width=sel.config.llm.width, model_dtype=sel.dtype)
    extra = (["--startup"] if args.startup else []) + (["--json", args.json] if args.json else []) + (
        ["--plot", args.plot] if args.plot else []) + (
        ["--vision", args.vision, "--vision-engine", args.vision_engine] if engines is not None else [])
    doc = run_bench(sel, say=say, startup=args.startup, extra_args=extra, vision_engines=engines)
    print(report.text(doc))
    if args.json:
        print(f"wrote {report.write_json(doc, args.json)}")
    if args.plot:
        print(f"wrote {report.write_plot(doc, args.plot)}")
    failed = [r["name"] for r in doc["implementations"] if "error" in r]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0

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
  pi05 bench --checkpoint ckpt/pi05_libero --compare-checkpoint ckpt/pi05_libero_fp8 --kernels pallas
                          bf16 against its FP8 copy (`pi05 quantize`) in one run: pallas, then pallas@pi05_libero_fp8,
                          the speedup and the actions' relative error / cosine against the first row
  pi05 bench --checkpoint ckpt/ --batch 1 --views 2 --kernels reference,compact \\
      --vision tensorrt --vision-engine siglip_v3.plan,siglip_v2.plan
                          also times each implementation's vision phase through the engine, next to XLA's
                          (the reference layout encodes batch x 3 view slots, compacting paths batch x --views)
  pi05 bench --preset full --kernels pallas --batch 8 --devices 8
                          data parallel: each implementation at --batch rows on one device and at --batch x 8 rows
                          sharded over 8 local devices (pi05_jax.devices), interleaved: latency of each, throughput
                          against 8 x the one-device throughput, latency against one device's
Log results in docs/PERF.md (card, commit, date, the exact command, the figures).
"""

# The target of the multi-device serving issue: N devices give N x one device's throughput and one device's latency
# at the same per-device batch, each within this share.
DEVICES_TARGET = 0.10


def register(sub) -> None:
    p = sub.add_parser("bench", help="per-phase latency, roofline floor, projection to other hardware",
                       description=__doc__, epilog=EPILOG, formatter_class=formatter())
    from bridges.vision_bridge import add_vision_args
    from pi05_jax.bench.selection import add_selection_args

    add_selection_args(p, runs_default=20, runs_help="timed warm runs per implementation (default: %(default)s)")
    add_vision_args(p)
    p.add_argument("--json", metavar="OUT.json", default=None, help="write every figure as JSON")
    p.add_argument("--plot", metavar="OUT.png", default=None, help="write the phase-breakdown chart (PNG)")
    p.add_argument("--devices", default="1", metavar="all|N",
                   help="data parallel instead of the phase breakdown: each implementation timed at --batch rows "
                        "on one device and at --batch x N rows sharded over N local devices ('all': every one), "
                        "with throughput and latency compared (default: %(default)s, the one-device bench)")
    p.add_argument("--compare-checkpoint", metavar="DIR2", default=None,
                   help="a second checkpoint of the same architecture (e.g. --checkpoint's `pi05 quantize` output): "
                        "each implementation is also timed on its weights, on the same inputs, as <impl>@<DIR2 name> "
                        "(the roofline floor stays --checkpoint's)")
    p.add_argument("--startup", action="store_true",
                   help="also measure start-up (weights, compile, first action, memory) in two fresh processes: "
                        "cold, then with JAX's persistent compilation cache warm")
    p.set_defaults(run=run)


def run(args) -> int:
    from bridges.vision_bridge import open_engines
    from pi05_jax.bench import report
    from pi05_jax.bench.selection import Selection
    from pi05_jax.bench.suite import run_bench
    from pi05_jax.commands.common import UsageError

    say = Progress(args.quiet)
    sel = Selection.from_args(args)
    devices = _devices(args)
    if devices > 1:
        return run_devices(args, sel, devices, say)
    if args.compare_checkpoint and not sel.checkpoint:
        raise UsageError("--compare-checkpoint needs --checkpoint: the first set of weights to compare against")
    engines = open_engines(args.vision, args.vision_engine, out_width=sel.config.llm.width, model_dtype=sel.dtype)
    extra = (["--compare-checkpoint", args.compare_checkpoint] if args.compare_checkpoint else []) + (
        ["--startup"] if args.startup else []) + (["--json", args.json] if args.json else []) + (
        ["--plot", args.plot] if args.plot else []) + (
        ["--vision", args.vision, "--vision-engine", args.vision_engine] if engines is not None else [])
    doc = run_bench(sel, say=say, startup=args.startup, extra_args=extra, vision_engines=engines,
                    compare_checkpoint=args.compare_checkpoint)
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


def _devices(args) -> int:
    from pi05_jax.commands.common import UsageError
    from pi05_jax.devices import DevicesError, parse_devices

    try:
        devices = parse_devices(args.devices)
    except DevicesError as e:
        raise UsageError(f"--devices: {e}") from e
    if devices > 1:
        extra = [flag for flag, on in (("--startup", args.startup), ("--plot", args.plot),
                                       ("--vision", args.vision != "xla"),
                                       ("--compare-checkpoint", args.compare_checkpoint)) if on]
        if extra:
            raise UsageError(f"--devices {args.devices} times the data-parallel sample only; drop "
                             f"{', '.join(extra)}")
    return devices


def run_devices(args, sel, devices: int, say) -> int:
    """Each implementation on one device at sel.batch rows and sharded over `devices` at sel.batch x devices rows,
    the two calls interleaved (bench's `timed_rounds`), each with its host-side plan as a server runs it. The sharded
    call's first sel.batch rows are the one-device call's rows, so their actions are compared too."""
    import functools

    import jax
    import numpy as np

    from pi05_jax import devices as device_mesh
    from pi05_jax import sampler
    from pi05_jax.bench import hardware, report
    from pi05_jax.bench.implementations import resolve
    from pi05_jax.bench.runner import stats, timed_rounds
    from pi05_jax.bench.selection import build
    from pi05_jax.bench.suite import canonical_command, commit
    from pi05_jax.synthetic import synthetic_noise, synthetic_observation

    mesh = device_mesh.DeviceMesh.local(devices)
    b, n = sel.batch, devices
    say(f"data parallel over {mesh.describe()}: {sel.describe()} per device, batch {b * n} sharded")
    params = build(sel, say).params
    host_obs = synthetic_observation(sel.config, batch=b * n, views=sel.views, prompt_len=sel.prompt_len,
                                     seed=sel.seed)
    host_noise = synthetic_noise(sel.config, batch=b * n, seed=sel.seed)
    one_obs = jax.device_put(jax.tree.map(lambda a: np.asarray(a)[:b], host_obs), mesh.devices[0])
    one_noise = jax.device_put(host_noise[:b], mesh.devices[0])
    all_obs = jax.device_put(host_obs, mesh.batch_sharding)
    all_noise = jax.device_put(host_noise, mesh.batch_sharding)
    results = []
    for impl in resolve(",".join(sel.kernels)):
        try:
            one = params if impl.prepare is None else impl.prepare(params, sel.steps)
            rep = mesh.replicate(one)
            calls = {"one_device": functools.partial(sampler.sample_prepared, impl, one, one_obs, one_noise,
                                                     sel.steps),
                     "devices": functools.partial(device_mesh.sample_sharded, mesh, impl, rep, all_obs, all_noise,
                                                  sel.steps)}
            say(f"[{impl.name}] compiling batch {b} on one device and batch {b * n} over {n} devices")
            first = {key: np.asarray(jax.block_until_ready(call())) for key, call in calls.items()}
            say(f"[{impl.name}] timing {sel.runs} interleaved warm runs of each")
            times = timed_rounds(calls, sel.runs)
        except Exception as e:  # one broken implementation must not hide the others' figures
            say(f"[{impl.name}] FAILED: {type(e).__name__}: {e}")
            results.append({"name": impl.name, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            continue
        one_s, all_s = stats(times["one_device"]), stats(times["devices"])
        ref = first["one_device"].astype(np.float64)
        err = np.linalg.norm(first["devices"][:b].astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30)
        throughput_one, throughput_all = b / one_s["median_s"], b * n / all_s["median_s"]
        results.append({
            "name": impl.name, "one_device": {**one_s, "batch": b, "rows_per_s": throughput_one},
            "devices": {**all_s, "batch": b * n, "rows_per_s": throughput_all},
            "throughput_vs_n_x_one": throughput_all / (n * throughput_one),
            "latency_vs_one": all_s["median_s"] / one_s["median_s"],
            "actions_rel_err_vs_one_device": float(err),
            "actions_finite": bool(np.all(np.isfinite(first["devices"]))),
        })
    doc = {"schema": "pi05-bench-devices/1", **commit(), "device": hardware.device_info(),
           "command": canonical_command(sel, ["--devices", str(n)] + (["--json", args.json] if args.json else [])),
           "devices": n, "mesh": mesh.describe(), "selection": sel.as_dict(), "per_device_batch": b,
           "target": {"throughput_vs_n_x_one_min": 1 - DEVICES_TARGET, "latency_vs_one_max": 1 + DEVICES_TARGET},
           "implementations": results}
    print(devices_text(doc))
    if args.json:
        print(f"wrote {report.write_json(doc, args.json)}")
    failed = [r["name"] for r in results if "error" in r]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


def devices_text(doc: dict) -> str:
    n, b = doc["devices"], doc["per_device_batch"]
    lines = [f"pi05 bench, data parallel: {doc['mesh']}, per-device batch {b} ({doc['command']})",
             f"{'implementation':<16}{'1 device ms':>26}{f'{n} devices ms':>26}{'rows/s 1 -> N':>20}"
             f"{'thr / (N x 1)':>15}{'latency / 1':>13}{'rel err':>10}"]

    def ms(t):
        return f"{t['median_s'] * 1e3:.2f} [{t['p10_s'] * 1e3:.2f}-{t['p90_s'] * 1e3:.2f}]"

    for r in doc["implementations"]:
        if "error" in r:
            lines.append(f"{r['name']:<16}FAILED: {r['error']}")
            continue
        rows = f"{r['one_device']['rows_per_s']:.1f} -> {r['devices']['rows_per_s']:.1f}"
        lines.append(f"{r['name']:<16}{ms(r['one_device']):>26}{ms(r['devices']):>26}{rows:>20}"
                     f"{r['throughput_vs_n_x_one']:>15.3f}{r['latency_vs_one']:>13.3f}"
                     f"{r['actions_rel_err_vs_one_device']:>10.1e}")
    t = doc["target"]
    lines.append(f"target: throughput / (N x 1) >= {t['throughput_vs_n_x_one_min']:.2f}, latency / 1 <= "
                 f"{t['latency_vs_one_max']:.2f} (batch {b} per device on both sides)")
    return "\n".join(lines)

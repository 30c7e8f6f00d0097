#!/usr/bin/env python3
"""The GPU measurement harness: one stage per device call, each sized to finish inside one 600 s call.

Run on the device machine from the repository root (its python3 holds jax with CUDA):

    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
    python3 scripts/gpu_measure.py time --preset full --kernels reference,pallas [--rounds 5 --runs 20] [--phases]
    python3 scripts/gpu_measure.py soak --kernels pallas [--calls 1000 --views 1,2,3 --prompt-lens 20,60 --quantize fp8]
    python3 scripts/gpu_measure.py gpu-tests [PYTEST ARGS...]          (default: every gpu-marked test in tests/)
    python3 scripts/gpu_measure.py ceilings
    python3 scripts/gpu_measure.py param-bytes --kernels compact,pallas   (shapes only: runs anywhere)

Stages:
  time        the implementations named by --kernels timed interleaved: every round is a `pi05 bench` timing
              (warm-up, then --runs calls of each implementation's one-jit sample in turn, block_until_ready),
              made by bench's own code (pi05_jax.bench.runner: compile_calls, timed_rounds, stats), so the median
              is the figure `pi05 bench` reports as "total" for the same arguments. --rounds repeats it; reported:
              median [p10 - p90] over every timed call, the spread of the round medians, the speedup over the
              first implementation, and its actions' relative error against the first. --phases adds each phase jitted
              alone to the interleaving (bench's phase figures).
  soak        --calls consecutive calls through the deployed path (runtime.Model holding the implementation's
              packed weights, the stacked originals freed as Model.load does), inputs varied call to call (each
              combination of --views and --prompt-lens, 16 noise draws); counts NaN/Inf, samples device memory every
              --every calls; fails on any non-finite action or on memory growth after the first pass over the inputs.
              --quantize fp8|fp4 soaks the weights `pi05 quantize` makes.
  gpu-tests   pytest -m gpu: the kernels compiled for the card against their references, the fast paths' parity
              with reference at full width (tests/test_parity_on_gpu.py), the server's 1000-call soak.
  ceilings    the copy bandwidth and matmul rate bench measures at its start, beside the card's datasheet figures.
  param-bytes the weights a deployment holds, from shapes only (jax.eval_shape): as loaded, and packed for each
              implementation (what runtime.Model.load keeps).

Kernel micro-benchmarks live in the kernel modules: `python3 -m pallas_kernels.<module>` (their main()).
Where the time goes, kernel by kernel: `pi05 profile --preset full --kernels pallas --no-cuda-graphs --trace-dir T`.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

MEMORY_GROWTH_SLACK = 16 << 20  # bytes in use may move this much after the first pass over the soak's inputs
NOISE_DRAWS = 16
GPU_TESTS_LIMIT_S = 560
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _table(header: list[str], rows: list[list[str]]) -> str:
    from pi05_jax.bench.report import _table as table

    return "\n".join(table(header, rows))


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.3f}"


# --- time: interleaved implementations, bench's timing ------------------------------------------------------------


def stage_time(args) -> int:
    import jax

    from pi05_jax.bench import hardware, report, runner
    from pi05_jax.bench.implementations import phased, resolve
    from pi05_jax.bench.roofline import PHASES
    from pi05_jax.bench.selection import Selection, build
    from pi05_jax.bench.suite import commit

    sel = Selection.from_args(args)
    say(f"jax {jax.__version__} on {jax.devices()[0].device_kind}: {sel.describe()}")
    built = build(sel, say)
    compiled: dict[str, runner.Compiled] = {}
    for impl in resolve(",".join(sel.kernels)):
        p = phased(impl, built.params, built.obs, sel.steps)
        compiled[impl.name] = runner.compile_calls(p, built.obs, built.noise, say=say, phases=args.phases)
    calls = {(name, key): call for name, c in compiled.items() for key, call in c.calls.items()}
    times: dict[tuple[str, str], list[float]] = {k: [] for k in calls}
    round_medians: dict[str, list[float]] = {name: [] for name in compiled}
    for r in range(args.rounds):
        say(f"round {r + 1}/{args.rounds}: {runner.WARMUP_RUNS} warm-up + {sel.runs} timed calls of each, in turn")
        got = runner.timed_rounds(calls, sel.runs)
        for key, seconds in got.items():
            times[key].extend(seconds)
        for name in compiled:
            round_medians[name].append(float(np.median(got[(name, "total")])))

    names = list(compiled)
    first = names[0]
    total = {name: runner.stats(times[(name, "total")]) for name in names}
    rows, results = [], []
    for name in names:
        c, t = compiled[name], total[name]
        rm = round_medians[name]
        actions = np.asarray(c.actions, np.float32)
        res = {"name": name, "compile_s": c.compile_s, "first_call_s": c.first_call_s, "total": t,
               "hz": 1.0 / t["median_s"], "round_medians_s": rm,
               "speedup_vs_first": total[first]["median_s"] / t["median_s"],
               "actions_rel_err_vs_first": rel_err(actions, compiled[first].actions),
               "actions_finite": bool(np.all(np.isfinite(actions)))}
        if (name, "prepare") in times:
            res["host_prepare"] = runner.stats(times[(name, "prepare")])
        if args.phases:
            res["phases"] = {ph: runner.stats(times[(name, ph)]) for ph in PHASES}
            res["phase_sum_over_total"] = sum(res["phases"][ph]["median_s"] for ph in PHASES) / t["median_s"]
        results.append(res)
        rows.append([name, f"{c.compile_s:.1f} s", f"{_ms(t['median_s'])} [{_ms(t['p10_s'])} - {_ms(t['p90_s'])}]",
                     f"{res['hz']:.1f}", f"{_ms(min(rm))} - {_ms(max(rm))}", f"{res['speedup_vs_first']:.3f}x",
                     f"{res['actions_rel_err_vs_first']:.1e}",
                     _ms(res["host_prepare"]["median_s"]) if "host_prepare" in res else "-",
                     *((*(_ms(res["phases"][ph]["median_s"]) for ph in PHASES),
                        f"{res['phase_sum_over_total'] * 100:.0f}%") if args.phases else ())])
    n = args.rounds * sel.runs
    print(f"{sel.describe()}; {jax.devices()[0].device_kind}; {args.rounds} rounds x {sel.runs} calls each, "
          f"interleaved ({n} timed calls per implementation); ms")
    print(_table(["impl", "compile", "total median [p10 - p90]", "Hz", "round medians", "speedup vs first",
                  "rel err vs first", "host prep", *((*PHASES, "sum/total") if args.phases else ())], rows))
    if args.json:
        doc = {"schema": "pi05-gpu-measure-time/1", **commit(), "argv": sys.argv, "device": hardware.device_info(),
               "selection": sel.as_dict(), "rounds": args.rounds, "implementations": results}
        print(f"wrote {report.write_json(doc, args.json)}")
    return 0 if all(r["actions_finite"] for r in results) else 1


# --- soak: the deployed path, inputs varied ------------------------------------------------------------------------


def stage_soak(args) -> int:
    import jax

    from pi05_jax import implementations, runtime
    from pi05_jax.bench import hardware
    from pi05_jax.bench.selection import random_weights
    from pi05_jax.config import preset
    from pi05_jax.synthetic import synthetic_noise, synthetic_observation

    platform = jax.default_backend()
    preset_name = args.preset or ("full" if platform == "gpu" else "tiny")
    config = preset(preset_name)
    impl = implementations.get(args.kernels or implementations.default_kernels(platform))
    say(f"jax {jax.__version__} on {jax.devices()[0].device_kind}: {preset_name} {args.dtype}, {impl.name}")
    params = random_weights(config, seed=0, dtype=args.dtype)
    if args.quantize:  # what `pi05 quantize --format F` stores, quantized in memory
        from checkpoints.quantize import Plan, quantize_params

        params = quantize_params(params, Plan(fmt=args.quantize))
    if impl.pack is not None:  # as runtime.Model.load does: the packed layout only, the stacked originals freed
        params = impl.pack(params, consume=True)
    model = runtime.Model(config=config, params=jax.block_until_ready(params), implementation=impl)
    del params
    pool = [(v, n, synthetic_observation(config, views=v, prompt_len=n, seed=i))
            for i, (v, n) in enumerate(itertools.product(_ints(args.views), _ints(args.prompt_lens)))]
    noises = [synthetic_noise(config, seed=100 + i) for i in range(NOISE_DRAWS)]
    say(f"{args.calls} calls over {len(pool)} inputs (views x prompt lengths) and {NOISE_DRAWS} noise draws")
    bad, samples, walls = 0, [], []
    warm_pass = max(len(pool), args.every)  # every input's executable is compiled by then
    for i in range(args.calls):
        views, prompt_len, obs = pool[i % len(pool)]
        t0 = time.perf_counter()
        actions = np.asarray(model.sample(obs, noise=noises[(i * 7 + i // len(pool)) % NOISE_DRAWS],
                                          num_steps=args.steps))
        walls.append(time.perf_counter() - t0)
        finite = bool(np.all(np.isfinite(actions)))
        if not finite:
            bad += 1
            say(f"call {i + 1}: NaN/Inf in the actions ({views} views, {prompt_len} tokens)")
        if i == 0 or (i + 1) % args.every == 0 or i + 1 == args.calls:
            in_use, peak, reason = hardware.bytes_in_use()
            samples.append({"call": i + 1, "bytes_in_use": in_use, "peak_bytes_in_use": peak})
            say(f"call {i + 1}: " + (f"device memory in use {in_use / 2**30:.3f} GiB, allocator peak "
                                     f"{peak / 2**30:.3f} GiB" if in_use is not None else reason))
    warm = walls[warm_pass:] or walls
    which = f"after the first {warm_pass}" if len(walls) > warm_pass else "over all calls (compiles included)"
    weights = args.dtype + (f", {args.quantize} weights" if args.quantize else "")
    print(f"{args.calls} consecutive {impl.name} calls ({preset_name}, {weights}, {args.steps} steps, views "
          f"{args.views}, prompt lengths {args.prompt_lens}, {NOISE_DRAWS} noise draws): {bad} with NaN/Inf; "
          f"{np.median(warm) * 1e3:.2f} ms median per call {which} (host copy of the actions included)")
    measured = [s for s in samples if s["bytes_in_use"] is not None]
    if not measured:
        print("device memory: not reported by this backend")
        return 1 if bad else 0
    for s in measured:
        print(f"  after call {s['call']:5d}: in use {s['bytes_in_use'] / 2**30:.3f} GiB, peak "
              f"{s['peak_bytes_in_use'] / 2**30:.3f} GiB")
    base = next((s for s in measured if s["call"] >= warm_pass), measured[-1])
    growth = measured[-1]["bytes_in_use"] - base["bytes_in_use"]
    grew = growth > MEMORY_GROWTH_SLACK
    print(f"memory after call {base['call']} -> after call {measured[-1]['call']}: {growth / 2**20:+.1f} MiB "
          f"({'GROWS' if grew else 'flat'}, slack {MEMORY_GROWTH_SLACK >> 20} MiB)")
    return 1 if bad or grew else 0


# --- gpu-tests -----------------------------------------------------------------------------------------------------


def stage_gpu_tests(args, rest: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *(rest or ["tests/"])]
    say(" ".join(cmd))
    try:
        return subprocess.run(cmd, timeout=args.limit_s).returncode
    except subprocess.TimeoutExpired:
        print(f"gpu-tests: stopped after {args.limit_s} s")
        return 124


# --- ceilings, param-bytes -----------------------------------------------------------------------------------------


def stage_ceilings(args) -> int:
    import jax

    from pi05_jax.bench import hardware
    from pi05_jax.bench.report import _rates_lines
    from pi05_jax.runtime import DTYPES

    kind = jax.devices()[0].device_kind
    c = hardware.measure_ceilings(DTYPES[args.dtype])
    print(f"{kind}: {c['bandwidth']['method']}; {c['matmul']['method']}")
    rl = {"rates": {"bytes_per_s": c["bandwidth"]["bytes_per_s"], "matmul_flops_per_s": c["matmul"]["flops_per_s"]},
          "datasheet": hardware.datasheet_rates(kind, DTYPES[args.dtype])}
    print("\n".join(_rates_lines(rl, args.dtype)))
    return 0


def stage_param_bytes(args) -> int:
    import jax
    import jax.numpy as jnp

    from checkpoints.layout import param_shapes, unflatten
    from pi05_jax import implementations
    from pi05_jax.config import preset

    dtype = jnp.dtype(args.dtype)
    config = preset(args.preset)
    params = unflatten({p: jax.ShapeDtypeStruct(s, dtype) for p, s in param_shapes(config).items()})

    def nbytes(tree) -> int:
        return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))

    loaded = nbytes(params)
    rows = [["as loaded (openpi's stacked layout)", f"{loaded / 2**30:.3f}", ""]]
    for name in args.kernels.split(","):
        impl = implementations.get(name.strip())
        if impl.pack is None:
            rows.append([f"{impl.name}: the loaded weights as they are", f"{loaded / 2**30:.3f}", "+0.000"])
            continue
        packed = nbytes(jax.eval_shape(lambda p, impl=impl: impl.pack(p), params))
        rows.append([f"{impl.name}: packed (what runtime.Model.load keeps)", f"{packed / 2**30:.3f}",
                     f"{(packed - loaded) / 2**30:+.3f}"])
    print(f"{args.preset}, {args.dtype}, from shapes (nothing allocated)")
    print(_table(["weights", "GiB", "vs as loaded"], rows))
    return 0


# --- command line --------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    from pi05_jax.bench.selection import DTYPE_NAMES, add_selection_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    t = sub.add_parser("time", help="implementations interleaved, timed as pi05 bench times them")
    add_selection_args(t, runs_default=20, runs_help="timed calls of each implementation per round "
                                                     "(default: %(default)s, bench's default)")
    t.add_argument("--rounds", type=int, default=5, help="bench timings in a row (default: %(default)s)")
    t.add_argument("--phases", action="store_true", help="also each phase jitted alone, interleaved")
    t.add_argument("--json", metavar="OUT.json", help="write every figure as JSON")

    s = sub.add_parser("soak", help="consecutive calls through the deployed path, inputs varied")
    s.add_argument("--preset", default=None, help="default: full on a GPU, tiny elsewhere")
    s.add_argument("--kernels", default=None, help="one implementation (default: the platform's default)")
    s.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    s.add_argument("--calls", type=int, default=1000)
    s.add_argument("--every", type=int, default=100, help="sample device memory every N calls (default: 100)")
    s.add_argument("--views", default="1,2,3", help="valid views of the inputs, comma separated")
    s.add_argument("--prompt-lens", default="20,60", help="prompt lengths of the inputs, comma separated "
                   "(with 1..3 views, 20 and 60 share each view count's 64-token bucket: one executable each)")
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--quantize", choices=("fp8", "fp4"), default=None,
                   help="soak the weights `pi05 quantize --format F` makes (quantized in memory)")

    g = sub.add_parser("gpu-tests", help="pytest -m gpu; extra arguments go to pytest (default: tests/)")
    g.add_argument("--limit-s", type=int, default=GPU_TESTS_LIMIT_S, help="stop pytest after this (default: "
                   "%(default)s)")

    c = sub.add_parser("ceilings", help="copy bandwidth and matmul rate, beside the datasheet")
    c.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)

    b = sub.add_parser("param-bytes", help="weights a deployment holds, from shapes")
    b.add_argument("--preset", default="full")
    b.add_argument("--kernels", default="reference,compact,pallas")
    b.add_argument("--dtype", default="bfloat16")
    return ap


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    if rest and args.stage != "gpu-tests":
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    stages = {"time": stage_time, "soak": stage_soak, "ceilings": stage_ceilings, "param-bytes": stage_param_bytes}
    if args.stage == "gpu-tests":
        return stage_gpu_tests(args, rest)
    return stages[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())

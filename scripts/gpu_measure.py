#!/usr/bin/env python3
"""The GPU measurement harness: one stage per device call, each sized to finish inside one 600 s call.

Run on the device machine from the repository root (its python3 holds jax with CUDA):

    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
    python3 scripts/gpu_measure.py time --preset full --kernels reference,pallas [--rounds 5 --runs 20] [--phases]
        [--weights float,fp8:siglip+prefix:static]
    python3 scripts/gpu_measure.py soak --kernels pallas [--calls 1000 --views 1,2,3 --prompt-lens 20,60 --quantize fp8]
    python3 scripts/gpu_measure.py gpu-tests [PYTEST ARGS...]          (default: every gpu-marked test in tests/)
    python3 scripts/gpu_measure.py ceilings
    python3 scripts/gpu_measure.py param-bytes --kernels compact,pallas   (shapes only: runs anywhere)
    python3 scripts/gpu_measure.py loadtest --json $OUT/loadtest.json --log-dir $OUT [--seconds 45 --clients 1,4,8,16]

Stages:
  time        the implementations named by --kernels timed interleaved: every round is a `pi05 bench` timing
              (warm-up, then --runs calls of each implementation's one-jit sample in turn, block_until_ready),
              made by bench's own code (pi05_jax.bench.runner: compile_calls, timed_rounds, stats), so the median
              is the figure `pi05 bench` reports as "total" for the same arguments. --rounds repeats it; reported:
              median [p10 - p90] over every timed call, the spread of the round medians, the speedup over the
              first implementation, and its actions' relative error against the first. --phases adds each phase jitted
              alone to the interleaving (bench's phase figures). --weights float,fp8:siglip+prefix:static,...
              times each implementation on each set of weights (quantized in memory from the same random weights;
              static scales calibrated on the timed inputs): the bf16-vs-FP8 comparison in one run.
  soak        --calls consecutive calls through the deployed path (runtime.Model holding the implementation's
              packed weights, the stacked originals freed as Model.load does), inputs varied call to call (each
              combination of --views and --prompt-lens, 16 noise draws); counts NaN/Inf, samples device memory every
              --every calls; fails on any non-finite action or on memory growth after the first pass over the inputs.
              --quantize fp8|fp4 soaks the weights `pi05 quantize` makes.
  gpu-tests   pytest -m gpu: the kernels compiled for the card against their references, the fast paths' parity
              with reference at full width (tests/test_parity_on_gpu.py), the server's 1000-call soak, batched rows
              equal to their solo answers (tests/test_batching.py, full size bf16 pallas: cosine >= 0.99999).
  ceilings    the copy bandwidth and matmul rate bench measures at its start, beside the card's datasheet figures.
  param-bytes the weights a deployment holds, from shapes only (jax.eval_shape): as loaded, and packed for each
              implementation (what runtime.Model.load keeps).
  loadtest    `pi05 serve` (a subprocess, --port 0, --warm example) under `pi05 loadtest` (a subprocess per run):
              a --max-batch 8 server at --clients 1,4,8,16 x --rate 5 Hz, then at --sat-clients 16 in a closed loop
              (loadtest --rate 0: each client's next request as soon as its reply is in); then a --max-batch 1
              server at 8 x 5 Hz and the same closed loop. Reported: throughput, p50/p90/p99, the batch sizes the
              replies ran in, the prompts' tokens (from the replies' server_timing), errors, and batched / solo
              throughput at both loads (8 x 5 Hz offers 40 requests/s: a solo server that keeps up makes that ratio
              ~1 by construction; the closed loop compares capacities). Each server's GET /stats (jax memory_stats:
              bytes in use and peak; RSS) and nvidia-smi are sampled every --sample-every s; device memory must stay
              flat (idle after the first run vs idle after the last). Fails on any error, busy refusal or dropped
              request, a compile after warm-up, memory growth, or a skipped run; the ratios are reported, not gated.
              Preset: full on a GPU, tiny elsewhere. A subprocess (so this process never holds the GPU) makes the
              random-weight checkpoint once under --work-dir (bench's random_weights, drawn on the device, written
              as write_random_checkpoint writes: bfloat16, its norm stats and demo tokenizer) and calibrates the
              synthetic prompts' word count to --prompt-tokens 60 through the server's own transforms and tokenizer,
              inside the bucket --warm example compiles. The two servers share a JAX persistent compilation cache
              under --work-dir (the solo server loads batch 1 instead of compiling it). Budget: the runs default to
              45 s, not the issue's 60 s, to fit one 600 s call (full size, H200, estimated: checkpoint ~30 s,
              batched server up ~130 s (4 batch sizes compiled, ~29 s each), 5 x 45 s + 2 x 15 s closed loop,
              ~2-4 s per run beyond its duration, solo server ~20-45 s: ~480 s); before every run the remaining runs
              are shortened together to fit --budget-s 540 (never below 10 s, else skipped; the table says "N (of
              M)"). SIGTERM stops the servers and leaves the JSON of what ran:
              timeout -s TERM 590 python3 scripts/gpu_measure.py loadtest --json $OUT/loadtest.json --log-dir $OUT
              The GPU machine lacks the server's and clients' packages: scripts/device_wheels.sh (its header).

Kernel micro-benchmarks live in the kernel modules: `python3 -m pallas_kernels.<module>` (their main()).
Where the time goes, kernel by kernel: `pi05 profile --preset full --kernels pallas --no-cuda-graphs --trace-dir T`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
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


def with_option_variants(impls: list, specs: list[str]) -> list:
    """impls, then for each `FIELD=V1,V2` spec and each fast implementation among them, the implementation with its
    FastPathOptions field set to each value (`implementations.fast`), named `impl[FIELD=V]`."""
    import dataclasses

    from pi05_jax import implementations
    from pi05_jax.fast.options import FastPathOptions

    fields = {f.name: f for f in dataclasses.fields(FastPathOptions)}
    out = list(impls)
    for spec in specs:
        field, sep, values = spec.partition("=")
        if not sep or field not in fields or not values:
            raise SystemExit(f"--options {spec!r}: expected FIELD=V1,V2 with FIELD one of {', '.join(fields)}")
        for impl in impls:
            if impl.options is None:
                continue
            for value in values.split(","):
                kind = type(getattr(impl.options, field))
                try:
                    options = dataclasses.replace(impl.options, **{field: kind(value)})
                except (TypeError, ValueError) as e:
                    raise SystemExit(f"--options {spec!r}: {e}") from None
                out.append(implementations.fast(f"{impl.name}[{field}={value}]", options, impl.description))
    return out



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
    variants = weight_variants(args.weights, built, sel, say)
    compiled: dict[str, runner.Compiled] = {}
    failed: dict[str, str] = {}
    prepared: dict[str, object] = {}  # name -> bench's Phased, for --profile-dir
    impls = with_option_variants(resolve(",".join(sel.kernels)), args.options)
    for label, params in variants.items():
        for impl in impls:
            name = impl.name if len(variants) == 1 else f"{impl.name}/{label}"
            try:
                p = phased(impl, params, built.obs, sel.steps)
                compiled[name] = runner.compile_calls(p, built.obs, built.noise, say=say, phases=args.phases)
                prepared[name] = p
            except Exception as e:  # one variant that does not compile on this card: report it, time the others
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                say(f"[{name}] FAILED: {failed[name]}")
    if not compiled:
        return 1
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
    for name in names:
        say(f"[{name}] GEMMs in the compiled sample (distinct ops): {gemm_census(compiled[name].sample.as_text())}")
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
        if (name, "prepare_host") in times:  # the masks as host arrays, as `pi05 serve` gets a request
            res["host_prepare_served"] = runner.stats(times[(name, "prepare_host")])
        if args.phases:
            res["phases"] = {ph: runner.stats(times[(name, ph)]) for ph in PHASES}
            res["phase_sum_over_total"] = sum(res["phases"][ph]["median_s"] for ph in PHASES) / t["median_s"]
        results.append(res)
        rows.append([name, f"{c.compile_s:.1f} s", f"{_ms(t['median_s'])} [{_ms(t['p10_s'])} - {_ms(t['p90_s'])}]",
                     f"{res['hz']:.1f}", f"{_ms(min(rm))} - {_ms(max(rm))}", f"{res['speedup_vs_first']:.3f}x",
                     f"{res['actions_rel_err_vs_first']:.1e}",
                     (f"{_ms(res['host_prepare_served']['median_s'])} / " if "host_prepare_served" in res else "")
                     + (_ms(res["host_prepare"]["median_s"]) if "host_prepare" in res else "-"),
                     *((*(_ms(res["phases"][ph]["median_s"]) for ph in PHASES),
                        f"{res['phase_sum_over_total'] * 100:.0f}%") if args.phases else ())])
    n = args.rounds * sel.runs
    print(f"{sel.describe()}; {jax.devices()[0].device_kind}; {args.rounds} rounds x {sel.runs} calls each, "
          f"interleaved ({n} timed calls per implementation); ms")
    print(_table(["impl", "compile", "total median [p10 - p90]", "Hz", "round medians", "speedup vs first",
                  "rel err vs first", "host prep (host masks / device masks)",
                  *((*PHASES, "sum/total") if args.phases else ())], rows))
    if args.json:
        doc = {"schema": "pi05-gpu-measure-time/1", **commit(), "argv": sys.argv, "device": hardware.device_info(),
               "selection": sel.as_dict(), "rounds": args.rounds, "implementations": results, "failed": failed}
        print(f"wrote {report.write_json(doc, args.json)}")
    for name, why in failed.items():
        print(f"{name}: FAILED to compile: {why}")
    if args.profile_dir:  # after the timing, so tracing never overlaps a timed call
        import dataclasses

        from pi05_jax.commands.profile import profile_one, text

        for name, p in prepared.items():
            folder = re.sub(r"[^A-Za-z0-9_.+-]", "_", name)
            summary = profile_one(dataclasses.replace(p, name=folder), built, trace_dir=args.profile_dir, runs=3,
                                  top=args.profile_top, say=say)
            print(text(summary, steps=sel.steps))
    return 0 if all(r["actions_finite"] for r in results) and not failed else 1


GEMM_TARGETS = {"cuBLASLt FP8": '"__cublas$lt$matmul$f8"', "cuBLASLt": '"__cublas$lt$matmul"',
                "cuBLAS": '"__cublas$gemm"', "Triton GEMM": '"__triton_gemm"'}


def gemm_census(hlo_text: str) -> str:
    """How many distinct GEMM ops of each kind XLA's optimized HLO holds (which library the FP8 dots reached)."""
    counts = {kind: hlo_text.count(marker) for kind, marker in GEMM_TARGETS.items()}
    fp8_fusions = sum(1 for line in hlo_text.splitlines() if '"__triton_gemm"' in line and "f8e4m3fn" in line)
    return ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (FP8 operands in {fp8_fusions} Triton GEMMs)"


WEIGHTS_HELP = ("weights to time each implementation on, comma separated (default: %(default)s): 'float' (as "
                "built, in --dtype) or 'fp8:PARTS:SCALING[:MATMUL]', the weights `pi05 quantize --format fp8 --parts "
                "PARTS` makes, quantized in memory; PARTS siglip+prefix+expert joined by '+', SCALING 'dynamic' (per "
                "token) or 'static' (per-tensor scales calibrated in memory, as --calibration does, on the timed "
                "inputs); MATMUL 'xla' (cuBLASLt) or 'mosaic' (pallas_kernels.fp8_matmul's Mosaic GPU kernel); "
                "default: Fp8Options' default backend")


def weight_variants(text: str, built, sel, say) -> dict[str, dict]:
    """{label: params} for --weights; every variant is made from the one set of built weights."""
    from checkpoints.quantize import PARTS, Plan, calibrate, quantize_params
    from pi05_jax.quantized.fp8_weight import with_options

    out, amax = {}, {}
    for label in [w.strip() for w in text.split(",") if w.strip()]:
        if label == "float":
            out[label] = built.params
            continue
        fields = label.split(":")
        parts = tuple(fields[1].split("+")) if len(fields) in (3, 4) else ()
        matmul = fields[3] if len(fields) == 4 else None
        if fields[0] != "fp8" or not parts or any(p not in PARTS for p in parts) or \
                fields[2] not in ("dynamic", "static") or matmul not in (None, "xla", "mosaic"):
            raise SystemExit(f"--weights: {label!r} is not 'float' or 'fp8:PARTS:dynamic|static[:MATMUL]' with PARTS "
                             f"from {'+'.join(PARTS)} and MATMUL xla or mosaic")
        plan = Plan(fmt="fp8", parts=parts)
        act = None
        if fields[2] == "static":
            if parts not in amax:
                say(f"calibrating static activation scales for {'+'.join(parts)} on the timed inputs")
                case = {"obs": built.obs, "noise": built.noise, "num_steps": sel.steps, "name": "bench inputs"}
                amax[parts] = calibrate(built.params, [case], plan, progress=say)
            act = amax[parts]
        say(f"quantizing {label} in memory")
        params = quantize_params(built.params, plan, act_amax=act)
        if matmul == "mosaic":
            params = with_options(params, backend="pallas")
        elif matmul == "xla":
            params = with_options(params, backend="xla")
        out[label] = params
    if not out:
        raise SystemExit("--weights is empty")
    return out


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
    if args.options:  # FIELD=VALUE: that FastPathOptions variant of the implementation (one value only)
        variants = with_option_variants([impl], args.options)[1:]
        if len(variants) != 1:
            raise SystemExit(f"soak --options {args.options}: one FIELD=VALUE of a fast implementation, got "
                             f"{len(variants)} variants")
        impl = variants[0]
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
    # Only pytest's own plugins: the suite needs no other, and on the H200 (2026-12-03) a run whose 31 tests had all
    # passed never printed its final line nor exited (after the warnings summary, where third-party plugins report).
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    say("PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 " + " ".join(cmd))
    try:
        return subprocess.run(cmd, timeout=args.limit_s, env=env).returncode
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


# --- loadtest: pi05 serve driven by pi05 loadtest, batched against --max-batch 1 -------------------------------------


LISTENING = re.compile(r"listening on ws://(\S+):(\d+) ")
DEVICE_GROWTH_SLACK = MEMORY_GROWTH_SLACK  # device bytes in use, idle, between the first and the last run's end
SMI_GROWTH_SLACK = 64 << 20  # nvidia-smi memory.used (what the driver sees: the allocator's pool, CUDA's own)
RUN_OVERHEAD_S = 4.0  # a loadtest process beyond its --duration: start, connections, the last replies (CPU: 1-2 s)
SERVER_STOP_S = 5.0  # SIGINT to exit, reserved per server (CPU: 0.5 s)
LATER_START = (30.0, 0.35)  # a later server's start, reserved: max(30 s, 0.35 x the first's) (it compiles batch 1
# only, or loads it from the first's persistent compilation cache)
MIN_RUN_S = 10.0  # budget fitting never shortens a run below this; a run that cannot get it is skipped
PROMPT_CALIBRATION = (8, 8)  # clients x requests of each client whose prompts the calibration tokenizes


def _cpu_env() -> dict:
    """The environment of processes that must never take the GPU (loadtest clients)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def stage_loadtest_prepare(args) -> int:
    """Run by `loadtest` in a subprocess, so that the measuring process never holds the GPU: the platform and its
    device, the random-weight checkpoint (made once, then reused), and the prompt length in words whose tokenized
    prompts (task text + the request's state, the server's own transforms) come closest to --prompt-tokens."""
    import json
    import types

    import jax

    from pi05_jax.bench import hardware
    from pi05_jax.commands.loadtest import synthetic_requests
    from pi05_jax.config import preset
    from pi05_jax.fast.prefix import DEFAULT_BUCKET_SIZE
    from pi05_jax.policy.pipeline import Policy, policy_parts
    from pi05_jax.policy.prompt_tokenizer import find_tokenizer
    from pi05_jax.serving.batching import PolicyRunner

    platform = jax.default_backend()
    preset_name = args.preset or ("full" if platform == "gpu" else "tiny")
    out = {"platform": platform, "device": hardware.device_info(), "preset": preset_name}
    t0 = time.perf_counter()
    if args.checkpoint:
        from checkpoints.openpi_io import read_config

        path = pathlib.Path(args.checkpoint).resolve()
        config, made = read_config(path), "given"
    else:
        config = preset(preset_name)
        path, made = make_random_checkpoint(pathlib.Path(args.work_dir) / f"ckpt-{preset_name}", config, preset_name)
    out.update(checkpoint=str(path), checkpoint_source=made, checkpoint_s=time.perf_counter() - t0)

    policy = Policy(model=types.SimpleNamespace(config=config),
                    **policy_parts(path, config=config, adapter=args.adapter, norm_stats=args.norm_stats,
                                   tokenizer=find_tokenizer(None, path)))
    runner = PolicyRunner(policy)  # the server's request preparation; the stub model is never called
    views = runner.robot_views()
    example_tokens = runner.prepare(policy.example_request(), None).prompt_tokens
    # the fast paths' prefix bucket of the warm-up request (what --warm example compiles), in prompt tokens
    image_tokens = views * config.tokens_per_image
    bucket_limit = -(-(image_tokens + example_tokens) // DEFAULT_BUCKET_SIZE) * DEFAULT_BUCKET_SIZE - image_tokens
    clients, each = PROMPT_CALIBRATION

    def tokens(words, n):
        make = synthetic_requests(runner.metadata, args.seed, words)
        return [runner.prepare(make(c, i), None).prompt_tokens for c in range(clients) for i in range(each)][:n]

    def fits(got):  # inside the warm-up request's bucket (with 2 tokens to spare), when only that one is compiled
        return args.warm != "example" or max(got) <= bucket_limit - 2

    coarse = []  # a few requests per word count, up to past the target, then the closest candidates on all of them
    for words in range(1, config.max_token_len):
        got = tokens(words, 4)
        coarse.append((abs(float(np.median(got)) - args.prompt_tokens), words))
        if np.median(got) > args.prompt_tokens + 4 or max(got) >= config.max_token_len:
            break
    full = [(w, tokens(w, clients * each)) for _, w in sorted(coarse)[:4]]
    words, got = min([wt for wt in full if fits(wt[1])] or full,
                     key=lambda wt: (abs(float(np.median(wt[1])) - args.prompt_tokens), wt[0]))
    out.update(adapter=policy.adapter.name, views=views, request_shapes=runner.metadata["request_shapes"],
               example_prompt_tokens=example_tokens, warm_bucket_prompt_limit=bucket_limit, prompt_words=words,
               prompt_tokens={"min": min(got), "p50": float(np.median(got)), "max": max(got),
                              "sampled": len(got), "target": args.prompt_tokens, "fits_warm_bucket": fits(got)})
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def make_random_checkpoint(path: pathlib.Path, config, preset_name: str) -> tuple[pathlib.Path, str]:
    """A random-weight checkpoint in openpi's layout, as `checkpoints.random_init.write_random_checkpoint` writes it
    (its norm stats and demo tokenizer, `pi05 demo`'s dtypes: bfloat16 for the full model, float32 for tiny), the
    weights drawn by bench's `random_weights` (on the device on a GPU: numpy needs minutes for the full model).
    Reused when a complete one is already there."""
    import jax

    from checkpoints.random_init import write_random_checkpoint
    from pi05_jax.bench.selection import random_weights

    done = path / "COMPLETE"
    if done.exists():
        say(f"reusing the random-weight {preset_name} checkpoint {path}")
        return path, "reused"
    dtype = "bfloat16" if preset_name == "full" else "float32"
    say(f"writing a random-weight {preset_name} checkpoint ({dtype}) to {path}")
    params = jax.tree.map(np.asarray, jax.device_get(random_weights(config, seed=0, dtype=dtype)))
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_random_checkpoint(tmp, config, seed=0, params=params)
    del params
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    done.write_text("written by scripts/gpu_measure.py loadtest\n")
    return path, "written"


def gpu_memory_used() -> int | None:
    """Bytes in use on GPU 0 as the driver sees them (nvidia-smi), or None without one."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                           capture_output=True, text=True, timeout=10)
        return int(float(r.stdout.strip().splitlines()[0])) << 20 if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


class Serve:
    """`python -m pi05_jax.cli serve ... --port 0` with its output collected to a log; its port once listening;
    a thread sampling its GET /stats (and nvidia-smi) every `every` seconds."""

    def __init__(self, name: str, argv: list[str], env: dict, log_path: pathlib.Path, every: float):
        self.name, self.argv, self.every = name, argv, every
        self.log_path = log_path
        self.lines: list[str] = []
        self.port: int | None = None
        self.samples: list[dict] = []
        self.t_start = time.perf_counter()
        self.startup_s: float | None = None
        self._listening = threading.Event()
        self._stop = threading.Event()
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._poller = threading.Thread(target=self._poll, daemon=True)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            self._log.write(line)
            self._log.flush()
            m = LISTENING.search(line)
            if m and self.port is None:
                self.port = int(m.group(2))
                self.startup_s = time.perf_counter() - self.t_start
                self._listening.set()
        self._listening.set()

    def wait_listening(self, timeout: float) -> bool:
        self._listening.wait(timeout)
        return self.port is not None and self.proc.poll() is None

    def sample(self, tag: str | None = None) -> dict:
        from pi05_jax.commands.loadtest import fetch_stats

        stats = fetch_stats("127.0.0.1", self.port, None) or {}
        mem = stats.get("device_memory") or {}
        s = {"t_s": time.perf_counter() - T0, "tag": tag, "bytes_in_use": mem.get("bytes_in_use"),
             "peak_bytes_in_use": mem.get("peak_bytes_in_use"), "rss_bytes": stats.get("rss_bytes"),
             "gpu_memory_used": gpu_memory_used(), "requests": stats.get("requests"),
             "errors": stats.get("errors"), "busy": stats.get("busy"), "dropped": stats.get("dropped"),
             "compiles_since_warmup": stats.get("compiles_since_warmup"), "batches": stats.get("batches")}
        self.samples.append(s)
        return s

    def _poll(self):
        while not self._stop.wait(self.every):
            self.sample()

    def start_sampling(self):
        self._poller.start()

    def stop(self) -> int | None:
        self._stop.set()
        if self._poller.is_alive():
            self._poller.join(30)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = None
        self._reader.join(10)
        self._log.close()
        return code

    def startup_line(self) -> str | None:
        return next((ln.strip() for ln in self.lines if ln.startswith("pi05 serve: implementation")), None)

    def summary_line(self) -> str | None:
        return next((ln.strip() for ln in self.lines if "pi05 serve: stopped after" in ln), None)


def _series(samples: list[dict], key: str) -> dict | None:
    values = [s[key] for s in samples if s.get(key) is not None]
    return {"first": values[0], "max": max(values), "last": values[-1], "n": len(values)} if values else None


def _msv(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f}"


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


# what a server's memory is watched by: (sample key, what it is, growth allowed; None: reported, not gated)
MEMORY_SOURCES = (("bytes_in_use", "device bytes in use (jax memory_stats, from GET /stats)", DEVICE_GROWTH_SLACK),
                  ("peak_bytes_in_use", "device peak bytes in use (the allocator's, since the server started)", None),
                  ("gpu_memory_used", "GPU memory used (nvidia-smi)", SMI_GROWTH_SLACK),
                  ("rss_bytes", "server RSS", None))


def _memory_check(name: str, samples: list[dict], key: str, slack: int | None) -> dict | None:
    """Idle level of `key` after the first run against after the last (the server idle both times)."""
    idle = [s for s in samples if s["tag"] and s["tag"].startswith("after run") and s.get(key) is not None]
    if len(idle) < 2:
        return None
    growth = idle[-1][key] - idle[0][key]
    return {"server": name, "source": key, "from": idle[0]["tag"], "to": idle[-1]["tag"], "first": idle[0][key],
            "last": idle[-1][key], "growth": growth, "slack": slack, "grows": slack is not None and growth > slack}


def stage_loadtest(args) -> int:
    import json

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers (finally below) on a time limit
    from pi05_jax.bench.report import write_json
    from pi05_jax.bench.suite import commit
    from pi05_jax.commands.loadtest import rate_text

    servers = [n.strip() for n in args.servers.split(",") if n.strip()]
    if not servers or any(n not in ("batched", "solo") for n in servers):
        print(f"loadtest: --servers {args.servers!r}: name batched, solo or both")
        return 2
    work = pathlib.Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log_dir = pathlib.Path(args.log_dir) if args.log_dir else work
    log_dir.mkdir(parents=True, exist_ok=True)
    clients = _ints(args.clients)
    doc = {"schema": "pi05-gpu-measure-loadtest/1", **commit(), "argv": sys.argv, "budget_s": args.budget_s,
           "servers": [], "runs": [], "checks": []}

    def save():
        doc["elapsed_s"] = time.perf_counter() - T0
        if args.json:
            write_json(doc, args.json)

    # 1. platform, checkpoint and prompt length, in a subprocess (this process never initializes a JAX backend)
    prep_out = work / "prepare.json"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "loadtest-prepare", "--work-dir", str(work),
           "--out", str(prep_out), "--adapter", args.adapter, "--prompt-tokens", str(args.prompt_tokens),
           "--seed", str(args.seed), "--warm", args.warm, *(["--preset", args.preset] if args.preset else []),
           *(["--checkpoint", args.checkpoint] if args.checkpoint else []),
           *(["--norm-stats", args.norm_stats] if args.norm_stats else [])]
    say("preparing (platform, checkpoint, prompt calibration) in a subprocess")
    prep_out.unlink(missing_ok=True)
    r = subprocess.run(cmd, cwd=ROOT, timeout=args.budget_s)
    if r.returncode != 0 or not prep_out.exists():
        print(f"loadtest: preparation failed (exit {r.returncode})")
        return 1
    prep = json.loads(prep_out.read_text())
    prompt_words = args.prompt_words or prep["prompt_words"]
    doc["prepare"] = prep
    doc["prompt_words"] = prompt_words
    t = prep["prompt_tokens"]
    say(f"{prep['device']['device_kind']} ({prep['platform']}), jax {prep['device']['jax_version']}: preset "
        f"{prep['preset']}, checkpoint {prep['checkpoint']} ({prep['checkpoint_source']}, {prep['checkpoint_s']:.1f} "
        f"s); adapter {prep['adapter']}, {prep['views']} views {prep['request_shapes']}; prompts of {prompt_words} "
        f"words -> {t['min']}..{t['max']} tokens (median {t['p50']:g}, target {t['target']}) over {t['sampled']} "
        f"calibration requests")
    if not t["fits_warm_bucket"]:
        say(f"WARNING: prompts of up to {t['max']} tokens leave the warm-up request's prefix bucket (up to "
            f"{prep['warm_bucket_prompt_limit']} prompt tokens) that --warm example compiles: requests will compile")
    save()

    # 2. the servers and their runs
    env = {k: v for k, v in os.environ.items() if k != "PI05_API_KEY"}  # the samplers and clients send no key
    if not args.no_compile_cache:  # the second server loads what the first compiled (batch 1) instead of compiling
        env.update(JAX_COMPILATION_CACHE_DIR=str(work / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    sat = (args.sat_clients, 0.0, args.sat_seconds)
    if args.compare_clients not in clients:  # the comparison needs its load on both servers
        clients.append(args.compare_clients)
    plans = [("batched", args.max_batch, [(c, args.rate, args.seconds) for c in clients] + [sat]),
             ("solo", 1, [(args.compare_clients, args.rate, args.seconds), sat])]
    plans = [plan for plan in plans if plan[0] in servers]
    base = [sys.executable, "-m", "pi05_jax.cli", "serve", "--checkpoint", prep["checkpoint"], "--adapter",
            args.adapter, "--port", "0", "--warm", args.warm, "--num-steps", str(args.steps),
            "--max-queue", str(max(32, 2 * args.sat_clients)),
            *(["--norm-stats", args.norm_stats] if args.norm_stats else []),
            *(["--kernels", args.kernels] if args.kernels else []), *(["--dtype", args.dtype] if args.dtype else [])]
    run_no = 0
    first_startup = None
    scale = 1.0  # the budget's shortening so far
    for si, (name, max_batch, runs) in enumerate(plans):
        later = plans[si + 1:]
        log_path = log_dir / f"serve_{name}_max_batch_{max_batch}.log"
        say(f"starting the {name} server (--max-batch {max_batch}, --warm {args.warm}); log {log_path}")
        srv = Serve(name, [*base, "--max-batch", str(max_batch)], env, log_path, args.sample_every)
        rec = {"name": name, "max_batch": max_batch, "argv": srv.argv, "log": str(log_path)}
        doc["servers"].append(rec)
        if not srv.wait_listening(args.startup_timeout):
            code = srv.stop()
            rec.update(started=False, exit_code=code, log_tail=srv.lines[-40:])
            doc["checks"].append({"check": f"{name} server started", "ok": False})
            print(f"{name} server did not start (exit {code}); last lines:\n" + "".join(srv.lines[-40:]))
            save()
            continue
        try:
            first_startup = first_startup or srv.startup_s
            rec.update(started=True, startup_s=srv.startup_s, startup_line=srv.startup_line(), port=srv.port)
            say(f"{name} server listening on port {srv.port} after {srv.startup_s:.1f} s: {rec['startup_line']}")
            srv.sample("after warm-up")
            srv.start_sampling()
            # budget, before every run: this run and the ones after it, the later servers' start (estimated from the
            # first server's) and every stop; what does not fit is shortened, all runs alike, or skipped
            later_start = sum(max(LATER_START[0], LATER_START[1] * first_startup) for _ in later)
            later_runs = [d for _, _, rs in later for _, _, d in rs]
            for i, (n_clients, rate, asked) in enumerate(runs):
                run_no += 1
                pending = [d for _, _, d in runs[i:]] + later_runs
                left = (args.budget_s - (time.perf_counter() - T0) - later_start - SERVER_STOP_S * (1 + len(later))
                        - RUN_OVERHEAD_S * len(pending))  # for the pending runs' durations
                left_this = left + RUN_OVERHEAD_S * (len(pending) - 1)  # were the later runs skipped
                # all pending runs shortened alike to fit, and a later run never relatively longer than an earlier one
                scale = min(scale, max(left, 0.0) / sum(pending))
                floor = min(asked, MIN_RUN_S)
                duration = min(asked, max(floor, float(int(asked * scale))), float(int(left_this)))
                run = {"run": run_no, "server": name, "max_batch": max_batch, "clients": n_clients, "rate_hz": rate,
                       "seconds_asked": asked, "seconds": duration, "prompt_words": prompt_words}
                doc["runs"].append(run)
                if duration < floor:
                    run.update(skipped=f"budget: {left_this:.0f} s left for it")
                    say(f"run {run_no} ({name}, {n_clients} clients): SKIPPED, {run['skipped']}")
                    save()
                    continue
                if duration < asked:
                    say(f"budget: {left:.0f} s left for {len(pending)} runs of {sum(pending):g} s: run {run_no} "
                        f"shortened from {asked:g} to {duration:g} s (--budget-s {args.budget_s:g})")
                requests = 10**6 if rate == 0 else int(np.ceil(rate * duration)) + 5
                out = work / f"run{run_no}.json"
                out.unlink(missing_ok=True)
                lt = [sys.executable, "-m", "pi05_jax.cli", "loadtest", "--port", str(srv.port), "--clients",
                      str(n_clients), "--rate", f"{rate:g}", "--duration", f"{duration:g}", "--requests", str(requests),
                      "--seed", str(args.seed + run_no), "--stats-every", "5", "--prompt-words", str(prompt_words),
                      "--output", str(out)]
                what = f"{n_clients} clients x {rate_text(rate)} for {duration:.0f} s"
                say(f"run {run_no}: {name} server (--max-batch {max_batch}), {what}")
                t_begin = time.perf_counter() - T0
                try:
                    p = subprocess.run(lt, cwd=ROOT, env=_cpu_env(), capture_output=True, text=True,
                                       timeout=duration + 240)
                    code, text = p.returncode, p.stdout + p.stderr
                except subprocess.TimeoutExpired as e:
                    code, text = None, f"loadtest did not finish within {duration + 240:.0f} s: {e}"
                t_end = time.perf_counter() - T0
                sys.stderr.write("".join(f"    | {ln}\n" for ln in text.splitlines()))
                report = json.loads(out.read_text()) if out.exists() else None
                idle = srv.sample(f"after run {run_no}")
                window = [s for s in srv.samples if t_begin <= s["t_s"] <= t_end]
                if report is not None:
                    errors = list(report["errors"]) or ([] if code == 0 else [f"loadtest exit status {code}"])
                else:
                    errors = [text.strip().splitlines()[-1] if text.strip() else f"loadtest exit status {code}"]
                run.update(exit_code=code, report=report, errors=errors, t_begin_s=t_begin, t_end_s=t_end,
                           device_bytes_in_use=_series(window, "bytes_in_use"),
                           device_peak_bytes=_series(window, "peak_bytes_in_use"),
                           gpu_memory_used=_series(window, "gpu_memory_used"), idle_after=idle)
                if report:
                    lat = report["latency_ms"]
                    say(f"run {run_no}: {report['replies']} replies, {report['throughput_rps']:.1f}/s, p50 "
                        f"{_msv(lat['p50'])} p99 {_msv(lat['p99'])} ms, "
                        f"batches {report['batch_sizes']}, {len(report['errors'])} errors")
                else:
                    say(f"run {run_no}: no report (exit {code})")
                save()
            rec["final_stats"] = srv.sample("end")
        finally:  # the server never outlives this stage (a SIGTERM from a time limit exits through here too)
            code = srv.stop()
            rec.update(exit_code=code, summary_line=srv.summary_line(), samples=srv.samples,
                       log_tail=srv.lines[-15:])
            say(f"{name} server stopped (exit {code}): {rec['summary_line']}")
            save()
    return loadtest_report(doc, args, save)


def loadtest_report(doc: dict, args, save) -> int:
    from pi05_jax.commands.loadtest import rate_text

    runs, servers = doc["runs"], doc["servers"]
    rows = []
    for r in runs:
        rep = r.get("report") or {}
        lat = rep.get("latency_ms") or {}
        tok = rep.get("prompt_tokens") or {}
        dev = r.get("device_bytes_in_use")
        rows.append([f"{r['server']} (max {r['max_batch']})", f"{r['clients']} x {rate_text(r['rate_hz'])}",
                     "skipped" if r.get("skipped") else f"{r['seconds']:g}" + (
                         f" (of {r['seconds_asked']:g})" if r["seconds"] < r["seconds_asked"] else ""),
                     str(rep.get("replies", "-")), f"{rep['throughput_rps']:.1f}" if rep else "-",
                     *(_msv(lat.get(k)) for k in ("p50", "p90", "p99")),
                     ", ".join(f"{k}x{v}" for k, v in (rep.get("batch_sizes") or {}).items()) or "-",
                     f"{tok['min']}-{tok['max']}" if tok else "-",
                     str(len(r.get("errors") or [])) if not r.get("skipped") else "-",
                     f"{_mib(dev['first'])} / {_mib(dev['max'])} / {_mib(dev['last'])}" if dev else "n/a"])
    prep = doc.get("prepare") or {}
    start = [f"{s['name']} {s['startup_s']:.0f} s" for s in servers if s.get("startup_s")]
    frames = [shape for shape, _ in (prep.get("request_shapes") or {}).values() if len(shape) == 3]
    tok = prep.get("prompt_tokens") or {}
    print(f"pi05 loadtest on {(prep.get('device') or {}).get('device_kind')}: preset {prep.get('preset')}, adapter "
          f"{prep.get('adapter')} ({prep.get('views')} views, frames {frames}), {doc.get('prompt_words')}-word prompts "
          f"(calibrated to {tok.get('target')} tokens); servers up (load + compile + warm) in {', '.join(start)}")
    for s in servers:
        if s.get("startup_line"):
            print(f"  {s['name']}: {s['startup_line']}")
    print(_table(["server", "clients x rate", "s", "replies", "replies/s", "p50 ms", "p90 ms", "p99 ms",
                  "batch sizes (replies)", "prompt tokens", "errors", "device MiB first / max / last"], rows))

    def find(server, clients, rate):
        return next((r for r in runs if r["server"] == server and r["clients"] == clients and r["rate_hz"] == rate
                     and r.get("report")), None)

    ratios = []
    for label, clients, rate in (("at the issue's load", args.compare_clients, args.rate),
                                 ("saturated (closed loop)", args.sat_clients, 0.0)):
        b, s = find("batched", clients, rate), find("solo", clients, rate)
        if not (b and s) or not s["report"]["throughput_rps"]:
            ratios.append({"load": label, "clients": clients, "rate_hz": rate, "ratio": None})
            print(f"batched / solo throughput {label} ({clients} clients): not measured")
            continue
        ratio = b["report"]["throughput_rps"] / s["report"]["throughput_rps"]
        ratios.append({"load": label, "clients": clients, "rate_hz": rate, "ratio": ratio,
                       "batched_rps": b["report"]["throughput_rps"], "solo_rps": s["report"]["throughput_rps"]})
        print(f"batched / solo throughput {label} ({clients} clients x {rate_text(rate)}): "
              f"{b['report']['throughput_rps']:.1f} / "
              f"{s['report']['throughput_rps']:.1f} = {ratio:.2f}x")
    doc["ratios"] = ratios
    offered = args.compare_clients * args.rate
    solo_cap = next((x["solo_rps"] for x in ratios if x["rate_hz"] == 0 and x["ratio"] is not None), None)
    if ratios[0]["ratio"] is not None:
        verdict = "met" if ratios[0]["ratio"] >= 1.5 else "NOT met"
        why = ""
        if solo_cap is not None and solo_cap > offered:
            why = (f": the offered load is {offered:g} requests/s and the solo server's capacity (closed loop) is "
                   f"{solo_cap:.1f}/s, so both servers keep up and the ratio at this load is ~1 by construction")
        print(f"issue's gate, batched >= 1.5x the --max-batch 1 server at {args.compare_clients} clients x "
              f"{args.rate:g} Hz: {verdict}{why}")
        doc["issue_gate_1_5x"] = {"met": ratios[0]["ratio"] >= 1.5, "offered_rps": offered,
                                  "solo_capacity_rps": solo_cap}

    checks = doc["checks"]
    for r in runs:
        if r.get("skipped"):
            checks.append({"check": f"run {r['run']} ran", "ok": False, "why": r["skipped"]})
        else:
            checks.append({"check": f"run {r['run']} without errors", "ok": r.get("exit_code") == 0
                           and not r.get("errors"), "errors": (r.get("errors") or [])[:10]})
    for s in servers:
        if not s.get("started"):
            continue
        final = s.get("final_stats") or {}
        checks.append({"check": f"{s['name']} server: no errors, none refused as busy, none dropped",
                       "ok": not (final.get("errors") or final.get("busy") or final.get("dropped")),
                       "final": {k: final.get(k) for k in ("requests", "errors", "busy", "dropped")}})
        checks.append({"check": f"{s['name']} server: no compile after warm-up",
                       "ok": final.get("compiles_since_warmup") == 0,
                       "compiles_since_warmup": final.get("compiles_since_warmup")})
        checks.append({"check": f"{s['name']} server exits 0 on SIGINT", "ok": s.get("exit_code") == 0})
        for key, what, slack in MEMORY_SOURCES:
            series = _series(s.get("samples") or [], key)
            if series is None:
                print(f"{s['name']} server, {what}: not reported on this platform")
                continue
            line = (f"{s['name']} server, {what}, MiB over {series['n']} samples (every {args.sample_every:g} s): "
                    f"after warm-up {_mib(series['first'])}, max {_mib(series['max'])}, last {_mib(series['last'])}")
            m = _memory_check(s["name"], s.get("samples") or [], key, slack)
            if m:
                line += f"; idle {m['from']} -> {m['to']}: {m['growth'] / 2**20:+.1f} MiB"
                if slack is None:
                    line += " (not gated)"
                else:
                    line += f" ({'GROWS' if m['grows'] else 'flat'}, slack {slack >> 20} MiB)"
                    checks.append({"check": f"{s['name']} server: {what} flat", "ok": not m["grows"], **m})
            print(line)
    failed = [c for c in checks if not c["ok"]]
    doc["ok"] = not failed
    for c in failed:
        print(f"FAILED: {c['check']}" + (f" ({c.get('errors') or c.get('why') or ''})"
                                          if c.get("errors") or c.get("why") else ""))
    print(f"loadtest: {len(checks) - len(failed)}/{len(checks)} checks passed; wall {time.perf_counter() - T0:.0f} s")
    save()
    if args.json:
        print(f"wrote {args.json}")
    return 0 if not failed else 1


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
    t.add_argument("--weights", default="float", help=WEIGHTS_HELP)
    t.add_argument("--options", metavar="FIELD=V1,V2", action="append", default=[],
                   help="also time each fast implementation of --kernels with this FastPathOptions field set to each "
                        "value (repeatable; e.g. fused_attention=none,vision), named impl[field=value]")
    t.add_argument("--profile-dir", metavar="DIR", default=None,
                   help="after the timing, trace 3 calls of each variant (pi05 profile's summary: top kernels, "
                        "kernels per phase) into DIR/<variant>; with XLA_FLAGS=--xla_gpu_enable_command_buffer= "
                        "in the environment every kernel maps to its phase (the timings then run without CUDA "
                        "graphs too)")
    t.add_argument("--profile-top", type=int, default=25, help="kernels each profile lists (default: %(default)s)")
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
    s.add_argument("--options", metavar="FIELD=VALUE", action="append", default=[],
                   help="soak this FastPathOptions variant of --kernels, e.g. expert=megakernel-loop")

    g = sub.add_parser("gpu-tests", help="pytest -m gpu; extra arguments go to pytest (default: tests/)")
    g.add_argument("--limit-s", type=int, default=GPU_TESTS_LIMIT_S, help="stop pytest after this (default: "
                   "%(default)s)")

    c = sub.add_parser("ceilings", help="copy bandwidth and matmul rate, beside the datasheet")
    c.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)

    lt = sub.add_parser("loadtest", help="pi05 serve under pi05 loadtest: batched (--max-batch 8) vs --max-batch 1")
    lt.add_argument("--preset", default=None, help="default: full on a GPU, tiny elsewhere")
    lt.add_argument("--checkpoint", default=None, metavar="DIR",
                    help="serve this checkpoint instead of a random-weight one (made under --work-dir, reused)")
    lt.add_argument("--norm-stats", default=None, metavar="ASSET_ID", help="with --checkpoint: its norm stats asset")
    lt.add_argument("--kernels", default=None, help="passed to pi05 serve (default: the platform's, pallas on a GPU)")
    lt.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                    help="passed to pi05 serve (default: the platform's, bfloat16 on a GPU)")
    lt.add_argument("--adapter", default="libero", help="robot adapter of the server (default: %(default)s: 2 views)")
    lt.add_argument("--clients", default="1,4,8,16", help="client counts against the batched server, each at --rate "
                    "(default: %(default)s)")
    lt.add_argument("--rate", type=float, default=5.0, help="requests per second per client (default: %(default)s)")
    lt.add_argument("--seconds", type=float, default=45.0,
                    help="duration of each --rate run (default: %(default)s; 60 does not fit one 600 s device call)")
    lt.add_argument("--max-batch", type=int, default=8, help="the batched server's --max-batch (default: %(default)s)")
    lt.add_argument("--servers", default="batched,solo",
                    help="which servers to run (default: %(default)s); one per device call lets every run last the "
                         "issue's 60 s (--servers batched --seconds 60, then --servers solo --seconds 60: the "
                         "ratios are then read across the two JSONs)")
    lt.add_argument("--compare-clients", type=int, default=8,
                    help="clients of the --rate run repeated against the --max-batch 1 server (default: %(default)s)")
    lt.add_argument("--sat-clients", type=int, default=16,
                    help="clients of the closed-loop (--rate 0) run against both servers (default: %(default)s)")
    lt.add_argument("--sat-seconds", type=float, default=15.0, help="duration of each closed-loop run "
                    "(default: %(default)s)")
    lt.add_argument("--prompt-tokens", type=int, default=60,
                    help="calibrate the synthetic prompts' word count to this many tokens (default: %(default)s)")
    lt.add_argument("--prompt-words", type=int, default=None, help="use this word count instead of calibrating")
    lt.add_argument("--warm", choices=("example", "all"), default="example",
                    help="the servers' --warm (default: %(default)s: one prefix bucket per batch size; the prompts are "
                         "calibrated to stay inside it, and a compile after warm-up fails the stage)")
    lt.add_argument("--steps", type=int, default=10)
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--sample-every", type=float, default=2.0,
                    help="sample the server's GET /stats (and nvidia-smi) every S seconds (default: %(default)s)")
    lt.add_argument("--startup-timeout", type=float, default=400.0, help="seconds a server may take to listen")
    lt.add_argument("--budget-s", type=float, default=540.0,
                    help="wall budget of the whole stage: runs are shortened together (never below "
                         f"{MIN_RUN_S:g} s) or skipped to fit, and the report says so (default: %(default)s)")
    lt.add_argument("--no-compile-cache", action="store_true",
                    help="do not share JAX's persistent compilation cache between the two servers")
    lt.add_argument("--work-dir", default="/tmp/pi05_gpu_measure_loadtest",
                    help="checkpoint, compilation cache and the runs' reports (default: %(default)s)")
    lt.add_argument("--log-dir", default=None, help="where the two server logs go (default: --work-dir)")
    lt.add_argument("--json", metavar="OUT.json", help="write everything as JSON (rewritten after every run)")

    lp = sub.add_parser("loadtest-prepare", help="(run by loadtest in a subprocess) checkpoint, prompt calibration")
    for flag in ("--preset", "--checkpoint", "--norm-stats"):
        lp.add_argument(flag, default=None)
    lp.add_argument("--adapter", default="libero")
    lp.add_argument("--work-dir", required=True)
    lp.add_argument("--out", required=True)
    lp.add_argument("--prompt-tokens", type=int, default=60)
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--warm", default="example")

    b = sub.add_parser("param-bytes", help="weights a deployment holds, from shapes")
    b.add_argument("--preset", default="full")
    b.add_argument("--kernels", default="reference,compact,pallas")
    b.add_argument("--dtype", default="bfloat16")
    return ap


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    if rest and args.stage != "gpu-tests":
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    stages = {"time": stage_time, "soak": stage_soak, "ceilings": stage_ceilings, "param-bytes": stage_param_bytes,
              "loadtest": stage_loadtest, "loadtest-prepare": stage_loadtest_prepare}
    if args.stage == "gpu-tests":
        return stage_gpu_tests(args, rest)
    return stages[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())

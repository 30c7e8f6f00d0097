#!/usr/bin/env python
"""FP8 on the H100, one self-contained run (~4 minutes): matmul timings per shape class, end-to-end latency, accuracy.

1. Matmuls at the model's real K/N per shape class (denoise M=50, vision M=256 per view, prefill M=572 = 2 views x
   256 + 60 prompt tokens): bf16 dot vs XLA f8 (cuBLASLt FP8 GEMM; GEMM alone, with the per-token activation
   quantization of `Fp8Weight`, and with a static per-tensor activation scale) vs the Pallas kernel (Mosaic GPU
   wgmma, and its Triton lowering), GEMM alone with the kernel's default block sizes. Every variant is
   checked against the dequantize-then-float32 reference; time = median of many block_until_ready'd calls of one
   executable that runs the op over enough distinct weight copies to stream past L2 (so the weights come from
   HBM, as in the model), divided by the copies. Prints us, TFLOP/s, GB/s, which variant wins per shape and
   whether XLA's dot really became `__cublas$lt$matmul$f8`.
2. End to end, full-size random weights (layout and scales of checkpoints.random_init, generated on the device;
   --host-random uses random_init.random_params itself, ~1 min more), 2 views + 60 tokens, 10 steps, batch 1:
   bf16 vs FP8 (XLA f8 / Pallas Mosaic / Pallas Triton) for kernels "reference" and "pallas" (when registered),
   median latency; the per-phase split (vision / prefill / denoise) of the fast configurations with each phase's
   FP8 floor (FLOPs at the measured f8 matmul rate vs bytes at the measured copy bandwidth).
3. Accuracy gates (issue 7) of every FP8 configuration against this project's float32 path (HIGHEST precision):
   cosine >= 0.99 and MSE <= 0.01; bf16's own distance for context; 100 consecutive FP8 inferences all finite.

usage: python scripts/gpu_fp8.py [--json OUT.json] [--skip-micro] [--skip-e2e] [--sweep] [--budget-s 240]
       python scripts/gpu_fp8.py --preset tiny          (CPU smoke run: tiny shapes, Pallas interpret mode)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import statistics
import sys
import time
import traceback

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from checkpoints import random_init  # noqa: E402
from checkpoints.layout import param_shapes, unflatten  # noqa: E402
from checkpoints.quantize import quantize_params  # noqa: E402
from pallas_kernels import fp8_matmul as k8  # noqa: E402
from pi05_jax import sampler  # noqa: E402
from pi05_jax.config import preset  # noqa: E402
from pi05_jax.quantized import fp8_weight as f8  # noqa: E402
from pi05_jax.synthetic import synthetic_noise, synthetic_observation  # noqa: E402

T0 = time.perf_counter()
GATE = {"cosine": 0.99, "mse": 0.01}
BF16 = jnp.bfloat16

# (class, label, M, K, N) at the full model's sizes.
SHAPES_FULL = [
    ("denoise", "expert q", 50, 1024, 2048),
    ("denoise", "expert kv", 50, 1024, 512),
    ("denoise", "expert attn out", 50, 2048, 1024),
    ("denoise", "expert gate+up", 50, 1024, 8192),
    ("denoise", "expert down", 50, 4096, 1024),
    ("vision", "siglip q/k/v/out", 256, 1152, 1152),
    ("vision", "siglip mlp up", 256, 1152, 4304),
    ("vision", "siglip mlp down", 256, 4304, 1152),
    ("prefill", "llm q", 572, 2048, 2048),
    ("prefill", "llm gate+up", 572, 2048, 32768),
    ("prefill", "llm down", 572, 16384, 2048),
]
SHAPES_TINY = [
    ("denoise", "expert q", 50, 32, 128),
    ("vision", "siglip mlp up", 256, 64, 128),
    ("prefill", "llm gate+up", 572, 64, 256),
]
SWEEP_SHAPES = ("expert gate+up", "expert down", "siglip mlp up", "llm gate+up")


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T0


# --- timing --------------------------------------------------------------------------------------------------------


def timed(fn, args, *, copies: int, repeats: int):
    """(outputs, seconds per op (median), compile seconds) of jit(fn)(*args), fn running the op `copies` times."""
    f = jax.jit(fn)
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return out, statistics.median(ts) / copies, compile_s


def hlo_has_cublas_f8(fn, args) -> bool | None:
    try:
        text = jax.jit(fn).lower(*args).compile().as_text()
    except Exception:
        return None
    return "cublas$lt$matmul$f8" in text


def rel_max_err(y, ref) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))


# --- 1. matmuls ------------------------------------------------------------------------------------------------------


def micro(shapes, *, repeats: int, budget_s: float, sweep: bool) -> list[dict]:
    results = []
    gpu = jax.default_backend() == "gpu"
    key = jax.random.key(0)
    for cls, label, m, k, n in shapes:
        if elapsed() > budget_s * 0.45:
            say(f"matmuls: time budget reached, skipping {label} and the rest")
            break
        key, kx, kw = jax.random.split(key, 3)
        w_bytes = k * n * 2
        copies = int(min(64, max(4, math.ceil(256e6 / w_bytes)))) if gpu else 2
        x = jax.random.normal(kx, (m, k), BF16)
        ws = [jax.random.normal(jax.random.fold_in(kw, i), (k, n), BF16) * (k**-0.5) for i in range(copies)]
        qw = [f8.Fp8Weight.quantize(w, (0,), name=f"{label}[{i}]") for i, w in enumerate(ws)]
        lay = qw[0].layout
        x_pad = jnp.pad(x, ((0, 0), (0, lay.k_pad - k))) if lay.k_pad != k else x
        x_q, x_s = f8.quantize_activations(x_pad)
        vals, scs = [w.values for w in qw], [w.scales for w in qw]
        ref8 = np.asarray(k8.fp8_matmul_reference(x_q, x_s, vals[0], scs[0]))[:, :n]
        ref16 = np.asarray(jnp.dot(x.astype(jnp.float32), ws[0].astype(jnp.float32),
                                   precision=jax.lax.Precision.HIGHEST))
        flops = 2 * m * k * n
        row = {"class": cls, "label": label, "M": m, "K": k, "N": n, "copies": copies, "variants": {}}

        def record(name, fn, args, ref, bytes_moved, tol, *, block_sizes=None, row=row, n=n, flops=flops,
                   copies=copies):
            try:
                out, t, c = timed(fn, args, copies=copies, repeats=repeats)
                y = out[0][:, :n] if out[0].shape[1] != n else out[0]
                err = rel_max_err(y, ref)
                row["variants"][name] = {"us": t * 1e6, "tflops": flops / t / 1e12, "gbps": bytes_moved / t / 1e9,
                                         "rel_err": err, "ok": err <= tol, "compile_s": c,
                                         "block_sizes": None if block_sizes is None else dataclasses.asdict(
                                             block_sizes)}
            except Exception as e:  # a variant that does not compile here is reported, not fatal
                row["variants"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}

        act = m * k * 2 + m * n * 2
        record("bf16", lambda x, *ws: [jnp.dot(x, w) for w in ws], (x, *ws), ref16, k * n * 2 + act, 2.0**-6)
        record("xla_f8", lambda xq, xs, vs, ss: [k8.fp8_matmul_xla(xq, xs, v, s, out_dtype=BF16)
                                                  for v, s in zip(vs, ss, strict=True)],
               (x_q, x_s, vals, scs), ref8, k * n + m * k + m * n * 2, 2.0**-7)
        record("xla_f8_conv", lambda xq, xs, vs, ss: [k8.fp8_matmul_xla(xq, xs, v, s, out_dtype=BF16, form="converted")
                                                       for v, s in zip(vs, ss, strict=True)],
               (x_q, x_s, vals, scs), ref8, k * n + m * k + m * n * 2, 2.0**-7)
        xla_w = [dataclasses.replace(w, options=f8.Fp8Options(backend="xla")) for w in qw]
        record("xla_f8+quant", lambda x, ws: [w.matmul(x) for w in ws], (x, xla_w), ref8, k * n + act, 2.0**-7)
        # Static (calibrated) per-tensor activation scale instead of per-token: the speed side of that choice.
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
        static_w = [dataclasses.replace(w, act_scale=amax / f8.E4M3_MAX) for w in xla_w]
        xs_static, ss_static = f8.quantize_activations(x_pad, amax / f8.E4M3_MAX)
        ref_static = np.asarray(k8.fp8_matmul_reference(xs_static, ss_static, vals[0], scs[0]))[:, :n]
        record("xla_f8+static", lambda x, ws: [w.matmul(x) for w in ws], (x, static_w), ref_static, k * n + act,
               2.0**-7)
        bs = k8.default_block_sizes(m, lay.n_pad, lay.k_pad)
        for backend in ("mosaic", "triton"):
            record(backend, lambda xq, xs, vs, ss, backend=backend, bs=bs: [
                k8.fp8_matmul(xq, xs, v, s, out_dtype=BF16, block_sizes=bs, backend=backend)
                for v, s in zip(vs, ss, strict=True)], (x_q, x_s, vals, scs), ref8, k * n + m * k + m * n * 2,
                2.0**-7, block_sizes=bs)
        if sweep and label in SWEEP_SHAPES:
            for i, cand in enumerate(sweep_candidates(m, lay.n_pad, lay.k_pad)):
                record(f"mosaic#{i}", lambda xq, xs, vs, ss, cand=cand: [
                    k8.fp8_matmul(xq, xs, v, s, out_dtype=BF16, block_sizes=cand, backend="mosaic")
                    for v, s in zip(vs, ss, strict=True)], (x_q, x_s, vals, scs), ref8,
                    k * n + m * k + m * n * 2, 2.0**-7, block_sizes=cand)
        row["cublas_f8"] = {form: hlo_has_cublas_f8(
            lambda xq, xs, v, s, form=form: k8.fp8_matmul_xla(xq, xs, v, s, out_dtype=BF16, form=form),
            (x_q, x_s, vals[0], scs[0])) for form in ("direct", "converted")}
        results.append(row)
        print_micro_row(row)
    return results


def sweep_candidates(m, n, k) -> list:
    out = []
    for bn in (64, 128, 256):
        for ks in (1, 2, 4, 8):
            bm = 64 if m <= 64 else 128
            if n % bn or k % (128 * ks) or bn > 256 or (k // (128 * ks)) < 2:
                continue
            out.append(k8.Fp8MatmulBlockSizes(block_m=bm, block_n=bn, block_k=128, k_splits=ks))
    return out[:8]


def print_micro_row(row):
    parts = []
    for name, v in row["variants"].items():
        if "error" in v:
            parts.append(f"{name}: FAILED ({v['error']})")
        else:
            flag = "" if v["ok"] else f" WRONG(err {v['rel_err']:.1e})"
            parts.append(f"{name} {v['us']:7.1f}us {v['tflops']:6.1f}TF {v['gbps']:6.0f}GB/s{flag}")
    good = {k: v for k, v in row["variants"].items() if "us" in v and v["ok"]}
    best = min(good, key=lambda k: good[k]["us"]) if good else None
    speed = (f"best {best} ({row['variants']['bf16']['us'] / good[best]['us']:.2f}x bf16)"
             if best and "us" in row["variants"].get("bf16", {}) else "best -")
    print(f"  {row['class']:7s} {row['label']:17s} M={row['M']:<4d} K={row['K']:<5d} N={row['N']:<5d} "
          f"cublas f8 (direct/converted): {row['cublas_f8']['direct']}/{row['cublas_f8']['converted']}  {speed}")
    for p in parts:
        print(f"      {p}")
    row["best"] = best


# --- 2./3. end to end ------------------------------------------------------------------------------------------------


def device_random_params(config, dtype) -> dict:
    """checkpoints.random_init's layout and per-key scales, drawn on the device in one executable (numpy needs
    about a minute for the full model's 3.35 B values)."""
    items = sorted(param_shapes(config).items())
    scales = [np.float32(random_init._scale(path, shape)) for path, shape in items]

    @jax.jit
    def draw(key):
        return [(jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * s).astype(dtype)
                for i, ((_, shape), s) in enumerate(zip(items, scales, strict=True))]

    arrays = draw(jax.random.key(0, impl="unsafe_rbg"))  # RngBitGenerator: compiles far faster than threefry
    return unflatten({path: a for (path, _), a in zip(items, arrays, strict=True)})


@functools.partial(jax.jit, static_argnames="dtype")
def cast_unquantized(params, dtype):
    return jax.tree.map(lambda a: a if isinstance(a, f8.Fp8Weight) else a.astype(dtype), params,
                        is_leaf=lambda a: isinstance(a, f8.Fp8Weight))


def time_sample(params, obs, noise, kernels, *, repeats: int):
    t0 = time.perf_counter()
    actions = jax.block_until_ready(sampler.sample_actions(params, obs, noise=noise, num_steps=10, kernels=kernels))
    first = time.perf_counter() - t0
    for _ in range(2):
        jax.block_until_ready(sampler.sample_actions(params, obs, noise=noise, num_steps=10, kernels=kernels))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(sampler.sample_actions(params, obs, noise=noise, num_steps=10, kernels=kernels))
        ts.append(time.perf_counter() - t0)
    return np.asarray(actions, np.float32), statistics.median(ts), first


def phase_split(params, obs, noise, kernels, *, repeats: int) -> dict | None:
    try:
        from pi05_jax.bench import implementations

        p = implementations.phased(sampler.IMPLEMENTATIONS[kernels], params, obs, 10)
        vision = jax.jit(p.vision)
        prefill = jax.jit(p.prefill)
        denoise = jax.jit(p.denoise)
        v = jax.block_until_ready(vision(p.params, obs))
        pre = jax.block_until_ready(prefill(p.params, obs, v))
        jax.block_until_ready(denoise(p.params, pre, noise))
        times = {"vision": [], "prefill": [], "denoise": []}
        for i in range(repeats + 2):
            for name, (fn, args) in {"vision": (vision, (p.params, obs)), "prefill": (prefill, (p.params, obs, v)),
                                     "denoise": (denoise, (p.params, pre, noise))}.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
        return {k: statistics.median(v) for k, v in times.items()}
    except Exception as e:
        say(f"phase split for {kernels} failed: {type(e).__name__}: {str(e)[:200]}")
        return None


def fp8_floors(config, params_fp8, rates) -> dict | None:
    try:
        from pi05_jax.bench import roofline

        work = roofline.Workload(batch=1, views=2, prompt_len=60, num_steps=10)
        costs = roofline.phase_costs(config, work, roofline.FLOOR,
                                     weight_bytes=roofline.weight_bytes_from_params(params_fp8), act_bytes=2)
        return roofline.floor(costs, roofline.Rates(rates["f8_flops"], rates["bytes_per_s"]))
    except Exception as e:
        say(f"FP8 floor failed: {type(e).__name__}: {e}")
        return None


def measure_rates(full: bool) -> dict:
    n = 8192 if full else 256
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(jnp.float8_e4m3fn)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(jnp.float8_e4m3fn)
    f = jax.jit(lambda a, b: k8.fp8_matmul_xla(a, 1.0, b, 1.0, out_dtype=BF16))
    _, t, _ = timed(lambda a, b: [f(a, b)], (a, b), copies=1, repeats=10)
    size = (1 << 30) if full else (1 << 24)
    buf = jnp.ones((size // 4,), jnp.float32)
    g = jax.jit(lambda x: x + 1)
    _, tb, _ = timed(lambda x: [g(x)], (buf,), copies=1, repeats=10)
    return {"f8_flops": 2 * n**3 / t, "bytes_per_s": 2 * size / tb}


def gates(actions, ref) -> dict:
    a, r = np.asarray(actions, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    cos = float(a @ r / (np.linalg.norm(a) * np.linalg.norm(r)))
    mse = float(np.mean((a - r) ** 2))
    return {"cosine": cos, "mse": mse, "pass": bool(cos >= GATE["cosine"] and mse <= GATE["mse"]
                                                    and np.all(np.isfinite(a)))}


def end_to_end(full: bool, *, repeats: int, budget_s: float, host_random: bool, kernels: list[str],
               fp8_backends: list[str]) -> dict:
    config = preset("full" if full else "tiny")
    say(f"end to end: {'full' if full else 'tiny'} model, random weights "
        f"({'random_init.random_params on the host' if host_random else 'drawn on the device'})")
    if host_random:
        params32 = jax.device_put(random_init.random_params(config, seed=0))
    else:
        params32 = device_random_params(config, jnp.float32)
    params16 = cast_unquantized(params32, dtype=BF16)
    t0 = time.perf_counter()
    q = quantize_params(params32)
    params8 = jax.block_until_ready(cast_unquantized(q, dtype=BF16))
    say(f"quantized in memory in {time.perf_counter() - t0:.1f} s")
    obs = synthetic_observation(config, views=2, prompt_len=60)
    noise = synthetic_noise(config)
    out = {"configs": {}, "gates": {}}

    with jax.default_matmul_precision("highest"):
        ref32, t32, _ = time_sample(params32, obs, noise, "reference", repeats=2)
    say(f"float32 reference (HIGHEST): {t32 * 1e3:.1f} ms")
    del params32

    by_label = {"bf16": params16, "fp8-xla": params8, "fp8-mosaic": f8.with_options(params8, backend="pallas"),
                "fp8-triton": f8.with_options(params8, backend="pallas_triton")}
    unknown = [b for b in fp8_backends if f"fp8-{b}" not in by_label]
    if unknown:
        raise ValueError(f"unknown --fp8-backends {unknown}; choose from xla, mosaic, triton")
    configs = []
    for k in kernels:
        if k not in sampler.IMPLEMENTATIONS:
            say(f"kernels {k!r} not registered; skipped")
            continue
        # The reference (upstream's computation) only with XLA f8; the fast path with every FP8 backend asked for.
        labels = ["bf16"] + [f"fp8-{b}" for b in (fp8_backends if k != "reference" else fp8_backends[:1])]
        configs += [(label, by_label[label], k) for label in labels]
    for label, params, impl in configs:
        name = f"{label}/{impl}"
        if elapsed() > budget_s * 0.85:
            say(f"time budget reached, skipping {name}")
            continue
        try:
            actions, t, first = time_sample(params, obs, noise, impl, repeats=repeats)
        except Exception as e:
            say(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            out["configs"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        g = gates(actions, ref32)
        out["configs"][name] = {"median_ms": t * 1e3, "first_call_s": first, **{f"vs_fp32_{k}": v
                                                                                 for k, v in g.items()}}
        say(f"{name:24s} {t * 1e3:8.2f} ms  (first call {first:.1f} s)  vs fp32: cos {g['cosine']:.5f} "
            f"MSE {g['mse']:.2e} {'PASS' if g['pass'] else 'FAIL'}" + ("" if label != "bf16" else " (context)"))

    # Per-phase split of the fastest bf16 and FP8 configurations with the fast kernels.
    ok = {k: v for k, v in out["configs"].items() if "median_ms" in v}
    picks = []
    for prefix in ("bf16/", "fp8-"):
        cands = [k for k in ok if k.startswith(prefix) and not k.endswith("/reference")] or \
                [k for k in ok if k.startswith(prefix)]
        if cands:
            picks.append(min(cands, key=lambda k: ok[k]["median_ms"]))
    rates = measure_rates(full)
    say(f"measured: f8 matmul {rates['f8_flops'] / 1e12:.0f} TFLOP/s, copy {rates['bytes_per_s'] / 1e12:.2f} TB/s")
    floors = fp8_floors(config, params8, rates)
    out["rates"] = rates
    for name in picks:
        if elapsed() > budget_s * 0.93:
            say(f"time budget reached, no phase split for {name}")
            continue
        label, impl = name.split("/")
        split = phase_split(by_label[label], obs, noise, impl, repeats=repeats)
        out["configs"][name]["phases_ms"] = None if split is None else {k: v * 1e3 for k, v in split.items()}
        if split:
            line = "  ".join(f"{ph} {split[ph] * 1e3:.2f} ms" for ph in ("vision", "prefill", "denoise"))
            if floors and label != "bf16":
                line += "   | FP8 floor: " + "  ".join(
                    f"{ph} {floors[ph]['floor_s'] * 1e3:.2f} ms ({floors[ph]['bound']}, "
                    f"{floors[ph]['floor_s'] / split[ph] * 100:.0f}%)" for ph in ("vision", "prefill", "denoise"))
            say(f"phases {name}: {line}")
    out["fp8_floor_ms"] = None if floors is None else {k: v["floor_s"] * 1e3 for k, v in floors.items()}

    # 100 consecutive inferences with the fastest FP8 configuration: all finite.
    fp8_ok = [k for k in ok if k.startswith("fp8-")]
    if fp8_ok:
        best = min(fp8_ok, key=lambda k: ok[k]["median_ms"])
        label, impl = best.split("/")
        bad = 0
        for i in range(100):
            a = sampler.sample_actions(by_label[label], obs, noise=synthetic_noise(config, seed=i), num_steps=10,
                                       kernels=impl)
            bad += int(not np.all(np.isfinite(np.asarray(a))))
        out["nan_check"] = {"config": best, "runs": 100, "non_finite_runs": bad}
        say(f"100 consecutive inferences ({best}): {bad} with NaN/Inf")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, choices=["full", "tiny"], help="default: full on GPU, tiny on CPU")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also try a few Mosaic block sizes on 4 shapes")
    ap.add_argument("--host-random", action="store_true", help="random_init.random_params (numpy, slower)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--kernels", default="reference,pallas", help="implementations end to end (default: %(default)s)")
    ap.add_argument("--fp8-backends", default="xla,mosaic,triton",
                    help="FP8 matmul backends end to end, first = the one used with 'reference' (default: %(default)s)")
    ap.add_argument("--budget-s", type=float, default=230.0, help="stop starting new items after this (seconds)")
    ap.add_argument("--json", default=None, metavar="OUT.json")
    args = ap.parse_args()
    gpu = jax.default_backend() == "gpu"
    full = (args.preset or ("full" if gpu else "tiny")) == "full"
    repeats = args.repeats or (20 if gpu else 3)
    say(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"{'full' if full else 'tiny'} sizes, FP8 default backend {f8.resolve_backend('auto')}")
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    failed = False
    if not args.skip_micro:
        say("1. matmuls (us per op; TFLOP/s; GB/s of weights + activations)")
        try:
            report["micro"] = micro(SHAPES_FULL if full else SHAPES_TINY, repeats=repeats, budget_s=args.budget_s,
                                    sweep=args.sweep)
            wrong = [(r["label"], k) for r in report["micro"] for k, v in r["variants"].items()
                     if "ok" in v and not v["ok"]]
            failed |= bool(wrong)
            if wrong:
                say(f"WRONG results: {wrong}")
        except Exception:
            traceback.print_exc()
            failed = True
    if not args.skip_e2e:
        say("2./3. end to end and accuracy gates (2 views + 60 tokens, 10 steps, batch 1)")
        try:
            report["e2e"] = end_to_end(full, repeats=repeats, budget_s=args.budget_s, host_random=args.host_random,
                                       kernels=args.kernels.split(","), fp8_backends=args.fp8_backends.split(","))
            gated = [v for k, v in report["e2e"]["configs"].items() if k.startswith("fp8") and "median_ms" in v]
            failed |= not gated or not all(v["vs_fp32_pass"] for v in gated)
            failed |= report["e2e"].get("nan_check", {}).get("non_finite_runs", 1) != 0
        except Exception:
            traceback.print_exc()
            failed = True
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    say(f"done: {'FAIL' if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

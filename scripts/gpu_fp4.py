#!/usr/bin/env python3
"""FP4 weight-only MLPs on the GPU: kernel correctness and speed vs bf16, then the 10-step denoise loop.

    python scripts/gpu_fp4.py            # H100: ~2-3 minutes
    python scripts/gpu_fp4.py --quick    # fewer tile configs
    python scripts/gpu_fp4.py --tiny     # smoke test of this script on the CPU (interpret mode, tiny shapes)

Part 1, matmuls at the MLP shapes (expert M=50: gate/up [2,1024,4096], down [4096,1024]; prefix M=600:
gate/up [2,2048,16384], down [16384,2048]). Each op runs inside a lax.scan over L distinct weight copies (like the
model's layers, so the weights stream from HBM, not L2); per-layer time = median scan time / L. Reported: the error
of `fp4_matmul` vs `fp4_matmul_reference` (dequantize + float32 matmul), the per-layer time of XLA's bf16 einsum
and of the FP4 kernel for several tile configs, and the achieved bandwidth = bytes of weights read / time
(FP4: packed codes + e4m3 scales; bf16: 2 bytes per weight). The glue op that chains the scan iterations (a tiny
elementwise update of x) is timed alone and printed so it can be subtracted.

Part 2, the denoise loop (batch 1, 10 steps, full-size expert with random weights, 572 valid prefix tokens): the
FP4 MLP weights are random e2m1 codes with random e4m3 block scales and a power-of-two tensor scale, so the same
weights dequantized to bf16 are exact; bf16 runs use those dequantized weights and FP4 runs the kernel, so actions
must agree to bf16 rounding. Timed: `sampler.reference_denoise` (upstream's loop) and, when available, the fast path
`denoise_fast.denoise` (adaRMS table precomputed, XLA and Pallas attention), bf16 vs FP4.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.fp4_matmul import (
    DEQUANT_VARIANTS,
    Fp4MatmulBlockSizes,
    default_block_sizes,
    fp4_matmul,
    fp4_matmul_reference,
)
from pi05_jax.quantized.fp4_weight import Fp4Weight

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpu_common import median_seconds

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def median_time(fn, *args, repeats: int = 20, warmup: int = 2) -> float:
    return median_seconds(fn, *args, repeats=repeats, warmup=warmup)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- random FP4 operands (on the device, never zeros) -------------------------------------------------------------


def random_fp4(key, lead: tuple, k: int, n: int, target_std: float):
    """Packed codes (uniform over all 16 e2m1 codes), e4m3 scale bytes in [1, 2) x 2^{-1..0}, and a power-of-two
    tensor scale per leading index so that the dequantized weights have ~target_std and are exact in bf16."""
    k1, k2 = jax.random.split(key)
    packed = jax.random.bits(k1, (*lead, k // 2, n), jnp.uint8)
    scales = jax.random.randint(k2, (*lead, k // 16, n), 0x30, 0x40).astype(jnp.uint8)  # e4m3 0.5 .. 1.875
    code_rms = float(np.sqrt(np.mean(np.array([0, .5, 1, 1.5, 2, 3, 4, 6]) ** 2)))
    ts = 2.0 ** np.round(np.log2(target_std / (code_rms * 1.1)))
    tensor_scale = jnp.full(lead[:1], ts, jnp.float32) if lead else jnp.float32(ts)
    return packed, scales, tensor_scale


# --- part 1: matmuls -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    m: int
    k: int  # contracted
    n: int
    g: int | None  # 2 for gate/up (weights [2, K, N]), None for the down-projection
    layers: int  # distinct weight copies the scan walks through


def _glue(x, y, shape: Shape):
    """Make iteration i+1 depend on iteration i at negligible cost: add a slice of y into x."""
    y2 = y[0] if shape.g else y
    width = min(shape.k, shape.n)
    return jax.lax.dynamic_update_slice(x, x[:, :width] + (y2[:, :width] * 1e-3).astype(x.dtype), (0, 0))


def scan_fn(op, shape: Shape):
    def run(x, ws):
        def body(x, w):
            return _glue(x, op(x, w), shape), None

        return jax.lax.scan(body, x, ws)[0]

    return jax.jit(run)


def bench_shape(shape: Shape, configs: list, interpret: bool, repeats: int, deadline: float,
                min_configs: int = 4) -> Fp4MatmulBlockSizes | None:
    """Time bf16 and the FP4 configs at one shape; returns the fastest correct FP4 config."""
    key = jax.random.key(hash(shape.name) % 2**31)
    kx, kw, kb = jax.random.split(key, 3)
    lead = (shape.layers, shape.g) if shape.g else (shape.layers,)
    x = jax.random.normal(kx, (shape.m, shape.k), jnp.float32).astype(jnp.bfloat16)
    packed, scales, ts = random_fp4(kw, lead, shape.k, shape.n, shape.k**-0.5)
    w_bf16 = (jax.random.normal(kb, (*lead, shape.k, shape.n), jnp.float32) * shape.k**-0.5).astype(jnp.bfloat16)
    g = shape.g or 1
    fp4_bytes = g * shape.k * shape.n // 2 + g * shape.k * shape.n // 16
    bf16_bytes = g * shape.k * shape.n * 2

    eqn = "MK,GKN->GMN" if shape.g else "MK,KN->MN"
    t_bf16 = median_time(scan_fn(lambda x, w: jnp.einsum(eqn, x, w), shape), x, w_bf16, repeats=repeats)
    t_bf16 /= shape.layers
    t_glue = median_time(scan_fn(lambda x, w: jnp.broadcast_to(x[:, :1], (g, shape.m, shape.n)) if shape.g
                                 else jnp.broadcast_to(x[:, :1], (shape.m, shape.n)), shape),
                         x, w_bf16[..., :1, :1], repeats=repeats) / shape.layers
    log(f"{shape.name}: M={shape.m} K={shape.k} N={shape.n} G={g} | bf16 einsum {t_bf16 * 1e6:7.1f} us/layer "
        f"({bf16_bytes / t_bf16 / 1e9:6.0f} GB/s) | glue alone {t_glue * 1e6:5.1f} us")

    best = None
    for i, bs in enumerate(configs):
        label = "default" if bs is None else _short(bs)
        if i >= min_configs and time.perf_counter() - T0 > deadline:
            log(f"    (time budget: skipping {len(configs) - i} more tile configs)")
            break
        try:
            op = lambda x, w, bs=bs: fp4_matmul(x, w[0], w[1], w[2], block_sizes=bs, interpret=interpret)
            layer0 = jax.tree.map(lambda a: a[0], (packed, scales, ts))
            got = jax.jit(op)(x, layer0)
            want = fp4_matmul_reference(x, *layer0, out_dtype=jnp.float32)
            err = rel_err(got.astype(jnp.float32), want)
            t = median_time(scan_fn(op, shape), x, (packed, scales, ts), repeats=repeats) / shape.layers
        except Exception as e:  # report and go on: one bad tile config must not hide the others
            log(f"    fp4 {label:44s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        ok = "ok" if err < 1e-2 else "WRONG"
        log(f"    fp4 {label:44s} {t * 1e6:7.1f} us/layer  {fp4_bytes / t / 1e9:6.0f} GB/s  "
            f"x{t_bf16 / t:4.2f} vs bf16  rel err {err:.1e} {ok}")
        if err < 1e-2 and (best is None or t < best[0]):
            best = (t, label, bs or default_block_sizes(shape.m, shape.k, shape.n, g))
    if best:
        log(f"  best {shape.name}: {best[1]} {best[0] * 1e6:.1f} us/layer, {fp4_bytes / best[0] / 1e9:.0f} GB/s "
            f"({fp4_bytes / 1e6:.2f} MB read), x{t_bf16 / best[0]:.2f} vs bf16")
        return best[2]
    return None


def _short(bs: Fp4MatmulBlockSizes) -> str:
    reduce = "+atomic" if bs.k_splits > 1 and bs.split_reduce == "atomic" else ""
    return (f"m{bs.block_m} n{bs.block_n} k{bs.block_k} s{bs.k_splits}{reduce} w{bs.num_warps} "
            f"st{bs.num_stages} {bs.dequant}")


def configs_for(shape: Shape, quick: bool) -> list:
    """The default tiles with every dequant variant first, then tile / split variations of "f16asm" (the fewest
    instructions per weight) and a few of "f16", most informative first (the sweep stops at the time budget)."""
    base = default_block_sizes(shape.m, shape.k, shape.n, shape.g or 1)
    out: list = [None] + [dataclasses.replace(base, dequant=d) for d in DEQUANT_VARIANTS if d != base.dequant]
    ks = base.k_splits
    for dequant in ("f16asm", "f16"):
        rep = lambda dequant=dequant, **kw: dataclasses.replace(base, dequant=dequant, **kw)
        if shape.m <= 128:
            out += [rep(k_splits=2 * ks, split_reduce="atomic"),
                    rep(block_n=256, k_splits=4 * ks, split_reduce="atomic"),
                    rep(block_n=64, k_splits=ks), rep(block_n=256, k_splits=2 * ks), rep(num_stages=4)]
            if ks > 1:
                out.append(rep(split_reduce="atomic"))
            if not quick and dequant == "f16asm":
                out += [rep(num_warps=8), rep(block_k=256, k_splits=max(1, ks // 2)), rep(num_stages=2),
                        rep(block_n=64, k_splits=2 * ks, split_reduce="atomic"), rep(k_splits=max(1, ks // 2))]
        elif dequant == "f16asm":
            out += [rep(block_m=256, num_warps=8), rep(block_n=256, num_warps=8), rep(block_k=128)]
    seen, uniq = set(), []
    for c in out:
        key = None if c is None else _short(c)
        if key not in seen and (c is None or shape.k % (c.k_splits * 2 * 16) == 0):
            seen.add(key)
            uniq.append(c)
    return uniq


# --- part 2: the denoise loop ----------------------------------------------------------------------------------------


def expert_params(key, config, *, depth: int | None = None):
    """Random full-size params of what denoising reads (the expert, its adaRMS, the action/time projections),
    with the expert MLPs as FP4 (random codes) and as their exact bf16 dequantization."""
    from checkpoints.layout import param_shapes, unflatten

    shapes = {p: s for p, s in param_shapes(config).items()
              if "/img/" not in p and ("_1" in p or not p.startswith("PaliGemma/llm/layers"))
              and "final_norm/" not in p and "embedder" not in p}
    if depth is not None:
        shapes = {p: (depth, *s[1:]) if p.startswith("PaliGemma/llm/layers") else s for p, s in shapes.items()}
    flat = {}
    for i, (path, shape) in enumerate(sorted(shapes.items())):
        last = path.split("/")[-1]
        if "norm_1/Dense_0" in path or last == "bias":
            scale = 0.02
        elif "attn_vec_einsum" in path:
            scale = (shape[-3] * shape[-2]) ** -0.5
        else:
            scale = shape[-2] ** -0.5
        flat[path] = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * scale).astype(jnp.bfloat16)
    flat["PaliGemma/llm/embedder/input_embedding"] = jnp.zeros((1, config.llm.width), jnp.bfloat16)  # dtype only
    params = unflatten(flat)
    mlp = params["PaliGemma"]["llm"]["layers"]["mlp_1"]
    fp4, bf16 = {}, {}
    for j, leaf in enumerate(("gating_einsum", "linear")):
        w = mlp[leaf]
        k, n = w.shape[-2:]
        lead_shape = w.shape[:-2]
        packed, scales, ts = random_fp4(jax.random.fold_in(key, 1000 + j), lead_shape, k, n, k**-0.5)
        fw = Fp4Weight(packed, scales, ts)
        fp4[leaf] = fw
        bf16[leaf] = fw.dequantize(jnp.bfloat16)
    return _with_mlp(params, fp4), _with_mlp(params, bf16)


def _with_mlp(params, mlp):
    layers = {**params["PaliGemma"]["llm"]["layers"], "mlp_1": mlp}
    return {**params, "PaliGemma": {**params["PaliGemma"], "llm": {**params["PaliGemma"]["llm"], "layers": layers}}}


def _with_block_sizes(params, choose):
    """params whose FP4 MLP leaves use `choose(leaf_name, m, k, n, g)` as their block sizes."""
    mlp = params["PaliGemma"]["llm"]["layers"]["mlp_1"]
    new = {}
    for leaf, w in mlp.items():
        *lead, k, n = w.shape
        g = lead[-1] if len(lead) == 2 else 1
        new[leaf] = dataclasses.replace(w, block_sizes=choose(leaf, k, n, g))
    return _with_mlp(params, new)


def bench_denoise(config, *, depth, prefix_len, valid, repeats, deadline, tuned: dict, num_steps=10) -> None:
    """`tuned`: {"gating_einsum" / "linear": the fastest block sizes measured in part 1} (may be empty)."""
    from pi05_jax import sampler

    key = jax.random.key(7)
    fp4_params, bf16_params = expert_params(key, config, depth=depth)
    d = depth or config.expert.depth
    kv_shape = (d, 1, prefix_len, config.llm.num_kv_heads, config.llm.head_dim)
    kk, kv_, kn = jax.random.split(jax.random.key(8), 3)
    k = jax.random.normal(kk, kv_shape, jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(kv_, kv_shape, jnp.float32).astype(jnp.bfloat16)
    noise = jax.random.normal(kn, (1, config.action_horizon, config.action_dim), jnp.float32)
    mask = jnp.arange(prefix_len)[None, :] < valid
    prefix = sampler.Prefix(kv=(k, v), mask=mask, suffix_start=jnp.full((1,), valid, jnp.int32))
    mlp_mb = sum(leaf.nbytes for leaf in fp4_params["PaliGemma"]["llm"]["layers"]["mlp_1"].values()) / 1e6
    log(f"denoise: expert depth {d}, prefix {valid}/{prefix_len} tokens, {num_steps} steps, batch 1; "
        f"MLP weights read per step: FP4 {mlp_mb:.1f} MB, bf16 {mlp_mb * 32 / 9:.1f} MB")
    m = config.action_horizon
    asm = lambda leaf, k, n, g: dataclasses.replace(default_block_sizes(m, k, n, g), dequant="f16asm")
    runs = [("bf16", bf16_params)]
    if tuned:  # first, so the time budget keeps it
        log("  fp4-tuned: " + ", ".join(f"{leaf} {_short(bs)}" for leaf, bs in tuned.items()))
        pick = lambda leaf, k, n, g: tuned.get(leaf) or default_block_sizes(m, k, n, g)
        runs.append(("fp4-tuned", _with_block_sizes(fp4_params, pick)))
    runs += [("fp4", fp4_params), ("fp4-f16asm", _with_block_sizes(fp4_params, asm))]

    results: dict = {}

    def timed(path, label, fn, *args):
        if label != "bf16" and time.perf_counter() - T0 > deadline:
            log(f"  {path} {label}: skipped (time budget)")
            return
        try:
            out = np.asarray(fn(*args))
            results[(path, label)] = (median_time(fn, *args, repeats=repeats), out)
        except Exception as e:
            log(f"  {path} {label} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")

    ref = jax.jit(sampler.reference_denoise, static_argnames="num_steps")
    for label, params in (("bf16", bf16_params), ("fp4", fp4_params)):
        timed("reference", label, ref, params, prefix, noise, num_steps)
    try:
        from pi05_jax import denoise_fast, fast_path
        from pi05_jax.compact_prefix import CompactPrefix

        bucket = -(-valid // 64) * 64
        cprefix = CompactPrefix(kv=(k[:, :, :bucket], v[:, :, :bucket]), lengths=jnp.full((1,), valid, jnp.int32))
        for attn_name, attn in (("xla", denoise_fast.xla_suffix_attention),
                                ("pallas", fast_path.pallas_suffix_attention)):
            fn = jax.jit(lambda p, pre, x, attn=attn: denoise_fast.denoise(p, pre, x, num_steps,
                                                                              suffix_attention=attn))
            for label, params in runs:
                timed(f"fast/{attn_name}", label, fn, denoise_fast.with_constants(params, num_steps), cprefix, noise)
    except ImportError as e:
        log(f"  fast path not available: {e}")

    for path in dict.fromkeys(p for p, _ in results):
        if (path, "bf16") not in results:
            continue
        tb, ab = results[(path, "bf16")]
        log(f"  {path:12s} bf16      {tb * 1e3:7.3f} ms")
        for label, _ in runs[1:]:
            if (path, label) in results:
                tf, af = results[(path, label)]
                ok = "ok" if cosine(af, ab) > 0.999 else "MISMATCH"
                log(f"  {path:12s} {label:9s} {tf * 1e3:7.3f} ms  x{tb / tf:4.2f} vs bf16 | actions vs bf16 "
                    f"(same weights): cosine {cosine(af, ab):.6f} max|diff| {np.max(np.abs(af - ab)):.2e} {ok}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tile configs")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes, interpret mode")
    ap.add_argument("--skip-matmul", action="store_true")
    ap.add_argument("--skip-denoise", action="store_true")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--budget", type=float, default=170.0,
                    help="seconds; optional tile configs and FP4 denoise variants are skipped past it")
    args = ap.parse_args(argv)

    from pi05_jax.config import preset

    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    interpret = args.tiny or jax.default_backend() == "cpu"
    if args.tiny:
        shapes = [Shape("expert gate/up (tiny)", 50, 32, 64, 2, 4), Shape("expert down (tiny)", 50, 64, 32, None, 4),
                  Shape("prefix down (tiny)", 600, 128, 64, None, 2)]
        config, depth, prefix_len, valid = preset("tiny"), None, 968, 572
        repeats = 2
    else:
        shapes = [Shape("expert gate/up", 50, 1024, 4096, 2, 18), Shape("expert down", 50, 4096, 1024, None, 18),
                  Shape("prefix gate/up", 600, 2048, 16384, 2, 3), Shape("prefix down", 600, 16384, 2048, None, 3)]
        config, depth, prefix_len, valid = preset("full"), None, 968, 572
        repeats = args.repeats

    failures = 0
    expert, prefix = shapes[:2], shapes[2:]
    tuned: dict = {}

    def matmuls(group, deadline, min_configs):
        nonlocal failures
        for shape in group:
            try:
                configs = configs_for(shape, args.quick or args.tiny)
                best = bench_shape(shape, configs[:2] if args.tiny else configs, interpret, repeats, deadline,
                                   min_configs)
                if best is not None and shape.m <= 128:
                    tuned["gating_einsum" if shape.g else "linear"] = best
            except Exception:
                failures += 1
                log(f"{shape.name} FAILED:\n{traceback.format_exc()}")

    # Most important first: the denoise-sized matmuls, then the denoise loop, then the prefill-sized matmuls.
    if not args.skip_matmul:
        matmuls(expert, deadline=args.budget * 0.4, min_configs=4)
    if not args.skip_denoise:
        try:
            bench_denoise(config, depth=depth, prefix_len=prefix_len, valid=valid, repeats=repeats,
                          deadline=args.budget * 0.8, tuned=tuned)
        except Exception:
            failures += 1
            log(f"denoise FAILED:\n{traceback.format_exc()}")
    if not args.skip_matmul:
        matmuls(prefix, deadline=args.budget, min_configs=1)
    log(f"done ({failures} section failures)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

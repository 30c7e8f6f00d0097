#!/usr/bin/env python3
"""The fused expert layer (pi05_jax.denoise_fused) on the GPU: its kernels at the real shapes against XLA's unfused
ops, then the whole sampler `pallas` vs `fused` (full size, random bf16 weights).

    python scripts/gpu_fused_expert.py [--skip-micro] [--skip-e2e]

Part 1, per kernel (M = 50 action tokens, the expert's shapes, bf16 weights): 18 calls in one jit, each with its own
weight buffer (as the model's 18 layers, so weights stream from HBM), us per call = median / 18. XLA's side is the
unfused ops the fast path runs today (adaRMS norm + QKV einsum + RoPE; norm + gate/up einsum + GeGLU; gated residual
add after the out / down einsum). Each variant's output is checked against the XLA side (relative error).
Part 2, the sampler: `pallas`, `fused` and the HYBRIDS (some pieces of the fused layer as XLA ops), 2 views + 60
prompt tokens, 10 steps, batch 1: median of 20 warm calls, and each one's actions' cosine / relative error against
`pallas`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from gpu_common import cosine, median_seconds, rel_err, say, time_sample

from pallas_kernels.ada_norm_matmul import (
    AdaNormMatmulBlockSizes,
    ada_norm_matmul_geglu,
    ada_norm_matmul_rope,
)
from pallas_kernels.matmul_gated_residual import GatedResidualBlockSizes, matmul_gated_residual
from pi05_jax import gemma
from pi05_jax.denoise_fused import rope_angles

L, M, D, F, KH, G, H = 18, 50, 1024, 4096, 1, 8, 256
# (qkv, mlp_in, residual) pieces of denoise_fused.FusedExpertOptions timed beside `pallas` and `fused` (all "pallas")
HYBRIDS = [("xla", "xla", "pallas"), ("xla", "pallas", "pallas"), ("pallas", "xla", "pallas"), ("xla", "xla", "xla")]
P = KH * (G + 2)


def median_us(fn, *args, repeats=30):
    """us per call of one of the L chained calls in `fn`."""
    return median_seconds(fn, *args, repeats=repeats) * 1e6 / L


def micro(rng):
    bf = jnp.bfloat16

    def rand(*shape, scale=1.0, dtype=bf):
        return jnp.asarray(rng.standard_normal(shape) * scale, dtype)

    x = rand(M, D, dtype=jnp.float32)
    scale, shift, gate = rand(D, scale=0.1), rand(D, scale=0.1), rand(D, scale=0.5)
    gain = (1 + scale).astype(jnp.float32)
    positions = 572 + jnp.arange(M, dtype=jnp.int32)[None, :]
    cos, sin = rope_angles(positions, H, M)
    w_qkv = [rand(D, KH, G + 2, H, scale=D**-0.5) for _ in range(L)]
    w_gating = [rand(2, D, F, scale=D**-0.5) for _ in range(L)]
    w_o = [rand(G * H, D, scale=(G * H) ** -0.5) for _ in range(L)]
    w_down = [rand(F, D, scale=F**-0.5) for _ in range(L)]
    a_o, a_down = rand(M, G * H), rand(M, F)
    sw_qkv = [jnp.einsum("D,DPTC->PTC", shift.astype(jnp.float32), w.reshape(D, P, 2, H // 2).astype(jnp.float32))
              for w in w_qkv]
    sw_gating = [jnp.einsum("D,GDF->GF", shift.astype(jnp.float32), w.astype(jnp.float32)) for w in w_gating]
    gate32 = gate.astype(jnp.float32)

    def xla_qkv(x, ws):
        h = gemma.ada_rms_norm(x.astype(bf), scale[None], shift[None])
        return [jnp.concatenate([a.reshape(M, -1) for a in gemma.qkv_packed(h[None], w, positions)], -1)
                for w in ws]

    def fused_qkv(bs):
        def run(x, ws, sws):
            return [ada_norm_matmul_rope(x, gain, w.reshape(D, P, 2, H // 2), sw, cos, sin, group=G, block_sizes=bs)
                    for w, sw in zip(ws, sws, strict=True)]
        return run

    def xla_geglu(x, ws):
        h = gemma.ada_rms_norm(x.astype(bf), scale[None], shift[None])
        outs = []
        for w in ws:
            g_, u = jnp.einsum("MD,CDF->CMF", h, w)
            outs.append(jax.nn.gelu(g_, approximate=True) * u)
        return outs

    def fused_geglu(bs):
        def run(x, ws, sws):
            return [ada_norm_matmul_geglu(x, gain, w, sw, block_sizes=bs) for w, sw in zip(ws, sws, strict=True)]
        return run

    def xla_residual(a, ws, res):
        return [res + jnp.einsum("MK,KN->MN", a, w).astype(jnp.float32) * gate32 for w in ws]

    def fused_residual(bs):
        def run(a, ws, res):
            return [matmul_gated_residual(a, w, gate32, res + 0.0, block_sizes=bs) for w in ws]
        return run

    def compare(name, xla_fn, xla_args, variants, make, fused_args, reshape=lambda o: o):
        xla_jit = jax.jit(xla_fn)
        want = xla_jit(*xla_args)
        t_xla = median_us(xla_jit, *xla_args)
        say(f"{name}: XLA unfused {t_xla:7.2f} us/call")
        for bs in variants:
            try:
                run = jax.jit(make(bs))
                got = run(*fused_args)
                err = max(rel_err(np.asarray(reshape(g), np.float32), np.asarray(w_, np.float32))
                          for g, w_ in zip(got, want, strict=True))
                t = median_us(run, *fused_args)
                say(f"{name}: fused {bs} {t:7.2f} us/call  x{t_xla / t:.2f}  rel err vs XLA {err:.2e}")
            except Exception as e:  # a tile that does not compile is a finding, not a reason to stop
                say(f"{name}: fused {bs} FAILED {type(e).__name__}: {str(e)[:300]}")

    anm = AdaNormMatmulBlockSizes
    grb = GatedResidualBlockSizes
    compare("qkv+rope", xla_qkv, (x, w_qkv),
            [anm(block_n=16), anm(block_n=32), anm(block_n=64), anm(block_n=32, num_stages=4),
             anm(block_n=32, num_warps=8), anm(block_n=32, block_k=64), anm(block_n=16, block_k=256)],
            fused_qkv, (x, w_qkv, sw_qkv), reshape=lambda o: o.reshape(M, -1))
    compare("gate/up+geglu", xla_geglu, (x, w_gating),
            [anm(block_n=16), anm(block_n=32), anm(block_n=64), anm(block_n=32, num_stages=4),
             anm(block_n=64, num_warps=8), anm(block_n=32, block_k=64)],
            fused_geglu, (x, w_gating, sw_gating))
    res = rand(M, D, dtype=jnp.float32)
    variants = [grb(block_n=32, k_splits=s) for s in (1, 2, 4, 8)] + [grb(block_n=64, k_splits=s) for s in (4, 8)] + [
        grb(block_n=16, k_splits=4), grb(block_n=32, k_splits=4, num_stages=4)]
    compare("out-proj+residual", xla_residual, (a_o, w_o, res), variants, fused_residual, (a_o, w_o, res))
    compare("down-proj+residual", xla_residual, (a_down, w_down, res), [*variants, grb(block_n=32, k_splits=16)],
            fused_residual, (a_down, w_down, res))


def sampler_e2e(preset_name: str):
    from pi05_jax.bench.selection import Selection, build
    from pi05_jax.commands.common import Progress
    from pi05_jax.config import preset

    sel = Selection(config=preset(preset_name), source=f"preset:{preset_name}", checkpoint=None, preset=preset_name,
                    views=2, prompt_len=60, steps=10, batch=1, dtype="bfloat16", kernels=("pallas", "fused"), runs=1,
                    device="auto", platform=jax.default_backend(), seed=0)
    built = build(sel, Progress())
    params, obs = built.params, built.obs
    from pi05_jax.synthetic import synthetic_noise

    noise = synthetic_noise(sel.config, seed=0)
    from pi05_jax import denoise_fused, fast_path, sampler

    names = ["pallas", "fused"]
    for qkv, mlp_in, residual in HYBRIDS:
        opts = denoise_fused.FusedExpertOptions(qkv=qkv, mlp_in=mlp_in, residual=residual)
        impl = fast_path.make_implementation(f"fused[qkv={qkv},mlp_in={mlp_in},residual={residual}]",
                                             fast_path.FastPathOptions(attention="pallas", fused_expert=opts))
        sampler.register(impl)
        names.append(impl.name)
    out = {}
    for kernels in names:
        actions, first, times, compiles = time_sample(params, obs, noise, kernels, steps=10, repeats=20)
        out[kernels] = actions
        say(f"sampler {kernels}: first call {first:.1f} s, median {np.median(times) * 1e3:.2f} ms "
            f"[p10 {times[2] * 1e3:.2f} - p90 {times[17] * 1e3:.2f}], compilations in timed calls: {compiles}")
    for name in names[1:]:
        say(f"{name} vs pallas actions: cosine {cosine(out[name], out['pallas']):.6f}, "
            f"rel err {rel_err(out[name], out['pallas']):.2e}, finite {bool(np.isfinite(out[name]).all())}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--preset", default="full", help="model size for part 2 (tiny: a CPU smoke test)")
    args = ap.parse_args()
    say(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    if not args.skip_micro:
        micro(np.random.default_rng(0))
    if not args.skip_e2e:
        sampler_e2e(args.preset)


if __name__ == "__main__":
    main()

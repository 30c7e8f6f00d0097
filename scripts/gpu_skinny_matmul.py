#!/usr/bin/env python3
"""Skinny matmuls (M = 50) of the action expert on the GPU: XLA's GEMMs on openpi's [K, N] weights against
pallas_kernels.skinny_matmul on transposed [N, K] weights, in chains shaped like the denoise loop.

Each chain runs 18 "layers", each with its own weights (so weights come from HBM, as in the model): the op, then a
small elementwise update of the [50, 1024] stream that the next layer reads (the same in every variant). Reported:
microseconds per layer (median of --repeats calls of the whole chain / 18), the achieved weight bandwidth, and
each Pallas variant's relative error against XLA's result (bf16 weights and activations, random, never zeros).

    python scripts/gpu_skinny_matmul.py [--repeats 50]
    python scripts/gpu_skinny_matmul.py --l2   # each op at its default tiles, cold (18 weights) then warm (one)
    python scripts/gpu_skinny_matmul.py --pdl  # XLA vs Triton vs the Mosaic GPU PDL kernels, with and without PDL

`--pdl` adds pallas_kernels.pdl_matmul (Mosaic GPU, weight slab loaded into shared memory before
griddepcontrol.wait) at a few tiles, each with its griddepcontrol instructions and without, and one chain where
the PDL GeGLU feeds the PDL down projection directly (the model's gate/up -> down pair, no kernel between them).

`--l2` asks how much of each op's time is the weights' trip from HBM: the same chains, once with 18 different
weights (cold: every layer reads HBM) and once with one weight for all 18 layers (warm: after the first layer the
weight is in the 50 MB L2), default tiles only.
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
from gpu_common import median_seconds, rel_err, say

from pallas_kernels import pdl_matmul
from pallas_kernels.skinny_matmul import SkinnyBlockSizes, geglu_matmul, skinny_matmul

LAYERS, M, D, F = 18, 50, 1024, 4096
BF16 = jnp.bfloat16
# (block_n, block_k, num_warps, num_stages); 32 x 512 with 2 stages needs 256 KiB of shared memory (over 227)
GEGLU_TILES = [(32, 256, 4, 3), (32, 128, 4, 4), (32, 256, 8, 3), (32, 256, 4, 2), (64, 128, 4, 3)]
# (block_n, block_k, K splits, num_warps, num_stages)
PROJ_TILES = [(32, 256, 4, 4, 3), (32, 256, 8, 4, 3), (64, 256, 8, 4, 3), (32, 128, 8, 4, 4), (64, 128, 16, 4, 3),
              (32, 256, 2, 4, 3), (64, 256, 4, 4, 3)]
PDL = False  # --pdl: the Mosaic GPU PDL kernels too
# (block_n, K splits) of the PDL kernels per projection; the GeGLU's block_n
PDL_PROJ_TILES = {"down": [(32, 8), (64, 8), (64, 16)], "attn out": [(64, 8), (64, 4), (32, 8)],
                  "qkv": [(64, 4), (64, 2), (32, 4)]}
PDL_GEGLU_BLOCK_N = [32, 16]


WARM = False  # --l2's second pass: every layer of a chain reads the same weight


def _weights(key, shape, scale):
    keys = jax.random.split(key, LAYERS)
    if WARM:
        return [(jax.random.normal(keys[0], shape, jnp.float32) * scale).astype(BF16)] * LAYERS
    return [(jax.random.normal(k, shape, jnp.float32) * scale).astype(BF16) for k in keys]


def _stream(h, y):  # the next layer's input: the stream plus a sliver of the op's output
    return (h.astype(jnp.float32) + 1e-2 * y[:, :D].astype(jnp.float32)).astype(BF16)


def report(label, fn, args, nbytes, repeats, want=None):
    try:
        out = jax.block_until_ready(fn(*args))
    except Exception as e:  # e.g. a tile over the shared-memory limit: report it and go on with the others
        say(f"{label:44s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
        return None
    sec = median_seconds(fn, *args, repeats=repeats) / LAYERS
    line = f"{label:44s} {sec * 1e6:7.2f} us/layer  {nbytes / sec / 1e9:7.0f} GB/s"
    if want is not None:
        line += f"  rel err vs the first line {rel_err(np.asarray(out, np.float32), np.asarray(want, np.float32)):.1e}"
    say(line)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--l2", action="store_true", help="default tiles only, cold weights then L2-warm ones")
    ap.add_argument("--pdl", action="store_true", help="also the Mosaic GPU PDL kernels (pallas_kernels.pdl_matmul)")
    args = ap.parse_args()
    global PDL
    PDL = args.pdl
    say(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    if args.l2:
        global GEGLU_TILES, PROJ_TILES, WARM
        GEGLU_TILES, PROJ_TILES = GEGLU_TILES[:1], [(64, 256, 8, 4, 3), (32, 256, 2, 4, 3), (64, 256, 4, 4, 3)]
        say("cold: 18 weights per chain")
        run_all(args)
        WARM = True
        say("warm: one weight for the 18 layers of a chain (in L2 after the first)")
    run_all(args)


def run_all(args):
    key = jax.random.key(0)
    h0 = jax.random.normal(jax.random.fold_in(key, 1), (M, D), jnp.float32).astype(BF16)

    # gate/up + GeGLU: openpi's gating_einsum [2, D, F]
    wgu = _weights(jax.random.fold_in(key, 2), (2, D, F), D**-0.5)
    wgu_t = [jnp.swapaxes(w, 1, 2) for w in wgu]
    nbytes = 2 * D * F * 2

    @jax.jit
    def xla_geglu(h, ws):
        for w in ws:
            gate, up = jnp.einsum("TD,CDF->CTF", h, w)
            h = _stream(h, jax.nn.gelu(gate, approximate=True) * up)
        return h

    want = report("gate/up+GeGLU  XLA [2,K,F]", xla_geglu, (h0, wgu), nbytes, args.repeats)
    for bn, bk, warps, stages in GEGLU_TILES:
        bs = SkinnyBlockSizes(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)

        @jax.jit
        def pallas_geglu(h, ws, bs=bs):
            for w in ws:
                h = _stream(h, geglu_matmul(h, w, block_sizes=bs))
            return h

        report(f"gate/up+GeGLU  Pallas n{bn} k{bk} w{warps} s{stages}", pallas_geglu, (h0, wgu_t), nbytes,
               args.repeats, want)
    for bn in PDL_GEGLU_BLOCK_N if PDL else ():
        for use_pdl in (True, False):
            bs = pdl_matmul.fit_block_sizes(D, F, k_splits=1, block_n=bn, groups=2, pdl=use_pdl)

            @jax.jit
            def mosaic_geglu(h, ws, bs=bs):
                for w in ws:
                    h = _stream(h, pdl_matmul.pdl_geglu_matmul(h, w, block_sizes=bs))
                return h

            report(f"gate/up+GeGLU  Mosaic n{bn} {'PDL' if use_pdl else 'no PDL'}", mosaic_geglu, (h0, wgu_t),
                   nbytes, args.repeats, want)
    if PDL:
        pdl_pair(key, h0, wgu_t, args.repeats)

    # split-K projections with the residual add: down [F, D], attention out [2048, D], QKV [D, 2560]
    for name, k, n in [("down", F, D), ("attn out", 2048, D), ("qkv", D, 2560)]:
        ws = _weights(jax.random.fold_in(key, 3 + k + n), (k, n), k**-0.5)
        ws_t = [w.T for w in ws]
        x0 = jax.random.normal(jax.random.fold_in(key, 4), (M, k), jnp.float32).astype(BF16)
        nbytes = k * n * 2

        @jax.jit
        def xla_proj(h, x, ws):
            for w in ws:
                h = _stream(h, x @ w)
                x = x + h[:, :1].astype(x.dtype)  # the next layer's input depends on this one
            return h

        want = report(f"{name:8s} XLA [K,N] K={k} N={n}", xla_proj, (h0, x0, ws), nbytes, args.repeats)
        for bn, bk, splits, warps, stages in PROJ_TILES:
            if k % (splits * bk) or n % bn:
                continue
            bs = SkinnyBlockSizes(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)

            @jax.jit
            def pallas_proj(h, x, ws, bs=bs, splits=splits):
                for w in ws:
                    h = _stream(h, jnp.sum(skinny_matmul(x, w, k_splits=splits, block_sizes=bs), axis=0))
                    x = x + h[:, :1].astype(x.dtype)
                return h

            report(f"{name:8s} Pallas n{bn} k{bk} S{splits} w{warps} s{stages}", pallas_proj, (h0, x0, ws_t),
                   nbytes, args.repeats, want)
        for (bn, splits), use_pdl, in_flight in _pdl_projection_variants(name) if PDL else ():
            bs = pdl_matmul.fit_block_sizes(k, n, k_splits=splits, block_n=bn, pdl=use_pdl, x_in_flight=in_flight)

            @jax.jit
            def mosaic_proj(h, x, ws, bs=bs):
                for w in ws:
                    parts = pdl_matmul.pdl_matmul(x, w, k_splits=bs.k_splits, block_sizes=bs)
                    h = _stream(h, jnp.sum(parts, axis=0))
                    x = x + h[:, :1].astype(x.dtype)
                return h

            report(f"{name:8s} Mosaic n{bn} S{splits} x{in_flight} {'PDL' if use_pdl else 'no PDL'}", mosaic_proj,
                   (h0, x0, ws_t), nbytes, args.repeats, want)


def _pdl_projection_variants(name):
    """((block_n, K splits), PDL on, x tiles in flight): every tile with and without PDL at 4 x tiles in flight,
    then the first tile with 2 and 8 in flight."""
    tiles = PDL_PROJ_TILES[name]
    return [(t, p, 4) for t in tiles for p in (True, False)] + [(tiles[0], True, 2), (tiles[0], True, 8)]


def pdl_pair(key, h0, wgu_t, repeats):
    """gate/up + GeGLU then down, 18 layers, the GeGLU's output feeding the down projection directly (as in the
    model): Triton kernels vs the PDL kernels with and without their griddepcontrol instructions."""
    wd_t = [w.T for w in _weights(jax.random.fold_in(key, 9), (F, D), F**-0.5)]
    nbytes = 3 * D * F * 2

    def chain(geglu, down):
        @jax.jit
        def run(h, wgs, wds):
            for wg, wd in zip(wgs, wds, strict=True):
                h = _stream(h, jnp.sum(down(geglu(h, wg), wd), axis=0))
            return h
        return run

    triton = chain(lambda h, w: geglu_matmul(h, w), lambda a, w: skinny_matmul(a, w, k_splits=8,
                                                                               block_sizes=SkinnyBlockSizes(block_n=64)))
    want = report("gate/up -> down  Triton", triton, (h0, wgu_t, wd_t), nbytes, repeats)
    # down tiles: an (8, 32) program fits in shared memory beside a GeGLU program, (16, 64) and (8, 64) do not
    for (splits, bn), use_pdl in [((8, 32), True), ((8, 32), False), ((16, 64), True), ((8, 64), True)]:
        gbs = pdl_matmul.fit_block_sizes(D, F, k_splits=1, block_n=32, groups=2, pdl=use_pdl)
        dbs = pdl_matmul.fit_block_sizes(F, D, k_splits=splits, block_n=bn, pdl=use_pdl)
        mosaic = chain(lambda h, w, b=gbs: pdl_matmul.pdl_geglu_matmul(h, w, block_sizes=b),
                       lambda a, w, b=dbs: pdl_matmul.pdl_matmul(a, w, k_splits=b.k_splits, block_sizes=b))
        report(f"gate/up -> down n{bn} S{splits}  Mosaic {'PDL' if use_pdl else 'no PDL'}", mosaic,
               (h0, wgu_t, wd_t), nbytes, repeats, want)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""tokamax's GPU kernels against what pi05_jax runs, at pi0.5's shapes (issue 18: "tokamax ... is the candidate to
measure against; adopt it or say by how much ours wins").

Compared, bf16, CUPTI device time (jax.experimental.mosaic.gpu.profiler), median of 20 calls after warm-up:
- SigLIP attention, 2 images x 256 patches, 16 heads of 72: ours is XLA's einsum / softmax / einsum
  (pi05_jax.model.siglip.attention) against tokamax.dot_product_attention's implementations and JAX's own cuDNN
  fused attention (jax.nn.dot_product_attention(implementation="cudnn"), no tokamax needed; also below);
- the prefix LLM's attention, 576 slots (572 valid), 8 q heads : 1 KV head of 256, bidirectional over the valid
  keys: ours is pallas_kernels.ragged_prefill_attention (rows past the valid length are 0 and not compared);
- GeGLU gate/up: the prefix LLM's (M = 576, 2048 -> 2 x 16384; ours: XLA's einsum and GeGLU, as
  pi05_jax.model.gemma.feed_forward) and the action expert's (M = 50, 1024 -> 2 x 4096; ours:
  pallas_kernels.skinny_matmul.geglu_matmul), 18 layers with their own weights per call (HBM, not L2), against
  tokamax.gated_linear_unit's implementations.
Each tokamax result is checked against ours (relative error printed; an implementation that refuses a shape says
why and the others are still timed).

tokamax is not a dependency of this project: on the GPU machine (no package index) install its wheels first:
    bash scripts/device_wheels.sh --tokamax            (here: downloads them into build/device_wheels)
    (device) python3 -m pip install -q --no-index --no-deps --target /tmp/deps build/device_wheels/*.whl
             PYTHONPATH=$PWD:/tmp/deps python3 scripts/tokamax_compare.py
tokamax imports `xprof` (for its own benchmarking module only, which this script does not use); where xprof is not
installed a stand-in module without behaviour is registered, so the 30 MB profiler need not travel.
"""

from __future__ import annotations

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from device_time import device_us
from gpu_measure import rel_err

LAYERS = 18


def import_tokamax():
    try:
        import xprof.cli.tools  # noqa: F401
    except ImportError:
        tools = types.ModuleType("xprof.cli.tools")
        tools.get_kernel_stats_tool = None  # tokamax._src.benchmarking's import; never called here
        sys.modules.update({"xprof": types.ModuleType("xprof"), "xprof.cli": types.ModuleType("xprof.cli"),
                            "xprof.cli.tools": tools})
    import tokamax

    return tokamax


def compare(title: str, ours, theirs: dict, args, per: int = 1, valid=None) -> None:
    """Time `ours` and each of `theirs` (name -> fn) on args; `per` ops per call; `valid` slices the compared part."""
    cut = valid or (lambda y: y)
    print(f"{title}", flush=True)
    ours_out = np.asarray(cut(jnp.stack(ours(*args)) if per > 1 else ours(*args)).astype(jnp.float32))
    base = device_us(ours, *args) / per
    print(f"  {'ours':28s} {base:9.2f} us", flush=True)
    for name, fn in theirs.items():
        try:
            out = fn(*args)
            out = np.asarray(cut(jnp.stack(out) if per > 1 else out).astype(jnp.float32))
            us = device_us(fn, *args) / per
        except Exception as e:  # an implementation that refuses this shape or card: say why, time the others
            while isinstance(e, ExceptionGroup) and e.exceptions:  # tokamax wraps each implementation's error
                e = e.exceptions[0]
            msg = str(e).replace("\n", " ")[:240]
            print(f"  {name:28s} FAILED {type(e).__name__}: {msg}", flush=True)
            continue
        print(f"  {name:28s} {us:9.2f} us  x{base / us:5.2f} vs ours  rel err vs ours "
              f"{rel_err(out, ours_out):.1e}", flush=True)


def main() -> int:
    from pallas_kernels.ragged_prefill_attention import ragged_prefill_attention
    from pallas_kernels.skinny_matmul import geglu_matmul
    from pi05_jax.model import siglip
    from pi05_jax.model.linear import gelu_tanh

    if jax.default_backend() != "gpu":
        sys.exit("tokamax_compare: times GPU kernels; JAX sees no GPU")
    tk = import_tokamax()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, tokamax {tk.__version__}; bf16; CUPTI device "
          f"time, median of 20", flush=True)
    bf16 = jnp.bfloat16
    keys = iter(jax.random.split(jax.random.key(0), 8 + 4 * LAYERS))

    def normal(shape, scale=1.0):
        return (jax.random.normal(next(keys), shape, jnp.float32) * scale).astype(bf16)

    attention_impls = ("mosaic", "triton", "cudnn", "xla_chunked", "xla")

    # SigLIP attention: 2 views x 256 patches, 16 heads of 72
    q, k, v = (normal((2, 256, 16, 72)) for _ in range(3))
    scale = 72 ** -0.5
    ours = jax.jit(lambda q, k, v: siglip.attention((q * scale).astype(bf16), k, v, bf16))
    theirs = {f"tokamax {impl}": jax.jit(functools.partial(tk.dot_product_attention, scale=scale,
                                                           implementation=impl)) for impl in attention_impls}
    theirs["jax.nn cudnn"] = jax.jit(functools.partial(jax.nn.dot_product_attention, scale=scale,
                                                          implementation="cudnn"))
    compare("SigLIP attention [2, 256, 16, 72]", ours, theirs, (q, k, v))

    # prefix attention: 576 slots, 572 valid, 8 q heads : 1 KV head of 256, bidirectional over the valid keys
    valid = 572
    q, k, v = normal((1, 576, 8, 256)), normal((1, 576, 1, 256), 2.0), normal((1, 576, 1, 256))
    lengths = jnp.asarray([valid], jnp.int32)
    scale = 256 ** -0.5
    ours = jax.jit(lambda q, k, v: ragged_prefill_attention((q * scale).astype(bf16), k, v, lengths,
                                                            interpret=False))
    theirs = {f"tokamax {impl}": jax.jit(functools.partial(tk.dot_product_attention, scale=scale,
                                                           key_value_seq_lengths=lengths, implementation=impl))
              for impl in attention_impls}
    theirs["jax.nn cudnn"] = jax.jit(functools.partial(
        jax.nn.dot_product_attention, scale=scale, key_value_seq_lengths=lengths, implementation="cudnn"))
    compare(f"prefix attention [1, 576 ({valid} valid), 8 : 1 heads, 256]", ours, theirs, (q, k, v),
            valid=lambda y: y[:, :valid])

    # GeGLU gate/up, 18 layers with their own weights
    def gelu(x):  # a named function: tokamax serializes its arguments, and a functools.partial does not serialize
        return jax.nn.gelu(x, approximate=True)

    for label, m, d, f, ours_op in (
            ("prefix LLM", 576, 2048, 16384, "xla"), ("action expert", 50, 1024, 4096, "geglu_matmul")):
        x = normal((m, d))
        ws = [normal((d, 2, f), d ** -0.5) for _ in range(LAYERS)]  # tokamax's fused layout [K, 2, N]

        if ours_op == "xla":
            def one(x, w):
                gate, up = jnp.einsum("MD,DCF->CMF", x, w)
                return gelu_tanh(gate) * up
            ours_args = (x, ws)
        else:
            def one(x, w_t):
                return geglu_matmul(x, w_t, interpret=False)
            ours_args = (x, [jnp.transpose(w, (1, 2, 0)) for w in ws])  # [2, F, K], as the fast path packs it

        ours = jax.jit(lambda x, ws, one=one: [one(x, w) for w in ws])
        theirs = {impl: jax.jit(lambda x, ws, impl=impl: [
            tk.gated_linear_unit(x, w, activation=gelu, implementation=impl) for w in ws])
            for impl in ("mosaic", "triton", "xla")}

        def run_theirs(fn, ws=ws):  # tokamax's weight layout; `compare` hands every variant ours
            return lambda rows, _ours_ws: fn(rows, ws)

        compare(f"GeGLU gate/up, {label}: M={m}, {d} -> 2 x {f}, per layer ({LAYERS} layers per call)",
                ours, {f"tokamax {n}": run_theirs(fn) for n, fn in theirs.items()}, ours_args, per=LAYERS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

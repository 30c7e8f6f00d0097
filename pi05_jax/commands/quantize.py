"""`pi05 quantize`: write an FP8 (or FP8 + FP4) copy of an openpi checkpoint that every command loads as is.

FP8: SigLIP, prefix LLM and action expert linears (attention q/kv/out, MLP gating/linear; SigLIP q/k/v/out/MLP)
become e4m3 values with a float32 scale per output channel; the embedding table, norms, adaRMS Dense, SigLIP's
patch embedding and head, the action in/out projections and the time MLP stay as stored. Activations are
quantized at run time, per token, unless --calibration gives static per-tensor scales.
FP4 (--format fp4), for Blackwell / Jetson Thor, not faster on Hopper: the MLP gating/linear of the action expert
(--fp4-scope expert) or of the expert and the prefix LLM (expert+prefill) in NVFP4 (e2m1 + e4m3 block scales);
everything else FP8 as above. Hopper (H100, H200) has no FP4 tensor cores: there the kernel decodes the FP4 weights
in registers (fewer bytes, not less math), and through `pi05 infer` on an H200 an FP4 checkpoint ran slower than
bfloat16 (README's Status), so serve bfloat16 on Hopper.
"""

from __future__ import annotations

from pi05_jax.commands.common import Progress, UsageError, formatter

EPILOG = """\
The output is an openpi-layout checkpoint (params/ + the source's assets/) plus pi05_quantization.json naming the
format and every quantized key; `pi05 infer/demo/serve/bench/profile --checkpoint OUT` load it like any checkpoint
(the fast paths fuse its FP8 q/kv weights as they fuse bf16 ones).
On the GPU the FP8 matmuls run through XLA's cuBLASLt FP8 GEMM by default (see pi05_jax/quantized/fp8_weight.py
for the Pallas kernel option); on the CPU they are emulated (dequantize, float32 matmul).

--calibration takes model-level cases (`<case>/in/...`, the layout of model_cases.npz and `pi05 infer --inputs`):
the float model runs on them once and each quantized matmul gets a static activation scale (amax / 448) per layer.
Without it activations get one scale per token at run time (dynamic; as accurate, but a row-max pass per matmul).
On an H200 (docs/PERF.md, session 8) FP8 SigLIP + prefix with static scales ran 1.07x faster end to end than
bfloat16 and with dynamic scales 1.02x; the gain was all in the prefix LLM (SigLIP in FP8 was slower than
bfloat16), so for speed on Hopper: --parts prefix --calibration FILE (the prefix alone not yet timed end to end).

examples:
  pi05 quantize --checkpoint ckpt/pi05_libero --format fp8 --output ckpt/pi05_libero_fp8
  pi05 quantize --checkpoint ckpt/pi05_libero --format fp8 --calibration cases.npz --output ckpt/libero_fp8_static
  pi05 quantize --checkpoint ckpt/pi05_libero --format fp4 --fp4-scope expert --output ckpt/pi05_libero_fp4
                                                       (FP4: for Blackwell/Thor, not faster on Hopper)
  pi05 infer --checkpoint ckpt/pi05_libero_fp8 --inputs cases.npz --case libero_like --output out.npz
"""


def register(sub) -> None:
    p = sub.add_parser("quantize", help="write an FP8 / FP4 quantized copy of a checkpoint", description=__doc__,
                       epilog=EPILOG, formatter_class=formatter())
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="source openpi checkpoint (params/, assets/)")
    p.add_argument("--format", required=True, choices=["fp8", "fp4"], dest="fmt",
                   help="fp8: e4m3 linears; fp4: NVFP4 MLPs (--fp4-scope) and FP8 for the rest, for "
                        "Blackwell/Thor, not faster on Hopper")
    p.add_argument("--output", required=True, metavar="DIR2", help="where to write the quantized checkpoint")
    p.add_argument("--calibration", default=None, metavar="FILE.npz",
                   help="model-level cases for static activation scales (default: dynamic per-token scaling)")
    p.add_argument("--fp4-scope", default="expert", choices=["expert", "expert+prefill"],
                   help="with --format fp4: whose MLPs are FP4 (default: %(default)s)")
    p.add_argument("--parts", default="siglip,prefix,expert", metavar="LIST",
                   help="comma-separated FP8 parts: siglip, prefix, expert (default: all three)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run)


def run(args) -> int:
    from checkpoints.quantize import PARTS, Plan, quantize_checkpoint

    say = Progress(args.quiet)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UsageError(f"--parts: unknown {unknown or args.parts!r}; choose from {', '.join(PARTS)}")
    if args.fmt != "fp4" and args.fp4_scope != "expert":
        raise UsageError("--fp4-scope only applies to --format fp4")
    plan = Plan(fmt=args.fmt, parts=parts, fp4_scope=args.fp4_scope)
    manifest = quantize_checkpoint(args.checkpoint, args.output, plan=plan, calibration=args.calibration,
                                   overwrite=args.overwrite, progress=say)
    kinds: dict[str, int] = {}
    for entry in manifest["weights"].values():
        kinds[entry["format"]] = kinds.get(entry["format"], 0) + 1
    counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"quantized {counts} weights ({manifest['activation_scaling']} activation scaling) -> {args.output}")
    return 0

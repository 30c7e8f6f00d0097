"""`pi05 build-vision-engine`: export the checkpoint's SigLIP tower to ONNX and build a vision engine from it,
for `--vision tensorrt --vision-engine FILE.plan` (the tower runs inside the jitted sampler through an XLA custom
call). Every engine file gets a manifest `<FILE>.json` (image count, shapes, precision) that the sampler checks."""

from __future__ import annotations

import pathlib
import shutil
import sys

from pi05_jax.commands.common import Progress, UsageError, formatter

EPILOG = """\
One engine per image count: --views N is the number of images the engine takes per call (the valid views of a
batch, or batch x 3 view slots for the reference layout, which encodes every slot).

backends:
  tensorrt  (default) ONNX -> TensorRT builder -> FILE.plan. Needs `tensorrt` (the builder, not only the lean
            runtime); without it the command says what to install, and still writes --onnx-output.
  builtin   this package's own float32 engine file, run by the same custom call where TensorRT is absent
            (CPU in CI, GPUs without TensorRT).

precisions (tensorrt): fp32 (float32 parity, TF32 off), fp16 (default; strongly typed fp16 graph, LayerNorm
statistics in float32), fp8 (e4m3 weights per channel, activations per tensor with static scales from
--calibration images; Hopper or newer).

examples:
  pi05 build-vision-engine --checkpoint ckpt/ --views 2 --output siglip_v2_fp16.plan --onnx-output siglip_v2.onnx
  pi05 build-vision-engine --checkpoint ckpt/ --views 3 --precision fp32 --output siglip_v3_fp32.plan
  pi05 build-vision-engine --checkpoint ckpt/ --views 2 --precision fp8 --calibration model_cases.npz \\
      --output siglip_v2_fp8.plan
  pi05 build-vision-engine --checkpoint ckpt/ --views 3 --backend builtin --output siglip_v3.p5ve
  pi05 build-vision-engine --checkpoint ckpt/ --views 2 --precision fp16 --from-plan built_elsewhere.plan \\
      --output siglip_v2_fp16.plan      # adopt a plan built by trtexec from our --onnx-output
"""

EXIT_BUILD_FAILED = 1
EXIT_NO_TENSORRT = 3


def register(sub) -> None:
    p = sub.add_parser("build-vision-engine", help="export SigLIP to ONNX and build a TensorRT vision engine",
                       description=__doc__, epilog=EPILOG, formatter_class=formatter())
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="openpi checkpoint directory (params/)")
    p.add_argument("--views", required=True, type=int, metavar="N", help="images per engine call (static shape)")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "fp8"],
                   help="default: fp16 for tensorrt, fp32 (the only one) for builtin")
    p.add_argument("--output", required=True, metavar="FILE.plan", help="engine file to write (+ FILE.plan.json)")
    p.add_argument("--onnx-output", default=None, metavar="FILE.onnx", help="also keep the exported ONNX graph")
    p.add_argument("--backend", default="tensorrt", choices=["tensorrt", "builtin"], help="default: %(default)s")
    p.add_argument("--calibration", default=None, metavar="FILE.npz",
                   help="fp8: images for the activation scales: every float32 [n,224,224,3] array named "
                        "*images* in the file (e.g. the <case>/in/images/<view> of an inputs file)")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT builder workspace (default 4)")
    p.add_argument("--version-compatible", action="store_true",
                   help="build a plan that TensorRT's lean runtime (tensorrt-lean) can load")
    p.add_argument("--from-plan", default=None, metavar="PLAN",
                   help="do not build: adopt PLAN (built elsewhere from our ONNX) as --output and write its manifest")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run)


def load_calibration(path: str) -> object:
    import numpy as np

    file = pathlib.Path(path)
    if not file.is_file():
        raise UsageError(f"--calibration file {path!r} does not exist")
    z = np.load(file, allow_pickle=False)
    arrays = [z[k] for k in z.files if "images" in k and z[k].ndim == 4 and z[k].shape[-1] == 3]
    if not arrays:
        raise UsageError(f"--calibration file {path!r} has no [n,H,W,3] arrays with 'images' in their key")
    images = np.concatenate(arrays).astype(np.float32)
    images = images[np.abs(images).reshape(len(images), -1).max(axis=1) > 0]  # masked slots are all zeros
    if not len(images):
        raise UsageError(f"--calibration file {path!r}: every image is all zeros (masked slots)")
    return images


def run(args) -> int:
    from bridges import builtin_engine, siglip_params, tensorrt_engine
    from bridges.engine_manifest import write_manifest
    from bridges.vision_weights import load_vision_params

    say = Progress(args.quiet)
    if args.views < 1:
        raise UsageError(f"--views must be >= 1, got {args.views}")
    if args.precision is None:
        args.precision = "fp32" if args.backend == "builtin" else "fp16"
    if args.backend == "builtin" and args.precision != "fp32":
        raise UsageError(f"--backend builtin is float32 only, got --precision {args.precision}")
    if args.precision == "fp8" and not args.calibration and not args.from_plan:
        raise UsageError("--precision fp8 needs --calibration FILE.npz (real frames for the activation scales)")
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    say(f"reading the vision weights of {args.checkpoint}")
    _, img = load_vision_params(args.checkpoint)
    checkpoint = str(pathlib.Path(args.checkpoint).resolve())
    if args.backend == "builtin":
        manifest = builtin_engine.write_builtin_engine(img, output, views=args.views, checkpoint=checkpoint)
        say(f"wrote {output} and {output.name}.json ({manifest.views} images, fp32)")
        print(f"wrote {output} (builtin engine, {manifest.views} images -> {list(manifest.output_shape)} float32)")
        return 0

    spec = siglip_params.spec_from_params(img, views=args.views, precision=args.precision)
    if args.from_plan:
        return _adopt_plan(args, spec, checkpoint, say)
    try:
        from bridges import onnx_export
    except ModuleNotFoundError as e:
        raise UsageError(f"exporting ONNX needs the `onnx` extra ({e}): pip install -e '.[onnx]'") from e
    calibration = load_calibration(args.calibration) if args.precision == "fp8" else None
    say(f"exporting SigLIP ({spec.depth} layers, width {spec.width}) to ONNX, {args.precision}, "
        f"{args.views} images")
    model = onnx_export.export_siglip(img, views=args.views, precision=args.precision,
                                      calibration_images=calibration)
    onnx_path = pathlib.Path(args.onnx_output) if args.onnx_output else output.with_suffix(".build.onnx")
    written = onnx_export.save_onnx(model, onnx_path)
    if args.onnx_output:
        print(f"wrote {', '.join(str(w) for w in written)}")
    try:
        trt = tensorrt_engine.import_tensorrt()
    except tensorrt_engine.TensorRTUnavailable as e:
        if not args.onnx_output:
            for w in written:
                w.unlink()
        print(f"pi05 build-vision-engine: cannot build {output}: {e}", file=sys.stderr)
        return EXIT_NO_TENSORRT
    try:
        options = tensorrt_engine.BuildOptions(precision=args.precision, workspace_gib=args.workspace_gib,
                                               version_compatible=args.version_compatible)
        plan = tensorrt_engine.build_plan(onnx_path, options, trt=trt, say=say)
    except RuntimeError as e:
        print(f"pi05 build-vision-engine: {e}", file=sys.stderr)
        return EXIT_BUILD_FAILED
    finally:
        if not args.onnx_output:
            for w in written:
                w.unlink(missing_ok=True)
    output.write_bytes(plan)
    manifest = builtin_engine.manifest_for(spec, kind="tensorrt", checkpoint=checkpoint,
                                           builder=tensorrt_engine.version(trt))
    write_manifest(output, manifest)
    print(f"wrote {output} ({len(plan) / 2**20:.1f} MiB, {tensorrt_engine.version(trt)}, {args.precision}, "
          f"{args.views} images -> {list(manifest.output_shape)} {manifest.output_dtype})")
    return 0


def _adopt_plan(args, spec, checkpoint: str, say) -> int:
    from bridges import builtin_engine, tensorrt_engine
    from bridges.engine_manifest import write_manifest

    source = pathlib.Path(args.from_plan)
    if not source.is_file():
        raise UsageError(f"--from-plan {args.from_plan!r} does not exist")
    manifest = builtin_engine.manifest_for(spec, kind="tensorrt", checkpoint=checkpoint,
                                           builder=f"adopted from {source.name}")
    try:
        trt = tensorrt_engine.import_tensorrt()
    except tensorrt_engine.TensorRTUnavailable:
        say("tensorrt is not importable here: the plan's I/O is not checked now (the custom call checks it "
            "when it loads the plan)")
    else:
        tensorrt_engine.check_plan_io(tensorrt_engine.plan_io(source.read_bytes(), trt=trt),
                                      input_name=manifest.input_name, input_shape=manifest.input_shape,
                                      output_name=manifest.output_name, output_shape=manifest.output_shape,
                                      output_dtype=manifest.output_dtype)
    output = pathlib.Path(args.output)
    if source.resolve() != output.resolve():
        shutil.copyfile(source, output)
    write_manifest(output, manifest)
    print(f"wrote {output}.json for {output} ({args.precision}, {args.views} images)")
    return 0

"""A small typed wrapper over TensorRT's Python builder and runtime, imported only when it is asked for.

`build_plan` parses our exported ONNX (bridges.onnx_export) and builds a serialized engine ("plan"):
  fp32  a weakly typed network with TF32 switched off, so the engine keeps float32 parity with our JAX SigLIP;
  fp16  the fp16 ONNX graph as a *strongly typed* network: TensorRT keeps the graph's types (LayerNorm statistics
        and the patch embedding in float32) instead of choosing per layer;
  fp8   the fp8 ONNX graph (explicit e4m3 Q/DQ) as a strongly typed network, the form TensorRT builds FP8 GEMMs from.
`plan_io` lists a deserialized plan's inputs and outputs so a plan can be checked against its manifest.

Not run against a real TensorRT here: the GPU machines have no TensorRT builder (only the lean runtime wheel
exists on the registry). The code follows TensorRT 10's Python API; tests drive it with a stand-in module.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

INSTALL_HELP = """\
to build TensorRT engines, install TensorRT's builder for your CUDA major version:
  pip install tensorrt-cu13        # Python bindings + libnvinfer + libnvonnxparser for CUDA 13 (tensorrt-cu12: CUDA 12)
    (the tensorrt-cu13-libs part downloads NVIDIA's libraries at install time, so the machine needs NVIDIA's
     package index; offline, install TensorRT's tar/deb package and its python wheel, and put its lib/ on
     LD_LIBRARY_PATH)
or build the plan from the exported ONNX on any machine that has TensorRT (same TensorRT version as the one
that will run it):
  trtexec --onnx=FILE.onnx --saveEngine=FILE.plan --stronglyTyped      # fp16 / fp8 graphs
  trtexec --onnx=FILE.onnx --saveEngine=FILE.plan --noTF32             # fp32 graph
then copy FILE.plan and write its manifest with `pi05 build-vision-engine ... --from-plan FILE.plan`."""


class TensorRTUnavailable(RuntimeError):
    """TensorRT's builder cannot be imported; the message says what is missing and how to install it."""


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    precision: str  # "fp32" | "fp16" | "fp8": must match the ONNX graph's precision
    workspace_gib: float = 4.0
    version_compatible: bool = False  # a plan the lean runtime (tensorrt-lean) can load
    optimization_level: int = 3  # TensorRT's builder optimization level, 0..5

    def __post_init__(self):
        if self.precision not in ("fp32", "fp16", "fp8"):
            raise ValueError(f"precision must be fp32, fp16 or fp8, got {self.precision!r}")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level must be 0..5, got {self.optimization_level}")


@dataclasses.dataclass(frozen=True)
class TensorIO:
    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module with its builder, or TensorRTUnavailable naming exactly what is missing."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as e:
        found = _lean_runtime()
        have = f"; found only {found} (a runtime: it loads plans but cannot build them)" if found else ""
        raise TensorRTUnavailable(f"TensorRT's builder is not installed: `import tensorrt` failed ({e}){have}\n"
                                  f"{INSTALL_HELP}") from e
    missing = [name for name in ("Builder", "OnnxParser", "Runtime", "Logger") if not hasattr(trt, name)]
    if missing:
        version = getattr(trt, "__version__", "?")
        raise TensorRTUnavailable(f"the installed `tensorrt` ({version}) lacks {', '.join(missing)}: it is a "
                                  f"runtime-only build\n{INSTALL_HELP}")
    return trt


def _lean_runtime() -> str:
    for name in ("tensorrt_lean", "tensorrt_dispatch"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        return f"{name} {getattr(mod, '__version__', '')}".strip()
    return ""


def version(trt: ModuleType) -> str:
    return f"tensorrt {getattr(trt, '__version__', '?')}"


def build_plan(onnx_path: str | pathlib.Path, options: BuildOptions, *, trt: ModuleType | None = None,
               say: Callable[[str], None] = lambda _m: None) -> bytes:
    """Parse `onnx_path` (external data beside it is read too) and build the serialized engine."""
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if options.precision in ("fp16", "fp8"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    say(f"parsing {onnx_path}")
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT's ONNX parser rejected {str(onnx_path)!r}: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    config.builder_optimization_level = options.optimization_level
    if options.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # float32 parity: no TF32 tensor-core rounding
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    say(f"building the {options.precision} engine ({version(trt)}); this takes minutes for the full tower")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {str(onnx_path)!r} (see its log above)")
    return bytes(plan)


def plan_io(plan: bytes, *, trt: ModuleType | None = None) -> list[TensorIO]:
    """Deserialize a plan (needs a GPU) and list its I/O tensors."""
    trt = trt or import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeError("TensorRT could not deserialize the plan (built by another TensorRT version or GPU?)")
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        out.append(TensorIO(name=name, is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                            shape=tuple(int(d) for d in engine.get_tensor_shape(name)),
                            dtype=_np_name(trt, engine.get_tensor_dtype(name))))
    return out


def _np_name(trt: ModuleType, dtype: Any) -> str:
    names = {trt.float32: "float32", trt.float16: "float16"}
    return names.get(dtype, str(dtype))


def check_plan_io(io: list[TensorIO], *, input_name: str, input_shape: tuple[int, ...], output_name: str,
                  output_shape: tuple[int, ...], output_dtype: str) -> None:
    """Raise ValueError unless the plan has exactly our one input and one output with these shapes/dtypes."""
    want = [TensorIO(input_name, True, tuple(input_shape), "float32"),
            TensorIO(output_name, False, tuple(output_shape), output_dtype)]
    if sorted(io, key=lambda t: t.name) != sorted(want, key=lambda t: t.name):
        raise ValueError(f"plan I/O {io} does not match the vision engine contract {want}")

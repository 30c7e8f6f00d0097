"""The JSON manifest written beside every vision engine file (`<engine>.json`), and the checks made against it.

A TensorRT plan is opaque without TensorRT, so what the engine computes (image count, shapes, dtypes, precision)
is recorded at build time and checked before the engine is put inside the jitted sampler: a missing file, a
plan built for another image count or LLM width, or a precision the model's dtype should not take fails here
with a message that names the file and the field, not later inside XLA.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

FORMAT = "pi05-vision-engine/1"
KINDS = ("tensorrt", "builtin")  # a TensorRT plan, or this package's own engine file (bridges/csrc)
PRECISIONS = ("fp32", "fp16", "fp8")
# Which engine precisions each sampler dtype takes: a float32 model must not silently get float16 image tokens.
ACCEPTED_PRECISIONS: dict[str, tuple[str, ...]] = {"float32": ("fp32",), "bfloat16": ("fp32", "fp16", "fp8")}
OUTPUT_DTYPES = {"fp32": "float32", "fp16": "float16", "fp8": "float16"}


class EngineFileError(ValueError):
    """A vision engine file (or its manifest) is missing, unreadable or does not fit the model it is used with."""


@dataclasses.dataclass(frozen=True)
class EngineManifest:
    kind: str
    precision: str
    views: int
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    output_name: str
    output_shape: tuple[int, ...]
    output_dtype: str
    width: int  # SigLIP width / depth / heads / mlp, for the message when a plan meets another checkpoint
    depth: int
    num_heads: int
    mlp_dim: int
    checkpoint: str = ""
    builder: str = ""  # e.g. "tensorrt 10.13.0" or "pi05_jax builtin"
    format: str = FORMAT

    def __post_init__(self):
        if self.kind not in KINDS:
            raise EngineFileError(f"manifest kind must be one of {KINDS}, got {self.kind!r}")
        if self.precision not in PRECISIONS:
            raise EngineFileError(f"manifest precision must be one of {PRECISIONS}, got {self.precision!r}")

    @property
    def out_width(self) -> int:
        return self.output_shape[-1]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def manifest_path(engine_path: str | pathlib.Path) -> pathlib.Path:
    engine_path = pathlib.Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_manifest(engine_path: str | pathlib.Path, manifest: EngineManifest) -> pathlib.Path:
    path = manifest_path(engine_path)
    path.write_text(manifest.to_json() + "\n")
    return path


def read_manifest(engine_path: str | pathlib.Path) -> EngineManifest:
    """The manifest of an engine file; errors name the file and say how to make a good one."""
    engine_path = pathlib.Path(engine_path)
    rebuild = "build one with `pi05 build-vision-engine --checkpoint DIR --views N --output FILE`"
    if not engine_path.is_file():
        raise EngineFileError(f"vision engine file {str(engine_path)!r} not found; {rebuild}")
    mpath = manifest_path(engine_path)
    if not mpath.is_file():
        raise EngineFileError(f"vision engine {str(engine_path)!r} has no manifest {mpath.name!r} beside it "
                              f"(it records the engine's shapes and precision); {rebuild}")
    try:
        raw = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineFileError(f"{str(mpath)!r} is not readable JSON ({e})") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise EngineFileError(f"{str(mpath)!r}: format {got!r}, expected {FORMAT!r}; {rebuild}")
    names = {f.name for f in dataclasses.fields(EngineManifest)}
    missing = sorted(n for n in names if n not in raw and n not in ("checkpoint", "builder", "format"))
    if missing:
        raise EngineFileError(f"{str(mpath)!r}: missing fields {missing}; {rebuild}")
    raw = {k: (tuple(v) if k.endswith("_shape") else v) for k, v in raw.items() if k in names}
    try:
        return EngineManifest(**raw)
    except EngineFileError as e:
        raise EngineFileError(f"{str(mpath)!r}: {e}") from e


def check_engine(manifest: EngineManifest, *, engine_path: str | pathlib.Path, images_shape: tuple[int, ...],
                 out_width: int, model_dtype: str | None = None, kind: str | None = None,
                 precision: str | None = None) -> None:
    """Raise EngineFileError unless the engine takes `images_shape` float32 images, returns `out_width`-wide
    tokens, is of `kind`, and has a precision the model dtype accepts (or exactly `precision` when given)."""
    where = f"vision engine {str(engine_path)!r}"
    if kind is not None and manifest.kind != kind:
        raise EngineFileError(f"{where} is a {manifest.kind} engine, but --vision {kind} was asked for")
    if tuple(images_shape) != tuple(manifest.input_shape):
        raise EngineFileError(
            f"{where} takes images of shape {list(manifest.input_shape)} ({manifest.views} images), but this call "
            f"has {list(images_shape)}; rebuild it with --views {images_shape[0]}")
    if manifest.input_dtype != "float32":
        raise EngineFileError(f"{where} takes {manifest.input_dtype} images, expected float32")
    if manifest.out_width != out_width:
        raise EngineFileError(
            f"{where} produces tokens {manifest.out_width} wide, but the model's LLM width is {out_width}: "
            f"it was built from another checkpoint ({manifest.checkpoint or 'unknown'})")
    if precision is not None and manifest.precision != precision:
        raise EngineFileError(f"{where} has precision {manifest.precision}, expected {precision}")
    if model_dtype is not None:
        accepted = ACCEPTED_PRECISIONS.get(model_dtype)
        if accepted is None:
            raise EngineFileError(f"unknown model dtype {model_dtype!r}; expected one of {sorted(ACCEPTED_PRECISIONS)}")
        if manifest.precision not in accepted:
            raise EngineFileError(
                f"{where} has precision {manifest.precision}, which a {model_dtype} model does not take "
                f"(accepted: {', '.join(accepted)}); rebuild with --precision {accepted[0]}")
    if manifest.output_dtype != OUTPUT_DTYPES[manifest.precision]:
        raise EngineFileError(f"{where}: output dtype {manifest.output_dtype} does not fit precision "
                              f"{manifest.precision}")

"""The vision tower as an engine outside XLA, called from inside the jitted sampler through an XLA FFI custom call.

`VisionEngine.open(path)` checks the engine file against its manifest; calling it inside `jax.jit` emits the
custom call "pi05_vision_engine" (bridges/csrc/ffi_handlers.cc): XLA instantiates the engine once per executable
(weights, scratch, TensorRT context), and each run enqueues it on XLA's own CUDA stream with XLA's buffers - no
host copies, no synchronization, and the call may be captured in XLA's command buffer (CUDA graph).

Sampler plumbing: `--vision xla` (default) keeps the plain-JAX tower; `--vision tensorrt|builtin --vision-engine
FILE` makes (`bridged`) an `Implementation` whose vision phase is the engine and whose prefill/denoise are those
of `--kernels`, so `infer`, `serve` and `bench` run it through the same one jitted `sample_actions`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bridges import build_ffi
from bridges.engine_manifest import EngineFileError, EngineManifest, check_engine, read_manifest

TARGET = "pi05_vision_engine"
STATE_TYPE = "pi05_vision_engine_state"
VISION_CHOICES = ("xla", "tensorrt", "builtin")
_BACKEND_PLATFORMS = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}
_XLA_PLATFORMS = {"cpu": "cpu", "cuda": "CUDA"}  # the names the CPU client and the CUDA plugin register under
_LIBRARIES: dict[str, ctypes.CDLL] = {}


def _platform(backend: str | None = None) -> str:
    backend = backend or jax.default_backend()
    if backend not in _BACKEND_PLATFORMS:
        raise EngineFileError(f"the vision engine bridge runs on the CPU and on NVIDIA GPUs, not on {backend!r}")
    return _BACKEND_PLATFORMS[backend]


def _capsule(address: int):
    return jax.ffi.pycapsule(ctypes.c_void_p(address))


def register(platform: str | None = None, *, library: str | pathlib.Path | None = None) -> ctypes.CDLL:
    """Load (building it if needed) the custom-call library for `platform` and register it with XLA, once."""
    platform = platform or _platform()
    if platform in _LIBRARIES:
        return _LIBRARIES[platform]
    # The backend must exist before a stateful handler is registered: a lazily created backend registers queued
    # handlers before queued types, and XLA then rejects the handler.
    jax.devices("cpu" if platform == "cpu" else "gpu")
    if library is None:
        try:
            library = build_ffi.build(platform, say=lambda m: print(m, file=sys.stderr))
        except build_ffi.BuildError as e:
            prebuilt = build_ffi.default_out_dir() / build_ffi.LIBRARY_NAMES[platform]
            if not prebuilt.is_file():
                raise
            print(f"pi05 vision bridge: using the prebuilt {prebuilt} (cannot rebuild here: "
                  f"{str(e).splitlines()[0]})", file=sys.stderr)
            library = prebuilt
    lib = ctypes.CDLL(str(library))
    lib.pi05_vision_state_type_id.restype = ctypes.c_void_p
    lib.pi05_vision_state_type_info.restype = ctypes.c_void_p
    jax.ffi.register_ffi_type(STATE_TYPE, {"type_id": _capsule(lib.pi05_vision_state_type_id()),
                                           "type_info": _capsule(lib.pi05_vision_state_type_info())},
                              platform=_XLA_PLATFORMS[platform])
    jax.ffi.register_ffi_target(TARGET, {"instantiate": jax.ffi.pycapsule(lib.pi05_vision_instantiate),
                                         "execute": jax.ffi.pycapsule(lib.pi05_vision_execute)},
                                platform=_XLA_PLATFORMS[platform])
    _LIBRARIES[platform] = lib
    return lib


def stats(platform: str | None = None) -> dict[str, int]:
    """The library's counters: instantiates, executes, and executes made while XLA captured a CUDA graph."""
    lib = register(platform)
    out = (ctypes.c_int64 * 3)()
    lib.pi05_vision_stats(out)
    return {"instantiates": out[0], "executes": out[1], "captured": out[2]}


@dataclasses.dataclass(frozen=True)
class VisionEngine:
    """An engine file plus its manifest; call it on float32 images [V, 224, 224, 3] (inside jit or not)."""

    path: pathlib.Path
    manifest: EngineManifest

    @classmethod
    def open(cls, path: str | pathlib.Path, *, out_width: int | None = None, model_dtype: str | None = None,
             kind: str | None = None) -> VisionEngine:
        path = pathlib.Path(path).expanduser().resolve()
        manifest = read_manifest(path)
        check_engine(manifest, engine_path=path, images_shape=manifest.input_shape,
                     out_width=manifest.out_width if out_width is None else out_width,
                     model_dtype=model_dtype, kind=kind)
        return cls(path=path, manifest=manifest)

    @property
    def out_dtype(self) -> np.dtype:
        return np.dtype(self.manifest.output_dtype)

    def __call__(self, images) -> jax.Array:
        check_engine(self.manifest, engine_path=self.path, images_shape=tuple(images.shape),
                     out_width=self.manifest.out_width)
        register()
        call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(self.manifest.output_shape, self.out_dtype))
        return call(jnp.asarray(images, jnp.float32), engine_path=str(self.path),
                    views=np.int64(self.manifest.views))


@dataclasses.dataclass(frozen=True)
class EngineSet:
    """Engines by image count (an engine's shapes are static): the sampler picks the one its call needs."""

    engines: tuple[VisionEngine, ...]

    def __post_init__(self):
        counts = [e.manifest.views for e in self.engines]
        if not counts:
            raise EngineFileError("no vision engine given")
        if len(set(counts)) != len(counts):
            raise EngineFileError(f"two vision engines take the same image count: {sorted(counts)}")

    def for_images(self, n: int) -> VisionEngine:
        for e in self.engines:
            if e.manifest.views == n:
                return e
        have = ", ".join(f"{e.manifest.views} ({e.path.name})" for e in self.engines)
        raise EngineFileError(f"this call runs SigLIP on {n} images, but the vision engines given take {have}; "
                              f"build one with `pi05 build-vision-engine --views {n}`")

    def encode(self, images, dtype) -> jax.Array:
        """images [n, 224, 224, 3] -> tokens [n, P, O] in `dtype`, through the engine for n images."""
        return self.for_images(images.shape[0])(images).astype(dtype)


def reference_layout_vision(engines: EngineSet):
    """The reference implementation's vision phase on an engine: every view slot (masked or not, as upstream),
    view-major, so the engine takes batch x slots images -> {view: tokens [B, P, O]}."""
    from pi05_jax.model.reference import params_dtype

    def vision(params, obs):
        views, b = list(obs.images), obs.batch_size
        tokens = engines.encode(jnp.concatenate([obs.images[v] for v in views], axis=0), params_dtype(params))
        return {v: tokens[i * b:(i + 1) * b] for i, v in enumerate(views)}

    return vision


def compact_layout_vision(engines: EngineSet, num_views: int | None):
    """The fast paths' vision phase (pi05_jax.fast.prefix.encode_valid_views, with the engine as its tower):
    each row's valid views gathered to the front, `num_views` per row, so the engine takes batch x num_views
    images."""
    from pi05_jax.fast import prefix
    from pi05_jax.model.reference import params_dtype

    def vision(params, obs):
        return prefix.encode_valid_views(obs, num_views or len(obs.images), params_dtype(params),
                                         encode=engines.encode)

    return vision


def bridged(base, engines: EngineSet | VisionEngine):
    """`base` (a pi05_jax.implementations.Implementation) with its vision phase run by the engine(s).
    Reference-layout implementations get every view slot encoded; the fast paths (those with a host-side plan,
    `specialize`) get their valid-views layout, with the plan's view count choosing the engine."""
    if isinstance(engines, VisionEngine):
        engines = EngineSet((engines,))
    paths = ",".join(str(e.path) for e in engines.engines)
    digest = hashlib.sha1(paths.encode()).hexdigest()[:8]
    kind = engines.engines[0].manifest.kind
    name = f"{base.name}+vision:{kind}:{digest}"
    description = f"{base.description}; vision: {kind} engine(s) {paths}"
    if base.specialize is None:
        return dataclasses.replace(base, name=name, vision=reference_layout_vision(engines), description=description)

    @functools.cache
    def specialize(plan):
        inner = base.specialize(plan)
        return dataclasses.replace(inner, name=f"{name}[{inner.name}]",
                                   vision=compact_layout_vision(engines, plan.num_views))

    return dataclasses.replace(base, name=name, vision=compact_layout_vision(engines, None), specialize=specialize,
                               description=description)


def add_vision_args(parser) -> None:
    """--vision / --vision-engine for `infer`, `serve` and `bench`."""
    parser.add_argument("--vision", default="xla", choices=VISION_CHOICES,
                        help="vision tower: 'xla' (plain JAX, default), 'tensorrt' (a TensorRT plan) or 'builtin' "
                             "(this package's engine file), the last two through an XLA custom call inside the "
                             "jitted sampler")
    parser.add_argument("--vision-engine", default=None, metavar="FILE[,FILE...]",
                        help="engine file(s) for --vision tensorrt|builtin (from `pi05 build-vision-engine`), one "
                             "per image count the calls need")


def open_engines(vision: str, engine_path: str | None, *, out_width: int | None = None,
                 model_dtype: str | None = None) -> EngineSet | None:
    """The engines `--vision` / `--vision-engine` name, checked against the model (its LLM width and dtype, where
    given): None for `--vision xla`; EngineFileError, one line naming the file and the field, for a bad pair."""
    if vision not in VISION_CHOICES:
        raise EngineFileError(f"--vision must be one of {', '.join(VISION_CHOICES)}, got {vision!r}")
    if vision == "xla":
        if engine_path:
            raise EngineFileError("--vision-engine needs --vision tensorrt or --vision builtin")
        return None
    paths = [p.strip() for p in str(engine_path or "").split(",") if p.strip()]
    if not paths:
        raise EngineFileError(f"--vision {vision} needs --vision-engine FILE (see `pi05 build-vision-engine`)")
    return EngineSet(tuple(VisionEngine.open(p, out_width=out_width, model_dtype=model_dtype, kind=vision)
                           for p in paths))


def check_vision_args(args) -> None:
    """The engine files' own checks (exist, manifest, kind), before a model is loaded: a typo fails in a second."""
    open_engines(getattr(args, "vision", "xla"), getattr(args, "vision_engine", None))


def apply_vision_args(args, model) -> str:
    """Point `model.implementation` at the bridged implementation the arguments ask for; returns its name."""
    engines = open_engines(getattr(args, "vision", "xla"), getattr(args, "vision_engine", None),
                           out_width=model.config.llm.width, model_dtype=jnp.dtype(model.dtype).name)
    if engines is not None:
        model.implementation = bridged(model.implementation, engines)
    return model.kernels

"""Build the vision-engine custom call (bridges/csrc) into a shared library for the CPU (g++) or CUDA (nvcc).

    python -m bridges.build_ffi                       # CPU library, and the CUDA one where nvcc is found
    python -m bridges.build_ffi --platform cuda       # CUDA only (compiles without a GPU: sm_90 SASS + PTX)
    python -m bridges.build_ffi --platform cuda --tensorrt-root /opt/TensorRT-10.x   # + TensorRT plans

Libraries go to bridges/_build/ (or --out / $PI05_BRIDGE_BUILD) and are rebuilt only when the sources, the flags
or the XLA FFI headers change (a stamp file holds the hash). The CUDA library links the CUDA runtime statically,
so it needs only the driver where it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

CSRC = pathlib.Path(__file__).resolve().parent / "csrc"
COMMON_SOURCES = ("ffi_handlers.cc", "builtin_weights.cc")
PLATFORM_SOURCES = {"cpu": ("cpu_engine.cc",), "cuda": ("cuda_engine.cu",)}
LIBRARY_NAMES = {"cpu": "libpi05_vision_cpu.so", "cuda": "libpi05_vision_cuda.so"}
# Hopper SASS plus compute_90 PTX, which the driver JIT-compiles for newer GPUs (Blackwell, Thor).
CUDA_ARCH_FLAGS = ("-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90")


class BuildError(RuntimeError):
    """A compiler is missing or failed; the message holds the command and its output."""


@dataclasses.dataclass(frozen=True)
class Toolchain:
    compiler: str
    include_dirs: tuple[str, ...]


def default_out_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PI05_BRIDGE_BUILD", CSRC.parent / "_build"))


def ffi_include_dir() -> str:
    import jax

    return jax.ffi.include_dir()


def find_nvcc() -> str | None:
    """$NVCC, nvcc on PATH, /usr/local/cuda/bin/nvcc, or the pip wheel's (nvidia-cuda-nvcc) nvcc."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    try:
        import nvidia  # namespace package of NVIDIA's pip wheels

        for root in getattr(nvidia, "__path__", []):
            candidates += [str(p) for p in sorted(pathlib.Path(root).glob("cu*/bin/nvcc"))]
            candidates.append(str(pathlib.Path(root) / "cuda_nvcc" / "bin" / "nvcc"))
    except ImportError:
        pass
    return next((c for c in candidates if c and pathlib.Path(c).is_file()), None)


def toolchain(platform: str) -> Toolchain:
    if platform == "cpu":
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if not cxx:
            raise BuildError("no C++ compiler found (set $CXX, or `apt-get install g++`)")
        return Toolchain(cxx, ())
    if platform == "cuda":
        nvcc = find_nvcc()
        if not nvcc:
            raise BuildError("nvcc not found: set $NVCC, put CUDA's bin/ on PATH, or `pip install nvidia-cuda-nvcc` "
                             "(CUDA 13); the CUDA library cannot be built without it")
        # A pip-installed nvcc keeps the runtime headers beside it (nvidia/cu13/include).
        include = pathlib.Path(nvcc).resolve().parent.parent / "include"
        return Toolchain(nvcc, (str(include),) if (include / "cuda_runtime.h").is_file() else ())
    raise ValueError(f"platform must be 'cpu' or 'cuda', got {platform!r}")


def command(platform: str, output: pathlib.Path, *, tensorrt_root: str | None = None) -> list[str]:
    tc = toolchain(platform)
    sources = [str(CSRC / s) for s in (*PLATFORM_SOURCES[platform], *COMMON_SOURCES)]
    includes = ["-isystem", ffi_include_dir(), "-I", str(CSRC)]
    for inc in tc.include_dirs:
        includes += ["-isystem", inc]
    if platform == "cpu":
        return [tc.compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", *includes, *sources, "-o", str(output)]
    cmd = [tc.compiler, "-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-Wall", "-DPI05_PLATFORM_CUDA",
           *CUDA_ARCH_FLAGS, *includes]
    if tensorrt_root:
        root = pathlib.Path(tensorrt_root)
        if not (root / "include" / "NvInferRuntime.h").is_file():
            raise BuildError(f"--tensorrt-root {tensorrt_root!r} has no include/NvInferRuntime.h")
        cmd += ["-DPI05_WITH_TENSORRT", "-isystem", str(root / "include"), str(CSRC / "tensorrt_engine.cc"),
                "-L", str(root / "lib"), "-Xlinker", f"-rpath,{root / 'lib'}", "-lnvinfer"]
    return [*cmd, *sources, "-o", str(output)]


def _stamp(cmd: list[str]) -> str:
    h = hashlib.sha256(" ".join(cmd).encode())
    for path in sorted(CSRC.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    h.update((pathlib.Path(ffi_include_dir()) / "xla" / "ffi" / "api" / "ffi.h").read_bytes())
    return h.hexdigest()


def build(platform: str, out_dir: str | pathlib.Path | None = None, *, tensorrt_root: str | None = None,
          force: bool = False, say=lambda _m: None) -> pathlib.Path:
    """Compile (if out of date) and return the library path; BuildError with the compiler output on failure."""
    out = pathlib.Path(out_dir) if out_dir else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    lib = out / LIBRARY_NAMES[platform]
    cmd = command(platform, lib.with_suffix(".so.partial"), tensorrt_root=tensorrt_root)
    stamp_file = lib.with_suffix(".so.stamp")
    stamp = _stamp(cmd)
    if not force and lib.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return lib
    say(f"building {lib.name}: {' '.join(cmd)}")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"building {lib.name} failed (exit {done.returncode}):\n$ {' '.join(cmd)}\n"
                         f"{done.stdout}{done.stderr}")
    lib.with_suffix(".so.partial").replace(lib)
    stamp_file.write_text(stamp)
    return lib


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bridges.build_ffi", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platform", default="all", choices=["all", "cpu", "cuda"])
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: bridges/_build)")
    p.add_argument("--tensorrt-root", default=None, metavar="DIR",
                   help="TensorRT install (include/, lib/) to compile the TensorRT engine into the CUDA library")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = p.parse_args(argv)
    platforms = ["cpu", "cuda"] if args.platform == "all" else [args.platform]
    status = 0
    for platform in platforms:
        try:
            lib = build(platform, args.out, tensorrt_root=args.tensorrt_root if platform == "cuda" else None,
                        force=args.force, say=lambda m: print(m, file=sys.stderr))
            print(f"{platform}: {lib}")
        except BuildError as e:
            if args.platform == "all" and platform == "cuda" and find_nvcc() is None:
                print(f"cuda: skipped ({e})", file=sys.stderr)
                continue
            print(f"{platform}: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

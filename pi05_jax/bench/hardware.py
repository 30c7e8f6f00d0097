"""The card: what it is, its ceilings measured at the start of a run, its memory, and published specs of others.

Ceilings (measured, best of several calls, random data):
  bandwidth  y = x + 1 over a large buffer, updated in place (donated), counting read + write bytes; this is the
             device-to-device copy rate (no host transfer).
  matmul     an n x n x n matmul in the compute dtype, 2 n^3 FLOPs.
Sizes are large on a GPU (1 GiB, n = 8192) and small on the CPU (32 MiB, n = 512) so CI stays fast.

PUBLISHED holds datasheet peaks (dense, no sparsity) for the projection table; they are not measurements.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class CeilingSizes:
    copy_bytes: int
    matmul_n: int
    repeats: int = 10


GPU_SIZES = CeilingSizes(copy_bytes=1 << 30, matmul_n=8192)
CPU_SIZES = CeilingSizes(copy_bytes=32 << 20, matmul_n=512, repeats=5)


def platform() -> str:
    return jax.default_backend()


def has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def device_info() -> dict:
    d = jax.devices()[0]
    stats = memory_stats()
    return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "jax_version": jax.__version__, "memory_limit_bytes": (stats or {}).get("bytes_limit")}


def memory_stats() -> dict | None:
    """The first device's allocator statistics, or None where the backend keeps none (the CPU)."""
    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None


NO_MEMORY_STATS = "this backend reports no allocator statistics (jax Device.memory_stats() is None, e.g. on the CPU)"


def bytes_in_use() -> tuple[int | None, int | None, str | None]:
    """(bytes in use now, peak bytes in use since the process started, reason when unavailable)."""
    stats = memory_stats()
    if not stats:
        return None, None, NO_MEMORY_STATS
    return stats.get("bytes_in_use"), stats.get("peak_bytes_in_use"), None


def _best_time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(dtype, size_bytes: int, repeats: int) -> dict:
    itemsize = jnp.dtype(dtype).itemsize
    n = size_bytes // itemsize
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32).astype(dtype)
    step = jax.jit(lambda x: x + jnp.asarray(1, x.dtype), donate_argnums=0)
    x = jax.block_until_ready(step(x))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = jax.block_until_ready(step(x))
        best = min(best, time.perf_counter() - t0)
    moved = 2 * n * itemsize
    return {"bytes_per_s": moved / best, "bytes_moved": moved, "best_s": best,
            "method": f"y = x + 1 in place over {n * itemsize / 2**20:.0f} MiB of {jnp.dtype(dtype).name}, "
                      f"read + write bytes, best of {repeats}"}


def measure_matmul(dtype, n: int, repeats: int) -> dict:
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    best = _best_time(jax.jit(jnp.matmul), (a, b), repeats)
    return {"flops_per_s": 2 * n**3 / best, "best_s": best,
            "method": f"{n}x{n}x{n} matmul in {jnp.dtype(dtype).name}, best of {repeats}"}


def measure_ceilings(dtype, sizes: CeilingSizes | None = None) -> dict:
    sizes = sizes or (GPU_SIZES if platform() == "gpu" else CPU_SIZES)
    return {"bandwidth": measure_bandwidth(dtype, sizes.copy_bytes, sizes.repeats),
            "matmul": measure_matmul(dtype, sizes.matmul_n, sizes.repeats)}


# --- published peak specs (for the projection; never measurements) -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    name: str
    bytes_per_s: float
    matmul_flops_per_s: dict  # compute dtype name -> dense peak FLOP/s
    match: tuple[str, ...]  # substrings of jax's device_kind that identify this card
    note: str = ""


T = 1e12
PUBLISHED: tuple[HardwareSpec, ...] = (
    HardwareSpec("H100 SXM", 3.35e12, {"bfloat16": 989.4 * T, "float8": 1978.9 * T, "float32": 494.7 * T},
                 ("H100 80GB HBM3", "H100 SXM"), "NVIDIA H100 datasheet, SXM5, dense; float32 = TF32"),
    HardwareSpec("H200", 4.8e12, {"bfloat16": 989.4 * T, "float8": 1978.9 * T, "float32": 494.7 * T},
                 ("H200",), "NVIDIA H200 datasheet, SXM, dense; float32 = TF32"),
    HardwareSpec("RTX 4090", 1.008e12, {"bfloat16": 165.2 * T, "float8": 330.3 * T, "float32": 82.6 * T},
                 ("RTX 4090",), "Ada whitepaper, dense, FP32 accumulate; float32 = TF32"),
    HardwareSpec("RTX 5090", 1.792e12, {"bfloat16": 209.5 * T, "float8": 419.0 * T, "float4": 1676.0 * T,
                                        "float32": 104.8 * T},
                 ("RTX 5090",), "Blackwell GeForce, dense (half the published sparse figures), FP32 accumulate"),
    HardwareSpec("Jetson AGX Thor", 273e9, {"float4": 1035.0 * T, "float8": 517.5 * T, "bfloat16": 258.8 * T},
                 ("Thor",), "2070 FP4 TFLOPS sparse published; dense FP4/FP8/BF16 derived by halving per step"),
    HardwareSpec("Jetson AGX Orin", 204.8e9, {"bfloat16": 42.5 * T, "float32": 21.3 * T},
                 ("Orin",), "64 GB module; GPU 170 sparse INT8 TOPS published; dense FP16/BF16 derived (/4)"),
)


def matching_spec(device_kind: str) -> HardwareSpec | None:
    for spec in PUBLISHED:
        if any(m.lower() in device_kind.lower() for m in spec.match):
            return spec
    return None


def dtype_key(dtype) -> str:
    name = jnp.dtype(dtype).name
    if name.startswith("float8"):
        return "float8"
    if name.startswith("float4"):
        return "float4"
    return name


def efficiency(ceilings: dict, device_kind: str, dtype) -> dict | None:
    """Measured ceilings as a fraction of this card's published peaks, when the card is in PUBLISHED."""
    spec = matching_spec(device_kind)
    peak = spec.matmul_flops_per_s.get(dtype_key(dtype)) if spec else None
    if spec is None or peak is None:
        return None
    return {"card": spec.name, "bandwidth": ceilings["bandwidth"]["bytes_per_s"] / spec.bytes_per_s,
            "matmul": ceilings["matmul"]["flops_per_s"] / peak}

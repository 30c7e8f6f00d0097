"""The card: what it is, its ceilings measured at the start of a run, its memory, and datasheet figures.

Ceilings (measured, best of several calls):
  bandwidth  a plain device-to-device copy of a large buffer into a new one (XLA's `copy` of a parameter, a
             memcpy), counting read + write bytes, as a memcpy bandwidth is quoted; many copies are queued per
             timed call so the host's fixed cost per call is spread thin. The compiled copy's own cost analysis
             must count the same bytes, and its output must be a new buffer, or the measurement raises.
  matmul     an n x n x n matmul in the compute dtype on random data, 2 n^3 FLOPs.
Sizes are large on a GPU (a 2 GiB buffer, at most 1/8 of the device's memory; n = 8192) and small on the CPU
(32 MiB, n = 512) so CI stays fast.

DATASHEET holds vendors' figures (dense, no sparsity) keyed by jax's device_kind: shown beside the measured
ceilings and used for the projection to other cards; they are never measurements.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class CeilingSizes:
    copy_bytes: int
    matmul_n: int
    repeats: int = 10
    copies_per_call: int = 16  # copies queued per timed call


GPU_SIZES = CeilingSizes(copy_bytes=2 << 30, matmul_n=8192)
CPU_SIZES = CeilingSizes(copy_bytes=32 << 20, matmul_n=512, repeats=5, copies_per_call=2)
MAX_COPY_SHARE = 8  # the copy's buffer is at most 1/8 of the device's memory (source + 2 copies in flight)


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


class CeilingError(RuntimeError):
    """The ceiling measurement did not measure what it says (e.g. the copy was elided)."""


def copy_size(sizes: CeilingSizes, memory_limit: int | None) -> int:
    """The copy's buffer in bytes: `sizes.copy_bytes`, capped at 1/MAX_COPY_SHARE of the device's memory."""
    size = sizes.copy_bytes if not memory_limit else min(sizes.copy_bytes, memory_limit // MAX_COPY_SHARE)
    return size - size % 4096


def compiled_copy(x):
    """XLA's copy of a parameter into a new output buffer (`ROOT copy(parameter)`): a device-to-device memcpy."""
    return jax.jit(jnp.copy).lower(x).compile()


def xla_bytes_accessed(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    cost = cost[0] if isinstance(cost, list) else cost
    return None if not cost or "bytes accessed" not in cost else float(cost["bytes accessed"])


def _size(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def measure_bandwidth(size_bytes: int, repeats: int, copies_per_call: int = 16) -> dict:
    """Copy a `size_bytes` float32 buffer into a new one, `copies_per_call` copies queued back to back per timed
    call (so the host's fixed cost per call, dispatch and the wait, is spread over them), best of `repeats` calls;
    read + write bytes."""
    n = size_bytes // 4
    x = jax.block_until_ready(jax.lax.iota(jnp.float32, n) * np.float32(1.0 / n))  # non-zero data, made on device
    source = x.unsafe_buffer_pointer()
    copy = compiled_copy(x)
    per_copy = 2 * n * 4
    counted = xla_bytes_accessed(copy)
    if counted is not None and counted < per_copy:
        raise CeilingError(f"the compiled copy touches {counted:.0f} bytes, fewer than the {per_copy} of a "
                           f"read + write of the buffer: it is not a copy")
    y = jax.block_until_ready(copy(x))
    if y.unsafe_buffer_pointer() == source:
        raise CeilingError("the copy returned its input buffer: nothing was moved")
    if not bool(jnp.array_equal(y[-1024:], x[-1024:])):
        raise CeilingError("the copy's output differs from its input")
    del y
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(copies_per_call):
            y = copy(x)  # the previous output is freed as it is replaced: at most a few buffers live
        jax.block_until_ready(y)
        times.append(time.perf_counter() - t0)
        del y
    best = min(times)
    moved = copies_per_call * per_copy
    return {"bytes_per_s": moved / best, "bytes_moved": moved, "bytes_per_copy": per_copy, "buffer_bytes": n * 4,
            "copies_per_call": copies_per_call, "best_s": best, "median_s": float(np.median(times)),
            "xla_bytes_accessed_per_copy": counted,
            "method": f"device-to-device copy of a {_size(n * 4)} float32 buffer into a new one, {copies_per_call} "
                      f"queued per timed call, read + write bytes, best of {repeats}"}


def measure_matmul(dtype, n: int, repeats: int) -> dict:
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    best = _best_time(jax.jit(jnp.matmul), (a, b), repeats)
    return {"flops_per_s": 2 * n**3 / best, "best_s": best,
            "method": f"{n}x{n}x{n} matmul in {jnp.dtype(dtype).name}, best of {repeats}"}


def measure_ceilings(dtype, sizes: CeilingSizes | None = None) -> dict:
    sizes = sizes or (GPU_SIZES if platform() == "gpu" else CPU_SIZES)
    size = copy_size(sizes, device_info()["memory_limit_bytes"])
    return {"bandwidth": measure_bandwidth(size, sizes.repeats, sizes.copies_per_call),
            "matmul": measure_matmul(dtype, sizes.matmul_n, sizes.repeats)}


# --- datasheet figures (beside the measured ceilings, and for the projection; never measurements) -----------------


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    name: str
    bytes_per_s: float
    matmul_flops_per_s: dict  # compute dtype name -> dense peak FLOP/s
    memory: str  # the DRAM kind the bandwidth is for
    device_kinds: tuple[str, ...]  # jax's device_kind strings of this card (exact); () = projection only
    note: str = ""


T = 1e12
PUBLISHED: tuple[HardwareSpec, ...] = (
    HardwareSpec("H100 SXM", 3.35e12, {"bfloat16": 989.4 * T, "float8": 1978.9 * T, "float32": 494.7 * T}, "HBM3",
                 ("NVIDIA H100 80GB HBM3",), "NVIDIA H100 datasheet, SXM5, dense; float32 = TF32"),
    HardwareSpec("H200", 4.8e12, {"bfloat16": 989.4 * T, "float8": 1978.9 * T, "float32": 494.7 * T}, "HBM3e",
                 ("NVIDIA H200",), "NVIDIA H200 datasheet, SXM, dense; float32 = TF32"),
    HardwareSpec("RTX 4090", 1.008e12, {"bfloat16": 165.2 * T, "float8": 330.3 * T, "float32": 82.6 * T}, "GDDR6X",
                 ("NVIDIA GeForce RTX 4090",), "Ada whitepaper, dense, FP32 accumulate; float32 = TF32"),
    HardwareSpec("RTX 5090", 1.792e12, {"bfloat16": 209.5 * T, "float8": 419.0 * T, "float4": 1676.0 * T,
                                        "float32": 104.8 * T}, "GDDR7",
                 ("NVIDIA GeForce RTX 5090",),
                 "Blackwell GeForce, dense (half the published sparse figures), FP32 accumulate"),
    HardwareSpec("Jetson AGX Thor", 273e9, {"float4": 1035.0 * T, "float8": 517.5 * T, "bfloat16": 258.8 * T},
                 "LPDDR5X", (), "2070 FP4 TFLOPS sparse published; dense FP4/FP8/BF16 derived by halving per step"),
    HardwareSpec("Jetson AGX Orin", 204.8e9, {"bfloat16": 42.5 * T, "float32": 21.3 * T}, "LPDDR5",
                 (), "64 GB module; GPU 170 sparse INT8 TOPS published; dense FP16/BF16 derived (/4)"),
)
DATASHEET: dict[str, HardwareSpec] = {kind: spec for spec in PUBLISHED for kind in spec.device_kinds}
UNKNOWN = "unknown"


def datasheet(device_kind: str) -> HardwareSpec | None:
    """This card's datasheet figures, keyed by jax's exact device_kind; None (shown as "unknown") otherwise."""
    return DATASHEET.get(device_kind)


def dtype_key(dtype) -> str:
    name = jnp.dtype(dtype).name
    if name.startswith("float8"):
        return "float8"
    if name.startswith("float4"):
        return "float4"
    return name


def datasheet_rates(device_kind: str, dtype) -> dict:
    """{card, memory, bytes_per_s, matmul_flops_per_s, note} of this card (card "unknown", rates None when the
    device_kind is not in DATASHEET or it has no figure for the dtype)."""
    spec = datasheet(device_kind)
    if spec is None:
        return {"card": UNKNOWN, "memory": None, "bytes_per_s": None, "matmul_flops_per_s": None,
                "note": f"device_kind {device_kind!r} is not in the datasheet table"}
    return {"card": spec.name, "memory": spec.memory, "bytes_per_s": spec.bytes_per_s,
            "matmul_flops_per_s": spec.matmul_flops_per_s.get(dtype_key(dtype)), "note": spec.note}


def efficiency(ceilings: dict, device_kind: str, dtype) -> dict | None:
    """Measured ceilings as a fraction of this card's datasheet figures, when the card is in DATASHEET."""
    sheet = datasheet_rates(device_kind, dtype)
    if sheet["bytes_per_s"] is None or sheet["matmul_flops_per_s"] is None:
        return None
    return {"card": sheet["card"], "bandwidth": ceilings["bandwidth"]["bytes_per_s"] / sheet["bytes_per_s"],
            "matmul": ceilings["matmul"]["flops_per_s"] / sheet["matmul_flops_per_s"]}

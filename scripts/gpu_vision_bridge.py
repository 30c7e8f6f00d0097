"""GPU check and timing of the vision-engine bridge (bridges/): SigLIP run by an engine outside XLA, called through
the XLA FFI custom call "pi05_vision_engine" from inside the jitted sampler, on XLA's CUDA stream.

The engine here is the builtin CUDA SigLIP (bridges/csrc/cuda_engine.cu, float32, no cuBLAS/TF32): TensorRT's
builder cannot be installed on these machines, so this exercises the same handler and engine interface a TensorRT
plan goes through, not TensorRT itself.

Run from the repo root on the GPU machine:   python scripts/gpu_vision_bridge.py        (about 1-2 minutes)
The CUDA library is built there when nvcc is found (PATH, /usr/local/cuda, or the nvidia-cuda-nvcc wheel);
otherwise build it on the dev machine first (`python -m bridges.build_ffi --platform cuda`) and carry
bridges/_build. Prints:
  1. parity: the engine inside jit vs pi05_jax.siglip (matmul precision "highest") on the tiny reference model,
     3 and 6 images: relative error (tolerance 1e-4);
  2. sampler: tiny reference checkpoint, float32, all three reference cases, `--kernels reference` and `compact`:
     actions with the bridged vision vs `--vision xla` (same kernels) vs upstream's out/fp32/actions (tolerance
     1e-4, checked under matmul precision "highest"; default precision printed too);
  3. command buffer: whether XLA's optimized HLO puts the custom call inside a command-buffer computation, and the
     handler's counters over 50 runs of the jitted sampler (a call captured in a CUDA graph is replayed without
     calling the handler again; no host round trip: the handler never synchronizes or copies to the host). Done
     with XLA's default flags and again in a child process with CUSTOM_CALL command buffers forced on;
  4. timing at full SigLIP size (So400m/14: width 1152, 27 layers, head to 2048; random weights), 2 and 3 images:
     XLA float32 (default precision), XLA float32 "highest", XLA bfloat16, and the engine; median ms of 30 runs,
     plus the engine's relative error against XLA float32 "highest".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORCED_FLAGS = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
TOLERANCE = 1e-4
REPEATS = 30
DEADLINE_S = 170.0
START = time.perf_counter()


def reference_dir() -> pathlib.Path:
    for p in (os.environ.get("PI05_REFERENCE"), ROOT.parent / "shared/reference/tiny_pi05",
              ROOT / "shared/reference/tiny_pi05"):
        if p and (pathlib.Path(p) / "model_cases.npz").is_file():
            return pathlib.Path(p)
    sys.exit("shared reference data not found (set PI05_REFERENCE)")


def rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def median_ms(fn, *args) -> float:
    import jax

    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def command_buffer_report(hlo: str) -> str:
    """Which computation holds the custom call, and is it an outlined command buffer."""
    current, holders, cmd_buffers = "", [], set()
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            if "command_buffer" in current:
                cmd_buffers.add(current)
        if 'custom_call_target="pi05_vision_engine"' in line:
            holders.append(current)
    inside = [h for h in holders if "command_buffer" in h]
    return (f"custom call in {holders or 'NOT FOUND'}; command-buffer computations: {len(cmd_buffers)}; "
            f"custom call inside one: {'yes' if inside else 'no'}")


def sampler_setup(ref: pathlib.Path, tmp: pathlib.Path):
    """The tiny reference model, builtin engines for 2, 3 and 6 images, and the bridged `reference` and `compact`
    implementations; returns (model, [(kernels, case, obs, noise, steps, bridged name, upstream actions)])."""
    import numpy as np

    import pi05_jax.fast_path  # noqa: F401  (registers `compact`)
    from bridges import vision_bridge
    from bridges.builtin_engine import write_builtin_engine
    from pi05_jax.observation import observation_from_arrays
    from pi05_jax.runtime import Model

    model = Model.load(ref / "checkpoint", dtype="float32")
    engines = []
    for views in (2, 3, 6):
        path = tmp / f"tiny_v{views}.p5ve"
        write_builtin_engine(model.params["PaliGemma"]["img"], path, views=views)
        engines.append(vision_bridge.VisionEngine.open(path, out_width=model.config.llm.width,
                                                       model_dtype="float32"))
    engine_set = vision_bridge.EngineSet(tuple(engines))
    names = {k: vision_bridge.register_bridged(k, engine_set) for k in ("reference", "compact")}
    cases = np.load(ref / "model_cases.npz")
    out = []
    for kernels in ("reference", "compact"):
        for case in ("libero_like", "batch2_mixed", "three_steps"):
            prefix = f"{case}/in/"
            ins = {k[len(prefix):]: cases[k] for k in cases.files if k.startswith(prefix)}
            obs = observation_from_arrays(ins, model.config)
            out.append((kernels, case, obs, ins["noise"], int(ins["num_steps"]), names[kernels],
                        cases[f"{case}/out/fp32/actions"]))
    return model, out


def section_command_buffer(model, runs, platform: str) -> None:
    import jax
    import jax.numpy as jnp

    from bridges import vision_bridge
    from pi05_jax import sampler

    kernels, case, obs, noise, steps, name, _ = runs[0]
    noise = jnp.asarray(noise)
    lowered = sampler._sample_jit.lower(model.params, obs, noise, steps, name)
    print(f"  {kernels} {case}: {command_buffer_report(lowered.compile().as_text())}")
    fn = lambda: sampler._sample_jit(model.params, obs, noise, steps, name)
    jax.block_until_ready(fn())
    before = vision_bridge.stats(platform)
    for _ in range(50):
        out = fn()
    jax.block_until_ready(out)
    after = vision_bridge.stats(platform)
    d = {k: after[k] - before[k] for k in after}
    print(f"  50 runs of the jitted sampler: handler executes {d['executes']} (during CUDA-graph capture "
          f"{d['captured']}), instantiates {d['instantiates']}; "
          f"{'replayed from a CUDA graph' if d['executes'] < 50 else 'handler called every run (no graph replay)'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only-command-buffer", action="store_true", help="(child process) section 3 only")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="dry run of sections 1-3 on the CPU library (no command buffers, no timing)")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bridges import build_ffi, vision_bridge
    from pi05_jax import siglip

    ref = reference_dir()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="pi05_vision_bridge_"))
    if not args.only_command_buffer:
        print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; nvcc: {build_ffi.find_nvcc()}")
    platform = "cpu" if args.smoke_cpu else "cuda"
    vision_bridge.register(platform)
    model, runs = sampler_setup(ref, tmp)

    if args.only_command_buffer:
        print(f"3b. command buffer with XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
        section_command_buffer(model, runs, platform)
        return 0

    print("1. parity of the engine inside jit vs pi05_jax.siglip (float32, precision highest), tiny model")
    img = model.params["PaliGemma"]["img"]
    cases = np.load(ref / "model_cases.npz")
    pool = np.concatenate([cases[f"batch2_mixed/in/images/{v}"] for v in ("base_0_rgb", "left_wrist_0_rgb",
                                                                          "right_wrist_0_rgb")])
    ok = True
    for views in (3, 6):
        engine = vision_bridge.VisionEngine.open(tmp / f"tiny_v{views}.p5ve")
        images = jnp.asarray(pool[:views])
        got = jax.jit(engine)(images)
        with jax.default_matmul_precision("highest"):
            want = jax.jit(lambda x: siglip.encode_images(img, x, dtype=jnp.float32))(images)
        err = rel_err(got, want)
        ok &= err <= TOLERANCE
        print(f"  {views} images: rel err {err:.2e}  {'OK' if err <= TOLERANCE else 'FAIL'}")

    print("2. sampler actions, float32: bridged vision vs --vision xla vs upstream (tolerance 1e-4)")
    for precision in ("highest", "default"):
        for kernels, case, obs, noise, steps, name, upstream in runs:
            if precision == "default" and kernels != "reference":
                continue  # default precision only shows what TF32 does to the plain path
            context = jax.default_matmul_precision("highest") if precision == "highest" else contextlib.nullcontext()
            with context:
                model.kernels = kernels
                xla = np.asarray(model.sample(obs, noise=noise, num_steps=steps))
                model.kernels = name
                bridged = np.asarray(model.sample(obs, noise=noise, num_steps=steps))
            e1, e2, e3 = rel_err(bridged, xla), rel_err(bridged, upstream), rel_err(xla, upstream)
            if precision == "highest":
                ok &= max(e1, e2) <= TOLERANCE
            print(f"  [{precision:7s}] {kernels:9s} {case:13s} bridged vs xla {e1:.2e}  bridged vs upstream "
                  f"{e2:.2e}  (xla vs upstream {e3:.2e})")

    print("3. command buffer (XLA default flags)")
    section_command_buffer(model, runs, platform)
    if args.smoke_cpu:
        print(f"overall (cpu smoke run): {'OK' if ok else 'FAIL'}")
        return 0 if ok else 1
    child = subprocess.run([sys.executable, __file__, "--only-command-buffer"], capture_output=True, text=True,
                           env={**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FORCED_FLAGS}"},
                           timeout=120)
    lines = [ln for ln in child.stdout.splitlines() if ln.strip()]
    print("\n".join(lines[-3:]) if child.returncode == 0 else
          f"  child with {FORCED_FLAGS!r} failed (exit {child.returncode}): {child.stderr.strip()[-400:]}")

    if time.perf_counter() - START > DEADLINE_S:
        print("4. skipped (deadline)")
        return 0 if ok else 1
    print("4. timing at full SigLIP size (So400m/14 -> 2048, random weights), median ms of 30 runs")
    full = full_size_params()
    full_dev = jax.device_put(full)
    full_bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), full_dev)
    xla32 = jax.jit(lambda p, x: siglip.encode_images(p, x, dtype=jnp.float32))
    xla16 = jax.jit(lambda p, x: siglip.encode_images(p, x, dtype=jnp.bfloat16))
    from bridges.builtin_engine import write_builtin_engine

    rng = np.random.default_rng(1)
    for views in (2, 3):
        path = tmp / f"full_v{views}.p5ve"
        write_builtin_engine(full, path, views=views)
        engine = jax.jit(vision_bridge.VisionEngine.open(path))
        images = jnp.asarray(rng.uniform(-1, 1, (views, 224, 224, 3)).astype(np.float32))
        t_engine = median_ms(engine, images)
        t32 = median_ms(xla32, full_dev, images)
        t16 = median_ms(xla16, full_bf16, images)
        with jax.default_matmul_precision("highest"):
            xla_hi = jax.jit(lambda p, x: siglip.encode_images(p, x, dtype=jnp.float32))
            t_hi = median_ms(xla_hi, full_dev, images)
            want = xla_hi(full_dev, images)
        err = rel_err(engine(images), want)
        ok &= err <= TOLERANCE
        print(f"  {views} images: XLA fp32 {t32:7.2f}  XLA fp32-highest {t_hi:7.2f}  XLA bf16 {t16:7.2f}  "
              f"engine (builtin fp32) {t_engine:7.2f}   engine rel err vs XLA highest {err:.2e}")
        path.unlink()
    print(f"overall: {'OK' if ok else 'FAIL'} ({time.perf_counter() - START:.0f} s)")
    return 0 if ok else 1


def full_size_params() -> dict:
    """So400m/14 SigLIP with a 2048-wide head, random normal(0, 1/sqrt(fan_in)) weights, LayerNorm scales ~1."""
    import numpy as np

    from checkpoints.layout import param_shapes, unflatten
    from pi05_jax.config import preset

    rng = np.random.default_rng(0)
    flat = {}
    for path, shape in sorted(param_shapes(preset("full")).items()):
        if not path.startswith("PaliGemma/img/"):
            continue
        key = path[len("PaliGemma/img/"):]
        w = rng.standard_normal(shape, dtype=np.float32)
        if key.endswith("/scale"):
            w = 1.0 + 0.05 * w
        elif key.endswith("/bias") or key == "pos_embedding":
            w *= 0.02
        elif key == "embedding/kernel":  # [p, p, 3, D]
            w *= 1.0 / np.sqrt(np.prod(shape[:3]))
        elif "/out/" in key:  # [L, N, H, D]
            w *= 1.0 / np.sqrt(shape[-3] * shape[-2])
        elif len(shape) == 4:  # query/key/value [L, D, N, H]
            w *= 1.0 / np.sqrt(shape[-3])
        else:  # Dense [L, in, out], head [D, O]
            w *= 1.0 / np.sqrt(shape[-2])
        flat[key] = w
    return unflatten(flat)


if __name__ == "__main__":
    sys.exit(main())

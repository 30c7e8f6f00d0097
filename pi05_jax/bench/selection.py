"""The selection `bench` and `profile` share: which model, which inputs, which implementations, on which device.

`add_selection_args` puts the arguments on a parser; `Selection.from_args` validates them (one clear line per
mistake, before anything slow happens); `build` puts the weights and synthetic inputs on the device.
Random weights (real architecture, never zeros) stand in when no checkpoint is given; nothing is written to disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from pi05_jax.commands.common import KERNELS_HELP, UsageError, default_dtype
from pi05_jax.config import PRESETS, Pi05Config

DTYPE_NAMES = ("bfloat16", "float32")


def add_selection_args(p: argparse.ArgumentParser, *, runs_default: int, runs_help: str) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR", help="openpi checkpoint directory (params/ + assets/)")
    src.add_argument("--preset", choices=PRESETS, default=None,
                     help="random weights with this architecture when no checkpoint is given (default: tiny); "
                          "'full' is the real pi0.5 size (3.35B params)")
    p.add_argument("--views", type=int, default=2, help="valid camera views per row, 1..3 (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=60,
                   help="valid prompt tokens per row, 1..max_token_len (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="Euler steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="rows per call (default: %(default)s)")
    p.add_argument("--kernels", default="reference", metavar="A,B,...",
                   help=f"implementations, comma separated; ratios are against the first. Registered: "
                        f"{KERNELS_HELP} (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="weights and compute dtype (default: "
                   "bfloat16 on a GPU, what openpi serves with; float32 on the CPU, which emulates bfloat16 slowly)")
    p.add_argument("--runs", type=int, default=runs_default, help=runs_help)
    p.add_argument("--device", default="auto", choices=("auto", "gpu", "cpu"),
                   help="'gpu' fails unless JAX sees a GPU; 'cpu' forces the CPU (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


@dataclasses.dataclass(frozen=True)
class Selection:
    config: Pi05Config
    source: str  # "preset:tiny" | "checkpoint:<dir>"
    checkpoint: str | None
    preset: str | None
    views: int
    prompt_len: int
    steps: int
    batch: int
    dtype: str
    kernels: tuple[str, ...]
    runs: int
    device: str
    platform: str
    seed: int

    @classmethod
    def from_args(cls, args) -> Selection:
        platform = choose_device(args.device)
        if args.checkpoint:
            from checkpoints.openpi_io import read_config

            config = read_config(args.checkpoint)
            source, preset_name = f"checkpoint:{args.checkpoint}", None
        else:
            from pi05_jax.config import preset

            preset_name = args.preset or "tiny"
            config, source = preset(preset_name), f"preset:{preset_name}"
        n_views = len(config.image_keys)
        if not 1 <= args.views <= n_views:
            raise UsageError(f"--views must be in 1..{n_views} (this model's camera slots), got {args.views}")
        if not 1 <= args.prompt_len <= config.max_token_len:
            raise UsageError(f"--prompt-len must be in 1..{config.max_token_len} (the model's max_token_len), "
                             f"got {args.prompt_len}")
        for flag, value in (("--steps", args.steps), ("--batch", args.batch), ("--runs", args.runs)):
            if value < 1:
                raise UsageError(f"{flag} must be >= 1, got {value}")
        from pi05_jax.bench.implementations import parse_names, resolve

        resolve(args.kernels)
        return cls(config=config, source=source, checkpoint=args.checkpoint, preset=preset_name, views=args.views,
                   prompt_len=args.prompt_len, steps=args.steps, batch=args.batch,
                   dtype=args.dtype or default_dtype(platform),
                   kernels=tuple(parse_names(args.kernels)), runs=args.runs, device=args.device,
                   platform=platform, seed=args.seed)

    def describe(self) -> str:
        return (f"{self.source}, {self.dtype}, batch {self.batch}, {self.views} valid view(s), "
                f"{self.prompt_len}-token prompt, {self.steps} steps")

    def as_dict(self) -> dict:
        return {"source": self.source, "checkpoint": self.checkpoint, "preset": self.preset, "views": self.views,
                "prompt_len": self.prompt_len, "steps": self.steps, "batch": self.batch, "dtype": self.dtype,
                "kernels": list(self.kernels), "runs": self.runs, "seed": self.seed,
                "architecture": dataclasses.asdict(self.config)}


def choose_device(device: str) -> str:
    """Apply --device before JAX picks a backend; returns the platform JAX will use."""
    import jax

    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
        return "cpu"
    from pi05_jax.bench.hardware import has_gpu

    if device == "gpu" and not has_gpu():
        raise UsageError(f"--device gpu: JAX sees no GPU here (backend {jax.default_backend()!r}); install jax "
                         f"with CUDA or use --device auto/cpu")
    return jax.default_backend()


@dataclasses.dataclass
class Built:
    params: dict
    obs: object
    noise: object
    weights_s: float
    weights_source: str  # "checkpoint load" | "random init (no checkpoint)"


def random_weights(config: Pi05Config, *, seed: int, dtype: str) -> dict:
    """Random weights in openpi's layout on the device, never zeros. On the CPU backend:
    `checkpoints.random_init.random_params` (host numpy). On an accelerator: `device_random_params`, because the
    host needs minutes for the full model (numpy draws ~25M normals/s)."""
    import jax

    if jax.default_backend() == "cpu":
        import ml_dtypes

        from checkpoints.random_init import random_params

        np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
        return jax.device_put(random_params(config, seed=seed, dtype=np_dtype))
    return device_random_params(config, seed=seed, dtype=dtype)


def _hashed_uniform(shape: tuple[int, ...], salt):
    """Uniform on [-sqrt(3), sqrt(3)) (mean 0, variance 1) from a 32-bit integer hash of each element's index:
    elementwise, so one leaf is one fused loop that compiles in milliseconds (threefry/rbg take seconds per leaf
    to compile on the CPU). Statistical quality is irrelevant here; timings do not depend on weight values."""
    import jax
    import jax.numpy as jnp

    x = jax.lax.iota(jnp.uint32, int(np.prod(shape))) * jnp.uint32(0x9E3779B9) + salt
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    x = x ^ (x >> 16)
    u = (x >> 8).astype(jnp.float32) * np.float32(1.0 / (1 << 24))
    return ((u - 0.5) * np.float32(2 * np.sqrt(3))).reshape(shape)


def device_random_params(config: Pi05Config, *, seed: int, dtype: str) -> dict:
    """Every leaf drawn on the device with unit variance times `checkpoints.random_init`'s per-key scale (fan-in
    for weights, small non-zero norms and biases), as `random_params` does; uniform instead of normal."""
    import jax

    from checkpoints.layout import param_shapes, unflatten
    from checkpoints.random_init import init_scale

    shapes = sorted((path, tuple(shape)) for path, shape in param_shapes(config).items())
    scales = np.asarray([init_scale(path, shape) for path, shape in shapes], np.float32)
    salts = np.asarray([(seed * 0x27D4EB2F + i * 0x632BE5AB) % (1 << 32) for i in range(len(shapes))], np.uint32)

    @jax.jit
    def draw(salts, scales):
        return {path: (_hashed_uniform(shape, salts[i]) * scales[i]).astype(dtype)
                for i, (path, shape) in enumerate(shapes)}

    return unflatten(draw(salts, scales))


def build(sel: Selection, say) -> Built:
    import jax

    from pi05_jax.synthetic import synthetic_noise, synthetic_observation

    t0 = time.perf_counter()
    if sel.checkpoint:
        from checkpoints.openpi_io import load_params
        from pi05_jax.runtime import DTYPES

        _, params = load_params(sel.checkpoint, dtype=DTYPES[sel.dtype], progress=say)
        source = "checkpoint load"
    else:
        say(f"random {sel.preset} weights in {sel.dtype} (real architecture, not written to disk)")
        params = random_weights(sel.config, seed=sel.seed, dtype=sel.dtype)
        source = "random init (no checkpoint)"
    params = jax.block_until_ready(params)
    weights_s = time.perf_counter() - t0
    obs = synthetic_observation(sel.config, batch=sel.batch, views=sel.views, prompt_len=sel.prompt_len,
                                seed=sel.seed)
    obs = jax.block_until_ready(jax.device_put(obs))
    noise = jax.block_until_ready(jax.device_put(synthetic_noise(sel.config, batch=sel.batch, seed=sel.seed)))
    return Built(params=params, obs=obs, noise=noise, weights_s=weights_s, weights_source=source)

"""`pi05 demo`: the embedded default. Makes (once, cached) a random-weight checkpoint in openpi's exact layout with
this project's own code, loads it through the same loader as real checkpoints, runs inference on a synthetic
observation and prints actions and timing. With --checkpoint it runs that synthetic observation on a checkpoint of
yours instead: an openpi checkpoint or a `pi05 quantize` output (FP8 / FP4)."""

from __future__ import annotations

import os
import pathlib
import statistics
import time

from pi05_jax.commands.common import Progress, add_implementation_args, formatter, resolve_implementation

EPILOG = """\
The checkpoint is cached under $PI05_CACHE (default ~/.cache/pi05_jax)/demo-<preset>; delete it to rebuild.

--checkpoint DIR skips the random-weight checkpoint (--preset and --checkpoint-dir do not apply): the synthetic
observation is sized from DIR's own config, and DIR is only read.

examples:
  pi05 demo                              tiny model on the CPU or GPU, a few seconds
  pi05 demo --preset full --runs 20      full-size pi0.5 (3.35B params) with random weights; wants a GPU
  pi05 demo --kernels reference          the plain-JAX reference instead of this platform's default
  pi05 demo --checkpoint ckpt/pi05_libero_fp8 --output actions.npz
                                         a checkpoint of yours (here a `pi05 quantize` output), actions saved
"""


def register(sub) -> None:
    p = sub.add_parser("demo", help="random-weight model on a synthetic observation: actions and timing",
                       description=__doc__, epilog=EPILOG, formatter_class=formatter())
    p.add_argument("--preset", default=None, choices=["tiny", "full"],
                   help="architecture of the random-weight checkpoint (default: tiny)")
    add_implementation_args(p)
    p.add_argument("--views", type=int, default=2, help="valid camera views, 1..3 (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=60, help="valid prompt tokens (default: %(default)s)")
    p.add_argument("--num-steps", type=int, default=10, help="Euler steps (default: %(default)s)")
    p.add_argument("--runs", type=int, default=5, help="timed warm runs (default: %(default)s)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="where to cache the demo checkpoint")
    where.add_argument("--checkpoint", default=None, metavar="DIR",
                       help="run on this checkpoint instead of the random-weight one: openpi's layout or a "
                            "`pi05 quantize --format fp8|fp4` output (read only)")
    p.add_argument("--output", default=None, metavar="OUT.npz", help="also write the actions (float32) here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run)


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PI05_CACHE", pathlib.Path.home() / ".cache" / "pi05_jax"))


def ensure_demo_checkpoint(preset_name: str, directory: str | None, say) -> pathlib.Path:
    from checkpoints.demo_tokenizer import write_demo_tokenizer
    from checkpoints.random_init import write_random_checkpoint
    from pi05_jax.config import preset
    from pi05_jax.policy.prompt_tokenizer import CHECKPOINT_TOKENIZER

    path = pathlib.Path(directory) if directory else cache_root() / f"demo-{preset_name}"
    if (path / "params" / "_CHECKPOINT_METADATA").exists() or (path / "params" / "_METADATA").exists():
        say(f"using cached demo checkpoint {path}")
        if not (path / CHECKPOINT_TOKENIZER).is_file():  # cached before demo checkpoints carried a tokenizer
            write_demo_tokenizer(path, preset(preset_name).vocab_size)
        return path
    say(f"writing a random-weight {preset_name} checkpoint to {path} (once)")
    tmp = path.with_name(path.name + ".partial")
    # The full model is stored in bfloat16 (6.7 GB instead of 13.4 GB); the loader casts on load either way.
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if preset_name == "full" else "float32"
    write_random_checkpoint(tmp, preset(preset_name), seed=0, dtype=dtype)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path


def run(args) -> int:
    import jax
    import numpy as np

    from pi05_jax.commands.common import UsageError
    from pi05_jax.commands.infer import summarize
    from pi05_jax.runtime import Model
    from pi05_jax.synthetic import synthetic_noise, synthetic_observation

    if args.checkpoint is not None and args.preset is not None:
        raise UsageError("--preset sizes the random-weight checkpoint; --checkpoint brings its own architecture")
    say = Progress(args.quiet)
    say(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    say(resolve_implementation(args))
    if args.checkpoint is not None:
        path = pathlib.Path(args.checkpoint)
        if not path.is_dir():
            raise UsageError(f"--checkpoint {args.checkpoint!r} is not a directory")
    else:
        path = ensure_demo_checkpoint(args.preset or "tiny", args.checkpoint_dir, say)
    t0 = time.perf_counter()
    model = Model.load(path, dtype=args.dtype, kernels=args.kernels, progress=say)
    load_s = time.perf_counter() - t0
    obs = synthetic_observation(model.config, views=args.views, prompt_len=args.prompt_len)
    noise = synthetic_noise(model.config)
    say(f"compiling ({args.kernels}, {args.dtype}, {args.views} views, {args.prompt_len}-token prompt, "
        f"{args.num_steps} steps)")
    print(f"model: {path}: {model.describe()}")
    _, first = model.timed_sample(obs, noise=noise, num_steps=args.num_steps)
    times = []
    for _ in range(max(1, args.runs)):
        actions, t = model.timed_sample(obs, noise=noise, num_steps=args.num_steps)
        times.append(t)
    med = statistics.median(times)
    print(summarize(np.asarray(actions)))
    if args.output:
        out = pathlib.Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, actions=np.asarray(actions, np.float32))
        print(f"wrote {out}")
    print(f"timing: load {load_s:.1f} s, first call (compile + run) {first:.2f} s, "
          f"warm median {med * 1e3:.2f} ms over {len(times)} runs ({1 / med:.1f} Hz) on {jax.devices()[0].device_kind}")
    return 0

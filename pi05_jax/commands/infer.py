"""`pi05 infer`: run the model on recorded inputs (model-level, or raw robot observations through a policy)."""

from __future__ import annotations

import pathlib

import numpy as np

from pi05_jax.commands.common import Progress, UsageError, add_model_args, formatter, resolve_implementation

EPILOG = """\
The inputs file holds one or more cases laid out as `<case>/in/...`, like the shared reference files:
  model level:  <case>/in/images/<view> float32 [B,224,224,3] in [-1,1], <case>/in/image_masks/<view> bool [B],
                <case>/in/state float32 [B,32], <case>/in/tokenized_prompt int32 [B,200],
                <case>/in/tokenized_prompt_mask bool [B,200], optional <case>/in/noise [B,50,32], <case>/in/num_steps
  raw (policy): <case>/in/<raw robot key> as your robot sends them (with --adapter), optional <case>/in/noise [50,32]

examples:
  pi05 infer --checkpoint ckpt/ --inputs model_cases.npz --case libero_like --dtype float32 --output out.npz
  pi05 infer --checkpoint ckpt/ --inputs policy_cases.npz --case libero --adapter libero \\
      --norm-stats libero --tokenizer tokenizer.model --output out.npz
  pi05 compare out.npz model_cases.npz --ref-key libero_like/out/fp32/actions
  pi05 build-vision-engine --checkpoint ckpt/ --views 3 --output siglip_v3.plan
  pi05 infer --checkpoint ckpt/ --inputs model_cases.npz --case libero_like --dtype float32 --output out.npz \\
      --vision tensorrt --vision-engine siglip_v3.plan        # SigLIP through the engine, inside the one jit
"""


def register(sub) -> None:
    from bridges.vision_bridge import add_vision_args

    p = sub.add_parser("infer", help="run the model on inputs from an .npz file", description=__doc__,
                       epilog=EPILOG, formatter_class=formatter())
    add_model_args(p)
    add_vision_args(p)
    p.add_argument("--inputs", required=True, metavar="FILE.npz", help="inputs file (layout below)")
    p.add_argument("--case", required=True, metavar="NAME", help="which case in the inputs file")
    p.add_argument("--num-steps", type=int, default=None, metavar="N",
                   help="Euler steps (default: the case's in/num_steps, else 10)")
    p.add_argument("--seed", type=int, default=0, help="noise seed when the case has no in/noise (default 0)")
    p.add_argument("--output", required=True, metavar="OUT.npz", help="where to write `actions` (float32)")
    p.add_argument("--adapter", default=None, metavar="NAME",
                   help="treat the case as raw robot observations through this adapter (libero, droid, or a "
                        "robot description JSON file)")
    p.add_argument("--norm-stats", default=None, metavar="ASSET_ID",
                   help="norm stats asset id under <checkpoint>/assets/ (default: the only one there)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="sentencepiece model for --adapter (paligemma_tokenizer.model; default: "
                        "<checkpoint>/tokenizer.model, else openpi's cache)")
    p.set_defaults(run=run)


def load_case(path: str, case: str) -> dict[str, np.ndarray]:
    """{key under <case>/in/: array}; errors name the file and the case."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise UsageError(f"inputs file {path!r} does not exist")
    try:
        z = np.load(file, allow_pickle=False)
    except Exception as e:
        raise UsageError(f"inputs file {path!r} is not a readable .npz ({type(e).__name__}: {e})") from e
    prefix = f"{case}/in/"
    arrays = {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}
    if not arrays:
        cases = sorted({k.split("/in/")[0] for k in z.files if "/in/" in k})
        raise UsageError(f"inputs file {path!r} has no case {case!r} (no keys '{prefix}*'); cases: {cases}")
    return arrays


def summarize(actions: np.ndarray) -> str:
    lines = [f"actions shape {tuple(actions.shape)} dtype {actions.dtype}",
             f"  mean {actions.mean():+.4f}  std {actions.std():.4f}  min {actions.min():+.4f}  "
             f"max {actions.max():+.4f}  finite {bool(np.all(np.isfinite(actions)))}"]
    first = actions.reshape(-1, actions.shape[-1])[0]
    shown = ", ".join(f"{v:+.3f}" for v in first[:8])
    lines.append(f"  first action: [{shown}{', ...' if first.size > 8 else ''}]")
    return "\n".join(lines)


def run(args) -> int:
    from bridges.vision_bridge import apply_vision_args, check_vision_args
    from pi05_jax.observation import check_noise, observation_from_arrays
    from pi05_jax.policy.prompt_tokenizer import find_tokenizer
    from pi05_jax.runtime import Model

    say = Progress(args.quiet)
    say(resolve_implementation(args))
    check_vision_args(args)
    arrays = load_case(args.inputs, args.case)
    if args.adapter:  # a raw case's prompt is tokenized: find the tokenizer before loading any weights
        args.tokenizer = str(find_tokenizer(args.tokenizer, args.checkpoint))
    model = Model.load(args.checkpoint, dtype=args.dtype, kernels=args.kernels, progress=say)
    if apply_vision_args(args, model) != args.kernels:
        say(f"vision: {args.vision} engine(s) {args.vision_engine} (implementation {model.kernels})")
    if args.adapter:
        from pi05_jax.policy.raw_infer import run_raw_case

        actions, timings = run_raw_case(model, args, arrays, say)
    else:
        where = f"{args.inputs}:{args.case}/in"
        obs = observation_from_arrays(arrays, model.config, where=where)
        num_steps = args.num_steps if args.num_steps is not None else int(arrays.get("num_steps", 10))
        if num_steps < 1:
            raise UsageError(f"--num-steps must be >= 1, got {num_steps}")
        if "noise" in arrays:
            noise = check_noise(arrays["noise"], obs.batch_size, model.config, key=f"{args.case}/in/noise")
        else:
            rng = np.random.default_rng(args.seed)
            noise = rng.standard_normal((obs.batch_size, model.config.action_horizon, model.config.action_dim),
                                        dtype=np.float32)
        say(f"compiling ({args.kernels}, vision {args.vision}, {args.dtype}, batch {obs.batch_size}, "
            f"{num_steps} steps)")
        _, first = model.timed_sample(obs, noise=noise, num_steps=num_steps)
        actions, second = model.timed_sample(obs, noise=noise, num_steps=num_steps)
        timings = {"first_call_s": first, "run_s": second}
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, actions=np.asarray(actions, np.float32))
    print(summarize(np.asarray(actions)))
    print(f"timing: first call (compile + run) {timings['first_call_s']:.2f} s, "
          f"warm run {timings['run_s'] * 1e3:.1f} ms")
    print(f"wrote {out}")
    return 0

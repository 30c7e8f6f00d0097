"""`pi05 infer --adapter ...`: one raw-observation case (policy_cases.npz layout) through the Policy."""

from __future__ import annotations

import time

import numpy as np

from pi05_jax.policy.pipeline import build_policy


def run_raw_case(model, args, arrays: dict[str, np.ndarray], say) -> tuple[np.ndarray, dict[str, float]]:
    """Actions [horizon, robot action dims] float32 and {"first_call_s", "run_s"} for the raw case `arrays`
    ({raw key: array}, optional "noise" [horizon, action_dim] and "num_steps")."""
    from pi05_jax.commands.common import UsageError

    arrays = dict(arrays)
    noise = arrays.pop("noise", None)
    case_steps = arrays.pop("num_steps", None)
    num_steps = args.num_steps if args.num_steps is not None else int(case_steps if case_steps is not None else 10)
    if num_steps < 1:
        raise UsageError(f"--num-steps must be >= 1, got {num_steps}")
    policy = build_policy(model, checkpoint=args.checkpoint, adapter=args.adapter, norm_stats=args.norm_stats,
                          tokenizer=args.tokenizer, num_steps=num_steps, seed=args.seed)
    say(f"policy: adapter {policy.adapter.name}, norm stats {policy.norm_stats_path}, "
        f"tokenizer {policy.tokenizer.path}")
    cfg = model.config
    if noise is None:
        noise = policy.noise()
    else:
        noise = np.asarray(noise)
        if noise.shape != (cfg.action_horizon, cfg.action_dim):
            raise UsageError(f"{args.case}/in/noise has shape {noise.shape}, expected "
                             f"({cfg.action_horizon}, {cfg.action_dim})")
    say(f"compiling ({model.kernels}, {num_steps} steps)")
    t0 = time.perf_counter()
    policy.infer(arrays, noise=noise)
    t1 = time.perf_counter()
    out = policy.infer(arrays, noise=noise)
    t2 = time.perf_counter()
    return out["actions"], {"first_call_s": t1 - t0, "run_s": t2 - t1}

"""pi0.5 action sampling: vision, prefix, prefill and every flow-matching Euler step in ONE jitted executable, per
(implementation, shapes, num_steps, static plan).

`sample_actions` takes raw params (any layout; the implementation's prepare caches its layout per checkpoint);
`sample_prepared` takes params an implementation has prepared (what runtime.Model holds) and does only the per-call
host work: the plan from the observation's masks, then the executable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pi05_jax import implementations
from pi05_jax.implementations import Implementation
from pi05_jax.observation import Observation


def _noise_for(obs: Observation, params, noise, rng, action_horizon):
    if noise is not None:
        return noise
    if rng is None:
        raise ValueError("sample_actions needs noise= or rng= (deterministic given noise)")
    a = params["action_in_proj"]["kernel"].shape[0]
    return jax.random.normal(rng, (obs.batch_size, action_horizon, a), jnp.float32)


@functools.partial(jax.jit, static_argnames=("num_steps", "impl", "plan"))
def _sample_jit(params, obs, noise, num_steps, impl, plan=None):
    if plan is not None:
        impl = impl.specialize(plan)
    return impl.sample(params, obs, noise, num_steps)


def resolve(kernels: str | Implementation) -> Implementation:
    return implementations.get(kernels) if isinstance(kernels, str) else kernels


def sample_prepared(impl: Implementation, params, observation: Observation, noise, num_steps: int):
    """Actions [B, horizon, action_dim] float32 from params already prepared by `impl.prepare` for num_steps."""
    plan = impl.plan(params, observation) if impl.plan is not None else None
    return _sample_jit(params, observation, jnp.asarray(noise, jnp.float32), num_steps, impl, plan)


def sample_actions(params, observation: Observation, *, noise=None, rng=None, num_steps: int = 10,
                   kernels: str | Implementation = "reference", action_horizon: int = 50):
    """Actions [B, horizon, action_dim] (float32): one executable per (shapes, num_steps, kernels)."""
    impl = resolve(kernels)
    noise = _noise_for(observation, params, noise, rng, action_horizon)
    if impl.prepare is not None:
        params = impl.prepare(params, num_steps)
    return sample_prepared(impl, params, observation, noise, num_steps)

"""Pre-compiling the executables a deployment will see, and counting XLA compilations.

`sampler.sample_actions` compiles one executable per (batch, valid views, prefix bucket, num_steps) for the fast
paths (per (batch, num_steps) for `reference`): the jit is static on the plan the host reads from the observation's
masks (`Implementation.plan`). `precompile` walks the combinations a deployment declares (batch sizes, valid-view
counts, prompt lengths, step counts), runs each distinct executable once, so that steady-state serving never
compiles; `count_compilations` counts backend compilations, which is how tests (and a server's logs) check that.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable

import jax
import numpy as np

from pi05_jax.synthetic import synthetic_arrays, synthetic_noise

# jax records this event (jax._src.dispatch.BACKEND_COMPILE_EVENT) around every XLA compilation it performs.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass(frozen=True)
class ExecutableKey:
    """What one executable is specialised on (plan None: the implementation has no host-side plan)."""

    batch: int
    num_steps: int
    plan: object | None


@dataclasses.dataclass
class CompileCount:
    count: int = 0
    functions: list[str] = dataclasses.field(default_factory=list)  # names of the compiled functions, in order


@contextlib.contextmanager
def count_compilations():
    """Counts XLA backend compilations in the block: `with count_compilations() as c: ...; c.count`."""
    counter = CompileCount()

    def listener(event: str, duration: float, **kwargs):
        del duration
        if event == BACKEND_COMPILE_EVENT:
            counter.count += 1
            counter.functions.append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def deployment_observations(model, *, batch_sizes: Iterable[int] = (1,), views: Iterable[int] = (1, 2, 3),
                            prompt_lens: Iterable[int] | None = None, num_steps: Iterable[int] = (10,)):
    """{ExecutableKey: (observation, num_steps)}: one synthetic observation per distinct executable that inputs of
    these batch sizes, valid-view counts, prompt lengths (default: every length 1..max_token_len) and step counts
    need under `model.kernels`."""
    config = model.config
    impl = model.implementation
    slots = len(config.image_keys)
    prompt_lens = tuple(range(1, config.max_token_len + 1)) if prompt_lens is None else tuple(prompt_lens)
    for n in views:
        if not 1 <= n <= slots:
            raise ValueError(f"precompile: views must be in 1..{slots}, got {n}")
    for t in prompt_lens:
        if not 1 <= t <= config.max_token_len:
            raise ValueError(f"precompile: prompt_lens must be in 1..{config.max_token_len}, got {t}")
    for s in num_steps:
        if s < 1:
            raise ValueError(f"precompile: num_steps must be >= 1, got {s}")
    from pi05_jax.observation import observation_from_arrays

    found: dict[ExecutableKey, tuple] = {}
    for batch in batch_sizes:
        if batch < 1:
            raise ValueError(f"precompile: batch sizes must be >= 1, got {batch}")
        for n in views:
            arrays = synthetic_arrays(config, batch=batch, views=n, prompt_len=max(prompt_lens))
            base = observation_from_arrays(arrays, config, where="precompile observation")
            for t in prompt_lens:
                mask = np.zeros_like(arrays["tokenized_prompt_mask"])
                mask[:, :t] = True
                obs = dataclasses.replace(base, tokenized_prompt_mask=mask)
                for steps in num_steps:
                    plan = impl.plan(model.prepared(steps), obs) if impl.plan is not None else None
                    found.setdefault(ExecutableKey(batch, steps, plan), (obs, steps))
    return found


def precompile(model, *, batch_sizes: Iterable[int] = (1,), views: Iterable[int] = (1, 2, 3),
               prompt_lens: Iterable[int] | None = None, num_steps: Iterable[int] = (10,),
               progress: Callable[[str], None] | None = None) -> list[ExecutableKey]:
    """Compile (by running once, on synthetic inputs) every executable that `model.sample` needs for these inputs;
    returns their keys. Afterwards, inputs inside the declared set never compile again in this process."""
    found = deployment_observations(model, batch_sizes=batch_sizes, views=views, prompt_lens=prompt_lens,
                                    num_steps=num_steps)
    for i, (key, (obs, steps)) in enumerate(found.items()):
        if progress:
            progress(f"precompile {i + 1}/{len(found)}: {model.kernels} {key}")
        noise = synthetic_noise(model.config, batch=key.batch)
        jax.block_until_ready(model.sample(obs, noise=noise, num_steps=steps))
    return list(found)

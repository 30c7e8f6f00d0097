"""Resolving `--kernels a,b,c` against the one implementation list (pi05_jax.implementations), and the
phase-scoped callables bench and profile use.

Phases are wrapped in `jax.named_scope("phase_<name>")` so the compiled program's op metadata says which phase
each op (and, on a GPU, each kernel) belongs to. The model modules are untouched.

A fast path's host-side work runs as `runtime.Model` runs it: `prepare(params, num_steps)` once (its weight layout
and device constants), then per call `plan(params, obs)` (the static shape plan from the observation's masks), which
bench times on its own as the host work before every call.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax

from pi05_jax import implementations
from pi05_jax.implementations import Implementation, KernelsError

PHASE_SCOPE = "phase_"


def available() -> list[str]:
    return list(implementations.IMPLEMENTATIONS)


def parse_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise KernelsError("--kernels is empty; give one or more names separated by commas")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise KernelsError(f"--kernels lists {', '.join(dupes)} more than once")
    return names


def resolve(text: str) -> list[Implementation]:
    """Implementations named in `text` (comma separated), in order; unknown names raise KernelsError."""
    return [implementations.get(n) for n in parse_names(text)]


def _scoped(name: str, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.named_scope(PHASE_SCOPE + name):
            return fn(*args, **kwargs)

    return wrapped


def _extra_required(fn, n_positional: int) -> list[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extra = positional[n_positional:] + [p for p in params if p.kind == p.KEYWORD_ONLY]
    return [p.name for p in extra if p.default is p.empty]


@dataclasses.dataclass(frozen=True)
class Phased:
    """One implementation ready to time: callables over arrays only (num_steps and any plan bound), phases
    named-scoped, and the params they take (the implementation's `prepare` may add device constants)."""

    name: str
    variant: str  # the specialized implementation's name (e.g. with its plan), else the name
    description: str
    params: dict
    sample: object  # (params, obs, noise) -> actions
    vision: object  # (params, obs) -> vision_out
    prefill: object  # (params, obs, vision_out) -> prefix
    denoise: object  # (params, prefix, noise) -> actions
    prepare: object  # () -> None: the host work before every call (the plan from the masks), or None
    # () -> None: the same from the masks as a request brings them (host arrays: what `pi05 serve` plans from; the
    # masks of bench's device-resident observation are device-to-host reads), or None
    prepare_host: object = None


def _check_arguments(fn, n_positional: int, what: str) -> None:
    missing = _extra_required(fn, n_positional)
    if missing:
        raise KernelsError(f"{what} needs argument(s) {', '.join(missing)} that bench cannot supply; bake static "
                           f"choices in with Implementation.plan/specialize")


def phased(impl: Implementation, params, obs, num_steps: int) -> Phased:
    """The implementation prepared (as `runtime.Model` prepares it), specialized to this observation's plan, with
    num_steps bound and each phase in its named scope."""
    base, plan_call, plan_host = impl, None, None
    if impl.prepare is not None:
        params = impl.prepare(params, num_steps)
        impl = impl.specialize(impl.plan(params, obs))
        prepared = params
        host_obs = jax.device_get(obs)  # once, outside any timing

        def plan_call():
            base.plan(prepared, obs)

        def plan_host():
            base.plan(prepared, host_obs)

    for fn, n, phase in ((impl.vision, 2, "vision"), (impl.prefill, 3, "prefill"), (impl.denoise, 4, "denoise"),
                         (impl.sample, 4, "sample")):
        _check_arguments(fn, n, f"{impl.name}.{phase}")
    scoped = dataclasses.replace(impl, vision=_scoped("vision", impl.vision),
                                 prefill=_scoped("prefill", impl.prefill), denoise=_scoped("denoise", impl.denoise))
    return Phased(
        name=base.name,
        variant=impl.name,
        description=base.description,
        params=params,
        sample=lambda params, obs, noise: scoped.sample(params, obs, noise, num_steps),
        vision=scoped.vision,
        prefill=scoped.prefill,
        denoise=lambda params, prefix, noise: scoped.denoise(params, prefix, noise, num_steps),
        prepare=plan_call,
        prepare_host=plan_host,
    )

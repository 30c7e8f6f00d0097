"""Which implementations exist, resolving `--kernels a,b,c`, and the phase-scoped callables bench and profile use.

Fast paths register themselves in `pi05_jax.sampler.IMPLEMENTATIONS` when their module is imported. `load_all`
calls `sampler.load_implementations()` where the sampler offers it, and imports every module of the project's
packages that mentions `Implementation` and calls `register(`, so `--kernels` sees whatever exists in this build;
a module that fails to import is reported on stderr and skipped, never half-used.

Phases are wrapped in `jax.named_scope("phase_<name>")` so the compiled program's op metadata says which phase
each op (and, on a GPU, each kernel) belongs to. The model modules are untouched.

An implementation that specialises on concrete inputs has `prepare(params, obs, num_steps) -> (params, plan)` and
`specialize(plan) -> Implementation` (see `pi05_jax.sampler.Implementation`); bench runs them as
`sampler.sample_actions` does, and times `prepare` (host work before every call) on its own.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pathlib
import re
import sys

import jax

from pi05_jax import sampler

PHASE_SCOPE = "phase_"
_PACKAGES = ("pi05_jax", "pallas_kernels", "bridges")
_SKIP = ("pi05_jax.bench", "pi05_jax.commands")
_REGISTER_CALL = re.compile(r"\bregister\(")


class KernelsError(ValueError):
    """An unknown or unusable --kernels name; one line, exit status 2."""


def _candidate_modules() -> list[str]:
    root = pathlib.Path(sampler.__file__).resolve().parents[1]
    names = []
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            if module.endswith("__init__"):
                module = module[: -len(".__init__")]
            if module == "pi05_jax.sampler" or module.startswith(_SKIP):
                continue
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if "Implementation" in text and _REGISTER_CALL.search(text):
                names.append(module)
    return names


@functools.cache
def load_all() -> tuple[str, ...]:
    """Import every module that registers an implementation; returns the names that failed to import."""
    failed = []
    loader = getattr(sampler, "load_implementations", None)
    if callable(loader):
        loader()
    for module in _candidate_modules():
        try:
            importlib.import_module(module)
        except Exception as e:  # an unfinished fast path must not take the benchmark down
            failed.append(module)
            print(f"warning: skipping {module} (import failed: {type(e).__name__}: {str(e)[:200]})",
                  file=sys.stderr)
    return tuple(failed)


def available() -> list[str]:
    load_all()
    return sorted(sampler.IMPLEMENTATIONS)


def parse_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise KernelsError("--kernels is empty; give one or more names separated by commas")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise KernelsError(f"--kernels lists {', '.join(dupes)} more than once")
    return names


def resolve(text: str, *, platform: str) -> list[sampler.Implementation]:
    """Implementations named in `text` (comma separated), in order; unknown or unusable names raise KernelsError."""
    names = parse_names(text)
    known = available()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KernelsError(f"unknown --kernels {', '.join(map(repr, unknown))}; available: {', '.join(known)}")
    impls = [sampler.IMPLEMENTATIONS[n] for n in names]
    for impl in impls:
        needs = required_platforms(impl)
        if needs and platform not in needs:
            raise KernelsError(f"--kernels {impl.name!r} runs only on {'/'.join(needs)}; this machine's JAX "
                               f"backend is {platform!r}")
    return impls


def required_platforms(impl) -> tuple[str, ...]:
    """Platforms an implementation declares it needs (`platforms` or `requires_gpu` attributes), else ()."""
    platforms = getattr(impl, "platforms", None)
    if platforms:
        return tuple(platforms)
    if getattr(impl, "requires_gpu", False):
        return ("gpu",)
    return ()


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
    prepare: object  # () -> None: the host-side work sampler.sample_actions does before every call, or None


def _check_arguments(fn, n_positional: int, what: str) -> None:
    missing = _extra_required(fn, n_positional)
    if missing:
        raise KernelsError(f"{what} needs argument(s) {', '.join(missing)} that bench cannot supply; bake static "
                           f"choices in with Implementation.prepare/specialize")


def phased(impl, params, obs, num_steps: int) -> Phased:
    """Run the implementation's host-side `prepare` (as `sampler.sample_actions` does), specialize it to the plan,
    bind num_steps and wrap each phase in its named scope."""
    base, prepare = impl, None
    if getattr(impl, "prepare", None) is not None:
        params_in = params
        params, plan = impl.prepare(params, obs, num_steps)
        if getattr(impl, "specialize", None) is None:
            raise KernelsError(f"--kernels {impl.name!r} has prepare() but no specialize(plan)")
        impl = impl.specialize(plan)

        def prepare():
            base.prepare(params_in, obs, num_steps)

    for fn, n, phase in ((impl.vision, 2, "vision"), (impl.prefill, 3, "prefill"), (impl.denoise, 4, "denoise"),
                         (impl.sample, 4, "sample")):
        _check_arguments(fn, n, f"{impl.name}.{phase}")
    scoped = dataclasses.replace(impl, vision=_scoped("vision", impl.vision),
                                 prefill=_scoped("prefill", impl.prefill), denoise=_scoped("denoise", impl.denoise))
    return Phased(
        name=base.name,
        variant=impl.name,
        description=getattr(impl, "description", ""),
        params=params,
        sample=lambda params, obs, noise: scoped.sample(params, obs, noise, num_steps),
        vision=scoped.vision,
        prefill=scoped.prefill,
        denoise=lambda params, prefix, noise: scoped.denoise(params, prefix, noise, num_steps),
        prepare=prepare,
    )

"""The `interpret=None` default shared by the kernels: Pallas interpret mode when the default backend is the CPU."""

from __future__ import annotations

import jax

# Pallas imports its fuser lazily while tracing a pallas_call; that import registers a config flag, which changes
# JAX's tracing context, so every jit traced before it (e.g. the sampler's) would retrace and recompile once on
# its next call. Importing it up front keeps the first compilation the only one.
from jax.experimental.pallas import fuser as _fuser  # noqa: F401


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` -> True on a CPU default backend (CI), False elsewhere; an explicit bool is kept."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)

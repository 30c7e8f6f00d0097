"""The implementations of pi0.5 sampling, in one explicit list: what `--kernels` names, what the CLI, the server and
bench run. Nothing registers itself; a new implementation is a line in IMPLEMENTATIONS.

- `reference`: upstream openpi's computation exactly (pi05_jax.model.reference): every view slot, the padded
  968-token prefix, masked attention. The ground truth.
- `compact`: the fast path (pi05_jax.fast) with XLA's attention: valid views only, the prefix compacted to a bucket,
  packed per-layer weights, adaRMS precomputed per num_steps.
- `pallas`: `compact` with the Pallas kernels (ragged prefill attention, GQA cross-attention, the expert's GeGLU)
  and SigLIP's attention as one jax.nn.dot_product_attention: cuDNN's fused kernel on a GPU in bf16, its XLA
  implementation on the CPU and in float32 (cuDNN has neither; `Ops.describe()` says which runs).
- `megakernel`: `pallas` with each Euler step's expert as one persistent Mosaic GPU kernel
  (pallas_kernels.expert_megakernel via pi05_jax.fast.megakernel). bf16 weights only (bf16 wgmma), so it has no
  float32 parity: its tests compare it against `reference` in bf16 and its phases against their plain-JAX
  emulation (tests/test_megakernel_path.py, tests/test_expert_megakernel.py).

`compact` and `pallas` are tested for float32 parity against `reference` on the shared cases
(tests/test_fast_path.py); `parity_tested` says so, and `default_kernels` picks from those. Every phase of a
float32 model is traced with float32 GEMMs (pi05_jax.model.precision: JAX's default would run them in TF32 on
NVIDIA GPUs).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable

from pi05_jax.fast import path as fast_path
from pi05_jax.fast.options import FastPathOptions
from pi05_jax.model import reference
from pi05_jax.model.precision import exact_float32
from pi05_jax.observation import Observation


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to run pi0.5, split into its three phases so `bench` can time each; `sample` chains them inside
    one jit. vision(params, obs) -> any pytree; prefill(params, obs, vision_out) -> a prefix pytree;
    denoise(params, prefix, noise, num_steps) -> actions [B,T,A] float32.

    Host-side hooks of the fast paths (None for `reference`):
    pack(params, consume) -> params in the implementation's weight layout (once, at load: runtime.Model.load);
    prepare(params, num_steps) -> params the phases take (layout cached per checkpoint, plus device constants);
    plan(params, obs) -> the hashable static shape plan of one call (from the observation's masks, on the host);
    specialize(plan) -> the Implementation with that plan baked into its phases."""

    name: str
    vision: Callable
    prefill: Callable
    denoise: Callable
    description: str = ""
    parity_tested: bool = False  # float32 parity with `reference` is tested on every shared case
    pack: Callable | None = None
    prepare: Callable | None = None
    plan: Callable | None = None
    specialize: Callable | None = None
    options: FastPathOptions | None = None

    def sample(self, params, obs: Observation, noise, num_steps: int):
        prefix = self.prefill(params, obs, self.vision(params, obs))
        return self.denoise(params, prefix, noise, num_steps)


REFERENCE = Implementation(
    name="reference",
    vision=exact_float32(reference.reference_vision),
    prefill=exact_float32(reference.reference_prefill),
    denoise=exact_float32(reference.reference_denoise),
    description="plain JAX, upstream openpi's computation (all view slots, padded 968-token prefix)",
    parity_tested=True,
)


def fast(name: str, options: FastPathOptions, description: str, *, parity_tested: bool = True) -> Implementation:
    """The fast path with these options as an Implementation."""

    def phases(plan):
        return dict(vision=exact_float32(functools.partial(fast_path.vision_phase, plan=plan, options=options)),
                    prefill=exact_float32(functools.partial(fast_path.prefill_phase, plan=plan, options=options)))

    @functools.cache
    def specialize(plan: Hashable) -> Implementation:
        return dataclasses.replace(base, name=f"{name}[views={plan.num_views},prefix={plan.prefix_len}]",
                                   pack=None, prepare=None, plan=None, specialize=None, **phases(plan))

    base = Implementation(
        name=name, description=description, parity_tested=parity_tested, options=options,
        denoise=exact_float32(functools.partial(fast_path.denoise_phase, options=options)),
        pack=lambda params, consume=False: fast_path.pack(params, options, consume=consume),
        prepare=lambda params, num_steps: fast_path.prepare(params, num_steps, options=options),
        plan=lambda params, obs: fast_path.plan(params, obs, options=options),
        specialize=specialize, **phases(None))
    return base


COMPACT = fast("compact", FastPathOptions(attention="xla"),
               "valid views only, compacted bucketed prefix, precomputed adaRMS, packed per-layer weights; XLA "
               "attention and GEMMs")
PALLAS = fast("pallas", FastPathOptions(attention="pallas", fused_attention="vision"),
              "as 'compact', with the Pallas ragged prefill attention, GQA cross-attention and expert GeGLU matmul "
              "(Triton on the GPU, interpret mode on the CPU) and SigLIP's attention fused (cuDNN on the GPU in "
              "bf16)")

MEGAKERNEL = fast("megakernel", FastPathOptions(attention="pallas", fused_attention="vision", expert="megakernel"),
                  "as 'pallas', with each Euler step's action expert (all layers) as one persistent Mosaic GPU "
                  "kernel (bf16 weights only; its phases in interpret mode on the CPU)", parity_tested=False)

IMPLEMENTATIONS: dict[str, Implementation] = {impl.name: impl for impl in (REFERENCE, COMPACT, PALLAS, MEGAKERNEL)}

# What `serve`, `infer` and `demo` run when --kernels is not given, per JAX platform (`default_kernels`).
DEFAULT_KERNELS = {"gpu": "pallas", "cpu": "compact"}


class KernelsError(ValueError):
    """An unknown --kernels name; one line, exit status 2."""


def get(name: str) -> Implementation:
    impl = IMPLEMENTATIONS.get(name)
    if impl is None:
        raise KernelsError(f"unknown --kernels {name!r}; available: {', '.join(IMPLEMENTATIONS)}")
    return impl


def default_kernels(platform: str) -> str:
    """The fastest parity-tested implementation on this JAX platform ("gpu", "cpu", ...)."""
    name = DEFAULT_KERNELS.get(platform, "compact")
    assert IMPLEMENTATIONS[name].parity_tested, name
    return name

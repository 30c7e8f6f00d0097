"""Each fast path's whole one-jit sample at the full pi0.5 size lowers for a Hopper GPU, checked on the CPU.

The params are shapes only (jax.eval_shape through the implementation's own prepare: unstacking, packing, the
adaRMS table), the observation is bench's (2 views + 60 prompt tokens), 10 steps. The kernels are lowered as the GPU
runs them (not interpret mode): Triton kernels to Triton IR for sm_90. This catches, before any device time is
spent, a kernel that cannot be expressed at the shapes the sampler really hands it. The PTX compile and the run need
the card (`pytest -m gpu`).
"""

from __future__ import annotations

import importlib
import pkgutil

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from checkpoints.layout import param_shapes
from pi05_jax import implementations
from pi05_jax.config import preset
from pi05_jax.fast import path as fast_path
from pi05_jax.synthetic import synthetic_noise, synthetic_observation

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

# implementation -> kernels its lowered sample must hold (pallas_call names)
EXPECTED = {
    "pallas": ("ragged_prefill_attention", "gqa_cross_attention_packed", "geglu_matmul"),
    "compact": (),
    "megakernel": ("ragged_prefill_attention", "mosaic_gpu_v2"),  # the expert step: the one Mosaic GPU kernel
}
# kernels a lowered sample must not hold: the megakernel replaces the expert's per-layer kernels
ABSENT = {"megakernel": ("gqa_cross_attention_packed", "geglu_matmul")}


@pytest.fixture
def lowered_as_on_hopper(hopper, monkeypatch):
    """Triton's registration sees an sm_90 GPU (conftest's `hopper`; Mosaic GPU assumes sm_90 without a GPU), and
    every kernel compiles instead of running in interpret mode (the CPU default)."""
    for info in pkgutil.iter_modules(pallas_kernels.__path__):
        module = importlib.import_module(f"pallas_kernels.{info.name}")
        if hasattr(module, "resolve_interpret"):
            monkeypatch.setattr(module, "resolve_interpret", bool)  # None -> False: the compiled kernel
    monkeypatch.setattr(fast_path, "expert_stack_backend", lambda platform: "mosaic")  # the persistent kernel


def _param_shapes(config):
    tree = {}
    for path, shape in param_shapes(config).items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    return tree


@pytest.mark.parametrize("kernels", list(EXPECTED))
def test_full_size_sample_lowers_for_hopper(lowered_as_on_hopper, kernels):
    config = preset("full")
    obs = synthetic_observation(config, views=2, prompt_len=60)
    noise = jnp.asarray(synthetic_noise(config))
    impl = implementations.get(kernels)
    prepared = jax.eval_shape(lambda params: impl.prepare(params, 10), _param_shapes(config))
    sample = impl.specialize(impl.plan(prepared, obs)).sample
    text = jax.jit(sample, static_argnums=3).trace(prepared, obs, noise, 10).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "callback" not in text, "a kernel lowered in interpret mode"
    for name in EXPECTED[kernels]:
        assert name in text, f"{kernels}: no {name} in the lowered sample"
    for name in ABSENT.get(kernels, ()):
        assert name not in text, f"{kernels}: {name} in the lowered sample"
    if kernels == "megakernel":
        assert text.count("mosaic_gpu_v2") == 1, "one persistent kernel launch per Euler step (one call site)"


def test_the_loop_kernel_is_the_whole_denoise_in_the_lowered_sample(lowered_as_on_hopper):
    """FastPathOptions(expert="megakernel-loop"): one Mosaic GPU call site (pallas_kernels.expert_loop: every Euler
    step of a row), none of the per-layer expert kernels, and no step loop left around it in the executable."""
    import dataclasses

    config = preset("full")
    obs = synthetic_observation(config, views=2, prompt_len=60)
    noise = jnp.asarray(synthetic_noise(config))
    impl = implementations.fast("megakernel", dataclasses.replace(implementations.MEGAKERNEL.options,
                                                                  expert="megakernel-loop"), "loop")
    prepared = jax.eval_shape(lambda params: impl.prepare(params, 10), _param_shapes(config))
    sample = impl.specialize(impl.plan(prepared, obs)).sample
    text = jax.jit(sample, static_argnums=3).trace(prepared, obs, noise, 10).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "callback" not in text, "a kernel lowered in interpret mode"
    assert text.count("mosaic_gpu_v2") == 1
    for name in ABSENT["megakernel"]:
        assert name not in text
    assert "stablehlo.while" not in text, "the Euler steps run inside the kernel"

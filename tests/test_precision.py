"""Float32 models are traced with float32 GEMMs (pi05_jax.model.precision): every dot of a float32 sample carries
HIGHEST precision in the lowered program, for the CUDA lowering too (where JAX's default would pick TF32); a
bfloat16 model's dots keep JAX's default."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from pi05_jax import implementations
from pi05_jax.fast import denoise as fast_denoise
from pi05_jax.model.precision import matmul_precision
from pi05_jax.synthetic import synthetic_noise, synthetic_observation

DOT = re.compile(r"stablehlo\.dot_general[^\n]*")


def _lowered_dots(model, kernels: str, platform: str) -> list[str]:
    impl = implementations.get(kernels)
    params = model.params if impl.prepare is None else impl.prepare(model.params, 10)
    obs = synthetic_observation(model.config, views=2, prompt_len=20)
    noise = jnp.asarray(synthetic_noise(model.config))
    sample = impl.sample if impl.plan is None else impl.specialize(impl.plan(params, obs)).sample
    text = jax.jit(sample, static_argnums=3).trace(params, obs, noise, 10).lower(
        lowering_platforms=(platform,)).as_text()
    dots = DOT.findall(text)
    assert dots, "no dot_general in the lowered sample"
    return dots


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
@pytest.mark.parametrize("kernels", ["reference", "compact"])
def test_every_float32_dot_is_highest_precision(tiny_fp32, kernels, platform):
    dots = _lowered_dots(tiny_fp32, kernels, platform)
    loose = [d for d in dots if "HIGHEST" not in d]
    assert not loose, f"{len(loose)} of {len(dots)} float32 dots without HIGHEST precision, e.g. {loose[0][:300]}"


def test_bfloat16_dots_keep_the_default(tiny_bf16):
    dots = _lowered_dots(tiny_bf16, "compact", "cpu")
    assert any("HIGHEST" not in d for d in dots)


def test_modulation_table_of_a_float32_model_uses_float32_gemms(tiny_fp32):
    sub = fast_denoise._conditioning_params(tiny_fp32.params)
    with matmul_precision(jnp.float32):
        text = fast_denoise._table_jit.trace(sub, num_steps=10, dtype=jnp.dtype(jnp.float32)).lower().as_text()
    dots = DOT.findall(text)
    assert dots and all("HIGHEST" in d for d in dots)

"""The plain-JAX path against upstream openpi's saved outputs (shared reference), float32 and bfloat16."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pi05_jax import implementations, sampler
from pi05_jax.model import reference
from pi05_jax.observation import observation_from_arrays
from tests.conftest import MODEL_CASES, case_inputs, cosine, rel_err

FP32_REL_TOL = 1e-5  # float32 rounding only (measured ~1e-7)
BF16_MIN_COSINE = 0.9999
BF16_MAX_REL = 1e-2


def _run(model, cases, name):
    ins = case_inputs(cases, name)
    obs = observation_from_arrays(ins, model.config)
    actions = model.sample(obs, noise=ins["noise"], num_steps=int(ins["num_steps"]))
    return ins, obs, np.asarray(actions)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_float32_actions_match_upstream(tiny_fp32, model_cases, case):
    _, _, actions = _run(tiny_fp32, model_cases, case)
    ref = model_cases[f"{case}/out/fp32/actions"]
    assert actions.shape == ref.shape
    assert rel_err(actions, ref) <= FP32_REL_TOL


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bfloat16_actions_match_upstream(tiny_bf16, model_cases, case):
    _, _, actions = _run(tiny_bf16, model_cases, case)
    ref = model_cases[f"{case}/out/bf16/actions"]
    assert cosine(actions, ref) >= BF16_MIN_COSINE
    assert rel_err(actions, ref) <= BF16_MAX_REL


@pytest.mark.parametrize("case", MODEL_CASES)
def test_float32_intermediates_match_upstream(tiny_fp32, model_cases, case):
    ins = case_inputs(model_cases, case)
    config = tiny_fp32.config
    obs = observation_from_arrays(ins, config)
    got = reference.reference_intermediates(tiny_fp32.params, obs, jnp.asarray(ins["noise"]))
    out = f"{case}/out/fp32"
    for view in config.image_keys:  # computed for every view, masked or not
        assert rel_err(got["image_tokens"][view], model_cases[f"{out}/image_tokens/{view}"]) <= FP32_REL_TOL, view
    assert rel_err(got["prefix_tokens"], model_cases[f"{out}/prefix_tokens"]) <= FP32_REL_TOL
    valid = np.concatenate(
        [np.repeat(ins[f"image_masks/{v}"][:, None], config.tokens_per_image, 1) for v in config.image_keys]
        + [ins["tokenized_prompt_mask"]], axis=1)
    for name in ("prefix_k", "prefix_v"):  # rows of masked tokens hold values that must be ignored
        ours, ref = np.asarray(got[name]), model_cases[f"{out}/{name}"]
        assert ours.shape == ref.shape
        assert rel_err(ours[:, valid], ref[:, valid]) <= FP32_REL_TOL, name
    assert rel_err(got["velocity_t1"], model_cases[f"{out}/velocity_t1"]) <= FP32_REL_TOL


def test_deterministic_given_noise_and_rng(tiny_fp32, model_cases):
    import jax

    ins = case_inputs(model_cases, "libero_like")
    obs = observation_from_arrays(ins, tiny_fp32.config)
    a = np.asarray(tiny_fp32.sample(obs, noise=ins["noise"], num_steps=2))
    b = np.asarray(tiny_fp32.sample(obs, noise=ins["noise"], num_steps=2))
    np.testing.assert_array_equal(a, b)
    r1 = np.asarray(tiny_fp32.sample(obs, rng=jax.random.key(3), num_steps=2))
    r2 = np.asarray(tiny_fp32.sample(obs, rng=jax.random.key(3), num_steps=2))
    r3 = np.asarray(tiny_fp32.sample(obs, rng=jax.random.key(4), num_steps=2))
    np.testing.assert_array_equal(r1, r2)
    assert not np.allclose(r1, r3)


def test_euler_times_follow_upstreams_float32_loop():
    # Upstream: t = 1.0; while t >= -dt/2: ...; t = t + dt, all in float32.
    for n in (1, 3, 10, 7):
        times = reference.euler_times(n)
        assert len(times) == n
        t = np.float32(1.0)
        for got in times:
            assert got == t
            t = np.float32(t + np.float32(-1.0 / n))


def test_sample_is_one_executable(tiny_fp32, model_cases):
    """Vision, prefill and every denoising step compile into one XLA executable (one jit, no host loop)."""
    ins = case_inputs(model_cases, "libero_like")
    obs = observation_from_arrays(ins, tiny_fp32.config)
    lowered = sampler._sample_jit.lower(tiny_fp32.params, obs, jnp.asarray(ins["noise"]), 3,
                                        implementations.REFERENCE)
    hlo = lowered.as_text()
    # The whole computation is one module with the denoise loop inside it, not three separate calls from Python.
    assert hlo.count("func.func public @main") == 1
    assert "stablehlo.while" in hlo

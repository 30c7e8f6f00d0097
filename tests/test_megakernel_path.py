"""The `megakernel` implementation (pi05_jax.fast.megakernel): the whole sampler with the expert's Euler step in
pallas_kernels.expert_megakernel, on the CPU through the kernel's phases in interpret mode.

The shared tiny model cannot run it (head_dim 16, width 32: the kernel's tiles are 64 columns and head_dim 256), so
these tests build a model whose expert the kernel takes at a small grid: head_dim 256, 8:1 GQA, expert width 256 and
mlp_dim 2048 (64 blocks), 2 layers per stack, one camera view, prompts that keep the prefix bucket <= 448 keys (the
attention phase's key tiles must fit the 64 blocks). bfloat16 weights (the kernel's only dtype), compared against
the plain-JAX `reference` on the same inputs, and the data flow against the kernel's own plain-JAX emulation.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_dtypes
import numpy as np
import pytest

from checkpoints.random_init import random_params
from pallas_kernels import expert_megakernel as mk
from pi05_jax import implementations, sampler
from pi05_jax.config import GemmaConfig, Pi05Config, preset
from pi05_jax.fast import denoise as fast_denoise
from pi05_jax.fast import megakernel
from pi05_jax.fast import ops as fast_ops
from pi05_jax.fast import path as fast_path
from pi05_jax.model import layer_stack
from pi05_jax.observation import observation_from_arrays
from pi05_jax.synthetic import synthetic_arrays, synthetic_noise
from tests.conftest import cosine, rel_err

STEPS = 2  # the modulation table's rows per step are checked for both; the sampler runs (interpret mode: ~35 s
SAMPLE_STEPS = 1  # per row and step on the CPU) take one step
# bfloat16 against the bf16 reference (upstream's computation): the shared bf16 bar of tests/test_fast_path.py. The
# kernel keeps the residual stream in float32 where upstream rounds it to bf16 after every add.
BF16_MIN_COSINE = 0.99999
BF16_MAX_REL = 1e-2
LOOP_VS_STEP = 2e-3  # the loop kernel against the per-step kernel: see its test


def _config() -> Pi05Config:
    tiny = preset("tiny")
    return dataclasses.replace(
        tiny,
        llm=GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=256),
        expert=GemmaConfig(width=256, depth=2, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=256),
        siglip=dataclasses.replace(tiny.siglip, depth=1))


@pytest.fixture(scope="module")
def model():
    config = _config()
    return config, jax.device_put(random_params(config, seed=4, dtype=ml_dtypes.bfloat16))


def _obs(config, *, batch, prompt_len, short_prompt=None, seed=0):
    arrays = synthetic_arrays(config, batch=batch, views=1, prompt_len=prompt_len, seed=seed)
    if short_prompt is not None:
        arrays["tokenized_prompt_mask"][1, short_prompt:] = False
    return observation_from_arrays(arrays, config)


def _sample(params, obs, noise, kernels):
    return np.asarray(sampler.sample_actions(params, obs, noise=noise, num_steps=SAMPLE_STEPS, kernels=kernels))


@pytest.fixture(scope="module")
def batch2(model):
    """Two rows with different prompt lengths (different prefix lengths, one bucket): the inputs, the reference's
    actions and the megakernel's."""
    config, params = model
    obs = _obs(config, batch=2, prompt_len=60, short_prompt=23, seed=1)
    noise = synthetic_noise(config, batch=2, seed=1)
    return obs, noise, _sample(params, obs, noise, "reference"), _sample(params, obs, noise, "megakernel")


def test_megakernel_matches_reference_in_bfloat16_batch2_mixed(batch2):
    _, _, ref, got = batch2
    assert np.isfinite(got).all()
    c, e = cosine(got, ref), rel_err(got, ref)
    assert c >= BF16_MIN_COSINE and e <= BF16_MAX_REL, f"cosine {c:.7f}, relative error {e:.2e} vs reference"


def test_megakernel_phases_equal_the_emulated_schedule(model, batch2, monkeypatch):
    """The same sampler with the kernel's plain-JAX emulation in place of its phases: the data flow of the
    integration (tiles, modulation rows, K/V stacking, padding) is the kernel's, to float32 accumulation order."""
    _, params = model
    obs, noise, _, got = batch2

    def emulated(x, w_tiles, kp, vp, mods, final, length, *, tiles, tokens, interpret=True):
        del interpret
        return mk.expert_stack_emulated(x, w_tiles, kp, vp, mods, final, length, tiles=tiles, tokens=tokens)

    monkeypatch.setattr(mk, "expert_stack_phases", emulated)
    fast_ops.ops_for.cache_clear()
    try:
        want = np.asarray(sampler.sample_actions(params, obs, noise=noise, num_steps=SAMPLE_STEPS,
                                                 kernels=dataclasses.replace(implementations.MEGAKERNEL)))
    finally:
        fast_ops.ops_for.cache_clear()
    assert rel_err(got, want) <= 1e-5


# FastPathOptions(expert="megakernel-loop"): every Euler step of a row in one kernel (pallas_kernels.expert_loop)
LOOP = implementations.fast("megakernel", dataclasses.replace(implementations.MEGAKERNEL.options,
                                                              expert="megakernel-loop"),
                            "megakernel, the whole Euler loop per launch", parity_tested=False)


def test_the_loop_kernel_matches_the_reference_and_the_per_step_kernel_batch2_mixed(model, batch2):
    """The same sampler with every Euler step in one kernel per row (its phases in interpret mode): at the bf16 bar
    against `reference`, and against the per-step kernel (the same stack; the action projections as the loop
    kernel's wgmmas instead of XLA's GEMMs, so a float32 sum in another order can move a bf16 rounding). Measured:
    cosine 0.9999932 and relative error 3.69e-3 against reference, the per-step kernel's 3.69e-3; 7.4e-4 between
    the two, from one token entry of 12,800 one bf16 ulp apart after the action-in projection, whose rounding
    flips spread through the stack's bf16 roundings."""
    _, params = model
    obs, noise, ref, per_step = batch2
    got = _sample(params, obs, noise, LOOP)
    assert np.isfinite(got).all() and got.shape == ref.shape
    c, e = cosine(got, ref), rel_err(got, ref)
    assert c >= BF16_MIN_COSINE and e <= BF16_MAX_REL, f"cosine {c:.7f}, relative error {e:.2e} vs reference"
    assert rel_err(got, per_step) <= LOOP_VS_STEP, rel_err(got, per_step)


def test_the_loop_kernel_is_refused_for_another_action_dim(model):
    _, params = model
    bad = {**params, "action_in_proj": {**params["action_in_proj"],
                                        "kernel": params["action_in_proj"]["kernel"][:16]}}
    with pytest.raises(ValueError, match="action_dim 32.*action_in_proj/kernel is \\(16, 256\\)"):
        LOOP.prepare(bad, STEPS)


def test_stacked_weights_are_the_layers_weights(model):
    _, params = model
    prepared = implementations.MEGAKERNEL.prepare(params, STEPS)
    layers = prepared["PaliGemma"]["llm"]["layers"]
    wqkv, wo, wg, wu, wd = megakernel.stacked_expert_weights(layers)
    orig = params["PaliGemma"]["llm"]["layers"]  # stacked, openpi's layout
    n = orig["attn"]["q_einsum_1"]["w"].shape[1]
    for i in range(len(layers)):
        q = np.asarray(orig["attn"]["q_einsum_1"]["w"][i])  # [N, D, H]
        k, v = (np.asarray(orig["attn"]["kv_einsum_1"]["w"][i, c, 0]) for c in range(2))  # [D, H]
        h = q.shape[-1]
        got = np.asarray(wqkv[i]).reshape(q.shape[1], n + 2, h)
        np.testing.assert_array_equal(got[:, :n], np.swapaxes(q, 0, 1))
        np.testing.assert_array_equal(got[:, n], k)
        np.testing.assert_array_equal(got[:, n + 1], v)
        np.testing.assert_array_equal(np.asarray(wo[i]), np.asarray(orig["attn"]["attn_vec_einsum_1"]["w"][i])
                                      .reshape(-1, wo.shape[-1]))
        gating = np.asarray(orig["mlp_1"]["gating_einsum"][i])
        np.testing.assert_array_equal(np.asarray(wg[i]), gating[0])
        np.testing.assert_array_equal(np.asarray(wu[i]), gating[1])
        np.testing.assert_array_equal(np.asarray(wd[i]), np.asarray(orig["mlp_1"]["linear"][i]))


def test_kernel_modulations_are_the_tables_rows(model):
    _, params = model
    prepared = implementations.MEGAKERNEL.prepare(params, STEPS)
    constants = prepared[fast_denoise.CONSTANTS_KEY]
    table, found = constants["adarms"], constants["megakernel"]
    for step in range(STEPS):
        for layer in range(2):
            for j, part in enumerate((*table["attn"], *table["ffw"])):
                np.testing.assert_array_equal(np.asarray(found["mods"][step, layer, j]),
                                              np.asarray(part[step, layer, 0, 0]))
        for j in range(2):
            np.testing.assert_array_equal(np.asarray(found["final"][step, j]),
                                          np.asarray(table["final"][j][step, 0, 0]))


def test_grid_follows_the_expert_sizes(model):
    _, params = model
    prepared = implementations.MEGAKERNEL.prepare(params, STEPS)
    choice = prepared[fast_denoise.CONSTANTS_KEY]["megakernel"]["choice"]
    assert choice.tiles.blocks == 2048 // mk.GATE_COLS and choice.tiles.qkv_splits == 1


# --- what the kernel cannot take: errors that name it ----------------------------------------------------------------


def test_bucket_not_a_multiple_of_64_names_it(model):
    config, params = model
    obs = _obs(config, batch=1, prompt_len=200)  # 256 + 200 tokens: the bucket is capped at 456
    with pytest.raises(ValueError, match="multiple of 64; it is 456"):
        _sample(params, obs, synthetic_noise(config, batch=1), "megakernel")


def test_float32_checkpoint_is_refused_with_the_reason(model):
    config, _ = model
    params = jax.device_put(random_params(config, seed=4, dtype=np.float32))
    with pytest.raises(ValueError, match="bfloat16 weights.*float32"):
        implementations.MEGAKERNEL.prepare(params, STEPS)


def test_the_tiny_models_expert_is_refused_with_its_sizes(tiny_fp32):
    from pi05_jax.fast.packing import pack_weights

    params = layer_stack.unstack_layers(jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16),
                                                     tiny_fp32.params))
    packed = pack_weights(params, transpose_expert_gating=True)
    with pytest.raises(ValueError, match="head_dim 256.*head_dim 16"):
        megakernel.check_expert(packed["PaliGemma"]["llm"]["layers"], ml_dtypes.bfloat16)


def test_prefix_too_long_for_the_grid_names_it(model):
    config, params = model
    arrays = synthetic_arrays(config, batch=1, views=2, prompt_len=60)  # 572 tokens: bucket 576 > the 448 keys
    obs = observation_from_arrays(arrays, config)  # that 64 blocks' attention phase takes
    noise = synthetic_noise(config, batch=1)
    with pytest.raises(ValueError, match="attention N KT"):
        _sample(params, obs, noise, "megakernel")


def test_describe_names_the_megakernel(model):
    _, params = model
    prepared = implementations.MEGAKERNEL.prepare(params, STEPS)
    text = fast_path.ops(prepared, implementations.MEGAKERNEL.options).describe()
    assert "megakernel" in text and "expert mlp" not in text

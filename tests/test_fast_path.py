"""The fast paths `compact` (XLA attention) and `pallas` (Pallas kernels, interpret mode on the CPU) against the
plain-JAX reference implementation and upstream's saved outputs, plus the compile cache.

Both run every case of the shared reference in float32; bfloat16 and the KV-cache checks run `pallas` (interpret mode
is slow) on `batch2_mixed` only, whose rows differ in valid views ([T,T,T] vs [T,F,F]) and prompt length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_prefill_attention
from pi05_jax import compact_prefix, compile_cache, denoise_fast, denoise_fused, fast_path, gemma, sampler
from pi05_jax.observation import observation_from_arrays
from pi05_jax.runtime import Model
from tests.conftest import MODEL_CASES, case_inputs, cosine, rel_err

FP32_REL_TOL = 1e-4  # reference README: float32 differences are rounding only; hold under 1e-4
BF16_MIN_COSINE = 0.9999
BF16_MAX_REL = 1e-2


def _case(model, cases, name):
    ins = case_inputs(cases, name)
    return ins, observation_from_arrays(ins, model.config)


def _sample(model, obs, noise, num_steps, kernels):
    return np.asarray(sampler.sample_actions(model.params, obs, noise=noise, num_steps=num_steps, kernels=kernels))


@pytest.fixture(scope="module")
def reference_fp32_actions(tiny_fp32, model_cases):
    """The plain-JAX reference implementation's actions per case (computed here, once)."""
    out = {}
    for name in MODEL_CASES:
        ins, obs = _case(tiny_fp32, model_cases, name)
        out[name] = _sample(tiny_fp32, obs, ins["noise"], int(ins["num_steps"]), "reference")
    return out


# --- parity ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernels,case", [(k, c) for k in ("compact", "pallas", "fused") for c in MODEL_CASES])
def test_float32_actions_match_reference_and_upstream(tiny_fp32, model_cases, reference_fp32_actions, kernels, case):
    ins, obs = _case(tiny_fp32, model_cases, case)
    actions = _sample(tiny_fp32, obs, ins["noise"], int(ins["num_steps"]), kernels)
    upstream = model_cases[f"{case}/out/fp32/actions"]
    assert actions.shape == upstream.shape
    assert rel_err(actions, reference_fp32_actions[case]) <= FP32_REL_TOL
    assert rel_err(actions, upstream) <= FP32_REL_TOL


@pytest.mark.parametrize("case", MODEL_CASES)
def test_float32_velocity_at_t1_matches_upstream(tiny_fp32, model_cases, case):
    """One Euler step from t=1 is x = noise - v(noise, 1), so noise - actions(num_steps=1) is the velocity at t=1."""
    ins, obs = _case(tiny_fp32, model_cases, case)
    actions = _sample(tiny_fp32, obs, ins["noise"], 1, "compact")
    v_t1 = ins["noise"] - actions
    assert rel_err(v_t1, model_cases[f"{case}/out/fp32/velocity_t1"]) <= FP32_REL_TOL


@pytest.mark.parametrize("kernels,case",
                         [("compact", c) for c in MODEL_CASES] + [(k, "batch2_mixed") for k in ("pallas", "fused")])
def test_bfloat16_actions_match_upstream(tiny_bf16, model_cases, kernels, case):
    ins, obs = _case(tiny_bf16, model_cases, case)
    actions = _sample(tiny_bf16, obs, ins["noise"], int(ins["num_steps"]), kernels)
    upstream = model_cases[f"{case}/out/bf16/actions"]
    assert cosine(actions, upstream) >= BF16_MIN_COSINE
    assert rel_err(actions, upstream) <= BF16_MAX_REL


def _prefill_only(impl_name, params, obs, num_steps):
    impl = sampler.IMPLEMENTATIONS[impl_name]
    params, plan = impl.prepare(params, obs, num_steps)
    spec = impl.specialize(plan)
    prefix = jax.jit(lambda p, o: spec.prefill(p, o, spec.vision(p, o)))(params, obs)
    return plan, prefix


@pytest.mark.parametrize("kernels,case", [("compact", c) for c in MODEL_CASES] + [("pallas", "batch2_mixed")])
def test_compacted_cache_holds_upstreams_valid_kv_rows(tiny_fp32, model_cases, kernels, case):
    ins, obs = _case(tiny_fp32, model_cases, case)
    config = tiny_fp32.config
    plan, prefix = _prefill_only(kernels, tiny_fp32.params, obs, int(ins["num_steps"]))
    valid = np.concatenate(
        [np.repeat(ins[f"image_masks/{v}"][:, None], config.tokens_per_image, 1) for v in config.image_keys]
        + [ins["tokenized_prompt_mask"]], axis=1)  # upstream's padded prefix mask [B, 968]
    n = valid.sum(axis=1)
    np.testing.assert_array_equal(np.asarray(prefix.lengths), n)
    k, v = (np.asarray(a) for a in prefix.kv)
    assert k.shape[2] == plan.prefix_len >= n.max()  # the cache holds only the bucket
    for name, ours in (("prefix_k", k), ("prefix_v", v)):
        ref = model_cases[f"{case}/out/fp32/{name}"]
        for b in range(ours.shape[1]):  # compacted row j holds upstream's j-th valid slot
            assert rel_err(ours[:, b, : n[b]], ref[:, b, valid[b]]) <= FP32_REL_TOL, (name, b)


# --- the pieces -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MODEL_CASES)
def test_plan_is_the_smallest_that_holds_every_row(tiny_fp32, model_cases, case):
    ins, obs = _case(tiny_fp32, model_cases, case)
    config = tiny_fp32.config
    views = np.stack([ins[f"image_masks/{v}"] for v in config.image_keys], axis=1).sum(axis=1)
    lengths = views * config.tokens_per_image + ins["tokenized_prompt_mask"].sum(axis=1)
    bucket = fast_path.FastPathOptions().bucket_size
    plan = compact_prefix.plan_for(tiny_fp32.params, obs, bucket)
    assert plan.num_views == views.max()
    assert plan.prefix_len - bucket < lengths.max() <= plan.prefix_len
    padded = views.max() * config.tokens_per_image + config.max_token_len  # the V valid views' padded layout
    assert plan.prefix_len % bucket == 0 or plan.prefix_len == padded
    assert plan.prefix_len <= padded


def test_mixed_rows_with_gathered_views_and_capped_or_oversized_bucket(tiny_fp32):
    """Batch rows with different valid views in different slots (the view gather pads row 1) and a prompt long enough
    that the bucket is capped at the padded length of 2 views; then a hand-made plan longer than that (padding
    slots past the source). Masked views hold real pixels here, which must be ignored. Against the reference."""
    from pi05_jax.synthetic import synthetic_arrays, synthetic_noise

    config = tiny_fp32.config
    arrays = synthetic_arrays(config, batch=2, views=3, prompt_len=195, seed=7)
    for view, rows in zip(config.image_keys, [(False, False), (True, True), (True, False)], strict=True):
        arrays[f"image_masks/{view}"] = np.array(rows)
    arrays["tokenized_prompt_mask"][1, 30:] = False
    obs = observation_from_arrays(arrays, config)
    noise = synthetic_noise(config, batch=2, seed=7)
    ref = _sample(tiny_fp32, obs, noise, 2, "reference")
    impl = sampler.IMPLEMENTATIONS["compact"]
    _, plan = impl.prepare(tiny_fp32.params, obs, 2)
    padded = 2 * config.tokens_per_image + config.max_token_len
    assert plan == compact_prefix.PrefixPlan(num_views=2, prefix_len=padded)  # capped, not rounded past it
    assert rel_err(_sample(tiny_fp32, obs, noise, 2, "compact"), ref) <= FP32_REL_TOL
    oversized = impl.specialize(compact_prefix.PrefixPlan(num_views=2, prefix_len=padded + 40))
    actions = jax.jit(oversized.sample, static_argnums=3)(tiny_fp32.params, obs, jnp.asarray(noise), 2)
    assert rel_err(actions, ref) <= FP32_REL_TOL


def test_unspecialised_phases_fori_steps_unrolled_layers_reproduce_upstream(tiny_fp32, model_cases):
    """The phases without a host plan (every view slot, whole padded prefix; adaRMS table computed inside the jit),
    with the fori_loop step loop and the expert's layers unrolled (the non-default options) reproduce upstream."""
    ins, obs = _case(tiny_fp32, model_cases, "three_steps")
    options = fast_path.FastPathOptions(unroll_steps=False, unroll_layers=True)
    impl = fast_path.make_implementation("test-options", options)
    run = jax.jit(impl.sample, static_argnums=3)  # raw params: no cached table, no plan
    actions = np.asarray(run(tiny_fp32.params, obs, jnp.asarray(ins["noise"]), int(ins["num_steps"])))
    assert rel_err(actions, model_cases["three_steps/out/fp32/actions"]) <= FP32_REL_TOL


def test_modulation_table_is_cached_per_checkpoint_and_num_steps(tiny_fp32):
    params = tiny_fp32.params
    t10 = denoise_fast.modulation_table(params, 10)
    assert denoise_fast.modulation_table(params, 10) is t10
    t3 = denoise_fast.modulation_table(params, 3)
    assert t3 is not t10 and t3["final"][0].shape[0] == 3
    # Row i is the modulation at upstream's time i, computed the plain way.
    times = sampler.euler_times(3)
    cond = sampler.time_conditioning(params, jnp.full((1,), times[2]))
    plain = gemma.expert_modulations(params["PaliGemma"]["llm"], cond, jnp.float32)
    for ours, ref in zip(t3["ffw"], plain["ffw"], strict=True):
        assert rel_err(ours[2], ref) <= FP32_REL_TOL
    # Another checkpoint (here: one conditioning leaf replaced by an equal copy) gets its own table.
    other = {**params, "time_mlp_in": {k: np.array(x) for k, x in params["time_mlp_in"].items()}}
    t10_other = denoise_fast.modulation_table(other, 10)
    assert t10_other is not t10
    assert rel_err(t10_other["final"][0], t10["final"][0]) == 0.0


BAD_OPTIONS = [  # (options class, bad field values, what the error names)
    (fast_path.FastPathOptions, dict(attention="cuda"), "attention"),
    (fast_path.FastPathOptions, dict(bucket_size=0), "bucket_size"),
    (fast_path.FastPathOptions, dict(vision_attention="cuda"), "vision_attention"),
    (fast_path.FastPathOptions, dict(vision_attention="pallas"), "pad_siglip_heads"),  # head_dim 72: not a power of 2
    (denoise_fused.FusedExpertOptions, dict(qkv="cuda"), "qkv"),
    (fast_path.FastPathOptions, dict(cross_attention_combine="cuda"), "cross_attention_combine"),
    (fast_path.FastPathOptions, dict(expert_geglu="cuda"), "expert_geglu"),
    (fast_path.FastPathOptions, dict(expert_projections="cuda"), "expert_projections"),
    (fast_path.FastPathOptions, dict(expert_residual_norm="cuda"), "expert_residual_norm"),
    (fast_path.FastPathOptions, dict(cross_attention_qkv="fused"), "cross_attention_qkv"),
    (ragged_prefill_attention.BlockSizes, dict(block_rows=24), "block_rows"),
    (fast_path.FastPathOptions, dict(pad_action_rows=-1), "pad_action_rows"),
]


@pytest.mark.parametrize("cls,bad,match", BAD_OPTIONS, ids=[m for _, _, m in BAD_OPTIONS])
def test_bad_options_are_rejected(cls, bad, match):
    with pytest.raises(ValueError, match=match):
        cls(**bad)


# Non-default options of the fast path, each against the reference (float32, the mixed-rows case): the fused expert
# with some pieces as XLA ops, SigLIP attention through the Pallas kernel, another prefill attention tile.
OPTION_VARIANTS = {
    "fused-xla-xla-pallas": fast_path.FastPathOptions(
        attention="pallas", fused_expert=denoise_fused.FusedExpertOptions(qkv="xla", mlp_in="xla", residual="pallas")),
    "fused-pallas-xla-xla": fast_path.FastPathOptions(
        attention="pallas", fused_expert=denoise_fused.FusedExpertOptions(qkv="pallas", mlp_in="xla", residual="xla")),
    "siglip-pallas": fast_path.FastPathOptions(attention="pallas", vision_attention="pallas", pad_siglip_heads=True),
    "prefill-rows-32": fast_path.FastPathOptions(
        attention="pallas", prefill_attention_tiles=ragged_prefill_attention.BlockSizes(block_rows=32)),
    "prefill-keys-128-one-stage": fast_path.FastPathOptions(
        attention="pallas", prefill_attention_tiles=ragged_prefill_attention.BlockSizes(block_k=128, num_stages=1)),
    "cross-attention-split-qkv": fast_path.FastPathOptions(attention="pallas", cross_attention_qkv="split"),
    "expert-geglu-xla": fast_path.FastPathOptions(attention="pallas", expert_geglu="xla"),
    "expert-projections-pallas": fast_path.FastPathOptions(attention="pallas", expert_projections="pallas"),
    "expert-projections-pallas-xla-geglu": fast_path.FastPathOptions(attention="pallas", expert_projections="pallas",
                                                                     expert_geglu="xla"),
    "residual-norm-pallas-out-down": fast_path.FastPathOptions(attention="pallas", expert_projections="out_down",
                                                               expert_residual_norm="pallas"),
    "residual-norm-pallas-all-projections": fast_path.FastPathOptions(
        attention="pallas", expert_projections="pallas", expert_residual_norm="pallas"),
    "residual-norm-pallas-xla-projections": fast_path.FastPathOptions(attention="pallas",
                                                                      expert_residual_norm="pallas"),
    "cross-attention-prefetch": fast_path.FastPathOptions(attention="pallas", cross_attention_prefetch=True),
    # the action tokens padded 50 -> 64 rows (never keys, dropped at the end): exact, on each attention path
    "pad-action-rows-64": fast_path.FastPathOptions(attention="pallas", pad_action_rows=64),
    "pad-action-rows-64-split-qkv": fast_path.FastPathOptions(attention="pallas", pad_action_rows=64,
                                                              cross_attention_qkv="split"),
    "pad-action-rows-64-xla-attention": fast_path.FastPathOptions(attention="xla", pad_action_rows=64),
    # float32: the Mosaic GPU PDL kernels take bfloat16 only, so this runs the Triton kernels on the same weights
    "expert-mosaic-in-float32": fast_path.FastPathOptions(attention="pallas", expert_projections="mosaic",
                                                          expert_geglu="mosaic"),
}

# The Mosaic GPU PDL matmuls (pallas_kernels.pdl_matmul) in the expert, bfloat16 (their only dtype), interpret mode.
MOSAIC_VARIANTS = {
    "pallas-pdl": None,  # the registered implementation (`--kernels pallas-pdl`)
    "mosaic-no-pdl-fused-norm": fast_path.FastPathOptions(attention="pallas", expert_projections="mosaic",
                                                          expert_geglu="mosaic", expert_pdl=False,
                                                          expert_residual_norm="pallas"),
}


@pytest.mark.parametrize("name", list(MOSAIC_VARIANTS))
def test_mosaic_pdl_expert_matches_upstream_bf16_and_pallas(tiny_bf16, model_cases, name, monkeypatch):
    """Every expert projection and GeGLU goes through the PDL kernels (counted while tracing: 3 projections and one
    GeGLU per layer), and the actions pass the bfloat16 gates against upstream and against `pallas`."""
    from pallas_kernels import pdl_matmul

    calls = {"pdl_matmul": 0, "pdl_geglu_matmul": 0}
    rows = set()

    def counting(kernel_name, kernel):
        def counted(x, *args, **kwargs):
            calls[kernel_name] += 1
            rows.add(x.shape[0])
            return kernel(x, *args, **kwargs)
        return counted

    for kernel_name in calls:
        monkeypatch.setattr(pdl_matmul, kernel_name, counting(kernel_name, getattr(pdl_matmul, kernel_name)))
    kernels = name
    if MOSAIC_VARIANTS[name] is not None:
        kernels = f"test-{name}"
        sampler.register(fast_path.make_implementation(kernels, MOSAIC_VARIANTS[name]))
    ins, obs = _case(tiny_bf16, model_cases, "batch2_mixed")
    actions = _sample(tiny_bf16, obs, ins["noise"], int(ins["num_steps"]), kernels)
    depth = tiny_bf16.config.expert.depth
    assert calls == {"pdl_matmul": 3 * depth, "pdl_geglu_matmul": depth}
    assert all(r % 64 == 0 for r in rows), rows  # the action tokens padded to 64 rows: no pad before each kernel
    monkeypatch.undo()
    pallas = _sample(tiny_bf16, obs, ins["noise"], int(ins["num_steps"]), "pallas")
    upstream = model_cases["batch2_mixed/out/bf16/actions"]
    for want in (upstream, pallas):
        assert cosine(actions, want) >= BF16_MIN_COSINE
        assert rel_err(actions, want) <= BF16_MAX_REL


def test_pdl_path_in_float32_says_it_runs_the_triton_kernels(tiny_fp32, model_cases):
    ins, obs = _case(tiny_fp32, model_cases, "batch2_mixed")
    fast_path._warned.cache_clear()  # said once per process: forget an earlier test's
    with pytest.warns(UserWarning, match="bfloat16 only"):
        sampler.IMPLEMENTATIONS["pallas-pdl"].prepare(tiny_fp32.params, obs, int(ins["num_steps"]))


def test_action_rows_are_padded_where_the_mosaic_matmuls_run():
    assert fast_path.FastPathOptions(attention="pallas").action_rows == 0
    assert fast_path.FastPathOptions(attention="pallas", expert_geglu="mosaic").action_rows == 64
    assert fast_path.FastPathOptions(attention="pallas", expert_projections="mosaic").action_rows == 64
    assert fast_path.FastPathOptions(attention="xla", expert_projections="mosaic").action_rows == 0  # XLA's GEMMs
    assert fast_path.FastPathOptions(attention="pallas", expert_geglu="mosaic", pad_action_rows=0).action_rows == 0


def test_prefetch_is_wired_only_where_it_can_run():
    """The L2 prefetch needs the packed attention and the transposed gating weight (the Pallas GeGLU)."""
    on = fast_path.FastPathOptions(attention="pallas", cross_attention_prefetch=True)
    assert fast_path.expert_matmuls(on).prefetch is not None
    for off in (dataclasses.replace(on, expert_geglu="xla"), dataclasses.replace(on, cross_attention_qkv="split"),
                fast_path.FastPathOptions(attention="pallas")):
        assert fast_path.expert_matmuls(off).prefetch is None


@pytest.mark.parametrize("name", list(OPTION_VARIANTS))
def test_option_variants_match_reference(tiny_fp32, model_cases, reference_fp32_actions, name):
    impl = fast_path.make_implementation(f"test-{name}", OPTION_VARIANTS[name])
    sampler.register(impl)
    ins, obs = _case(tiny_fp32, model_cases, "batch2_mixed")
    actions = _sample(tiny_fp32, obs, ins["noise"], int(ins["num_steps"]), impl.name)
    assert rel_err(actions, reference_fp32_actions["batch2_mixed"]) <= FP32_REL_TOL


def test_model_loaded_for_pallas_holds_only_the_packed_weights(reference_dir, model_cases):
    """Model.load(kernels="pallas") packs once (fast_path.pack_for): the model holds the fused QKV, the padded SigLIP
    MLP and the transposed gating instead of the originals, and samples the same actions as `pallas` on params
    loaded for the reference (which prepare packs itself)."""
    packed = Model.load(reference_dir / "checkpoint", dtype="float32", kernels="pallas")
    plain = Model.load(reference_dir / "checkpoint", dtype="float32")
    layers = packed.params["PaliGemma"]["llm"]["layers"]
    for layer in layers:
        assert "qkv_einsum_1" in layer["attn"] and not {"q_einsum_1", "kv_einsum_1"} & set(layer["attn"])
        assert "gating_einsum_t" in layer["mlp_1"] and "gating_einsum" not in layer["mlp_1"]
    for layer in packed.params["PaliGemma"]["img"]["Transformer"]["encoderblock"]:
        assert set(layer["MultiHeadDotProductAttention_0"]) == {"qkv", "out"}
    ins, obs = _case(plain, model_cases, "batch2_mixed")
    want = _sample(plain, obs, ins["noise"], int(ins["num_steps"]), "pallas")
    got = np.asarray(packed.sample(obs, noise=ins["noise"], num_steps=int(ins["num_steps"])))
    np.testing.assert_array_equal(got, want)


# --- the compile cache ----------------------------------------------------------------------------------------------


def test_precompiled_buckets_never_recompile(tiny_fp32):
    from pi05_jax.synthetic import synthetic_arrays, synthetic_noise

    model = Model(config=tiny_fp32.config, params=tiny_fp32.params, kernels="compact")
    config = model.config
    keys = compile_cache.precompile(model, batch_sizes=(1,), views=(2,), prompt_lens=(10, 100), num_steps=(2,))
    plans = {k.plan for k in keys}
    assert len(keys) == len(plans) == 2  # two prompt lengths in two different buckets

    def obs_for(masks, prompt_len):
        arrays = synthetic_arrays(config, views=3, prompt_len=prompt_len, seed=prompt_len)
        for view, valid in zip(config.image_keys, masks, strict=True):
            arrays[f"image_masks/{view}"] = np.array([valid])
        return observation_from_arrays(arrays, config)

    # Any two valid views, any prompt length inside the precompiled buckets: no compilation at all.
    steady = [obs_for(m, t) for m, t in [((True, True, False), 1), ((True, False, True), 60),
                                         ((False, True, True), 100), ((True, True, False), 64)]]
    steady = [o for o in steady if compact_prefix.plan_for(model.params, o) in plans]
    assert len(steady) == 4
    noise = synthetic_noise(config)
    with compile_cache.count_compilations() as c:
        for obs in steady:
            jax.block_until_ready(model.sample(obs, noise=noise, num_steps=2))
    assert c.count == 0, c.functions

    # A new bucket (one valid view) compiles once, then never again.
    new = obs_for((True, False, False), 10)
    assert compact_prefix.plan_for(model.params, new) not in plans
    with compile_cache.count_compilations() as c:
        jax.block_until_ready(model.sample(new, noise=noise, num_steps=2))
    assert c.count >= 1
    with compile_cache.count_compilations() as c:
        jax.block_until_ready(model.sample(new, noise=noise, num_steps=2))
    assert c.count == 0, c.functions


def test_precompile_rejects_impossible_inputs(tiny_fp32):
    model = dataclasses.replace(tiny_fp32, kernels="compact")
    with pytest.raises(ValueError, match="views"):
        compile_cache.precompile(model, views=(4,))
    with pytest.raises(ValueError, match="prompt_lens"):
        compile_cache.precompile(model, views=(1,), prompt_lens=(0,))


@pytest.mark.parametrize("step_unroll", [2, 5])
def test_steps_unrolled_inside_the_fori_loop_reproduce_upstream(tiny_fp32, model_cases, step_unroll):
    """lax.fori_loop(unroll=U) runs the same steps in the same order: upstream's actions to float32 rounding."""
    name = f"compact_step_unroll{step_unroll}"
    sampler.register(fast_path.make_implementation(name, fast_path.FastPathOptions(step_unroll=step_unroll)))
    try:
        ins = case_inputs(model_cases, "three_steps")
        obs = observation_from_arrays(ins, tiny_fp32.config)
        got = sampler.sample_actions(tiny_fp32.params, obs, noise=ins["noise"], num_steps=int(ins["num_steps"]),
                                     kernels=name)
        assert rel_err(got, model_cases["three_steps/out/fp32/actions"]) <= 1e-4
    finally:
        sampler.IMPLEMENTATIONS.pop(name)
    with pytest.raises(ValueError, match="step_unroll"):
        denoise_fast.denoise(tiny_fp32.params, None, None, 3, step_unroll=0)


def test_pallas_path_compiles_once_in_a_fresh_process(reference_dir):
    """The first call compiles, the second must not (a lazily imported Pallas module once forced a recompile)."""
    import json
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import json
        import numpy as np
        from pi05_jax import compile_cache
        from pi05_jax.observation import observation_from_arrays
        from pi05_jax.runtime import Model
        m = Model.load({str(reference_dir / "checkpoint")!r}, dtype="float32", kernels="pallas")
        z = np.load({str(reference_dir / "model_cases.npz")!r})
        ins = {{k[len("libero_like/in/"):]: z[k] for k in z.files if k.startswith("libero_like/in/")}}
        obs = observation_from_arrays(ins, m.config)
        counts = []
        for _ in range(3):
            with compile_cache.count_compilations() as c:
                m.sample(obs, noise=ins["noise"], num_steps=2)
            counts.append(c.count)
        print("COUNTS", json.dumps(counts))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    counts = json.loads(out.stdout.split("COUNTS", 1)[1].strip())
    assert counts[0] > 0 and counts[1:] == [0, 0], counts


def test_fused_denoise_without_cached_constants_computes_them_in_the_jit(tiny_fp32, model_cases):
    """denoise_fused.denoise on prepared params without the per-checkpoint tables (computed inside the jit instead)
    gives the same actions as with them; and the tables are cached per checkpoint and num_steps."""
    ins, obs = _case(tiny_fp32, model_cases, "three_steps")
    steps = int(ins["num_steps"])
    impl = sampler.IMPLEMENTATIONS["fused"]
    prepared, plan = impl.prepare(tiny_fp32.params, obs, steps)
    assert denoise_fused.fused_constants(prepared, steps) is denoise_fused.fused_constants(prepared, steps)
    spec = impl.specialize(plan)
    prefix = jax.jit(lambda p, o: spec.prefill(p, o, spec.vision(p, o)))(prepared, obs)
    bare = {k: v for k, v in prepared.items() if k != denoise_fast.CONSTANTS_KEY}

    def run(p):
        return jax.jit(lambda p, pre, n: spec.denoise(p, pre, n, steps))(p, prefix, jnp.asarray(ins["noise"]))

    assert rel_err(run(bare), run(prepared)) <= FP32_REL_TOL

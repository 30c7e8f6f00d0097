"""The fast paths `compact` (XLA attention) and `pallas` (Pallas kernels, interpret mode on the CPU) against the
plain-JAX reference implementation and upstream's saved outputs, their weight layout and ops, and the compile cache.

Both run every case of the shared reference in float32; bfloat16 and the KV-cache checks run `pallas` (interpret mode
is slow) on `batch2_mixed` only, whose rows differ in valid views ([T,T,T] vs [T,F,F]) and prompt length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gqa_cross_attention, ragged_prefill_attention
from pallas_kernels.skinny_matmul import SkinnyBlockSizes
from pi05_jax import compile_cache, implementations, sampler
from pi05_jax.fast import denoise as fast_denoise
from pi05_jax.fast import ops as fast_ops
from pi05_jax.fast import path as fast_path
from pi05_jax.fast import prefix as fast_prefix
from pi05_jax.fast.options import FastPathOptions
from pi05_jax.model import gemma, layer_stack, reference
from pi05_jax.observation import observation_from_arrays
from pi05_jax.runtime import Model
from tests.conftest import MODEL_CASES, case_inputs, cosine, rel_err

# float32: the fast paths reorder only GEMM accumulation (fused QKV) and skip masked work exactly; measured ~1e-7
FP32_REL_TOL = 1e-5
# bfloat16 against upstream's bfloat16 actions: what the README claims
BF16_MIN_COSINE = 0.99999
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


@pytest.mark.parametrize("kernels,case", [(k, c) for k in ("compact", "pallas") for c in MODEL_CASES])
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


@pytest.mark.parametrize("kernels,case", [("compact", c) for c in MODEL_CASES] + [("pallas", "batch2_mixed")])
def test_bfloat16_actions_match_upstream(tiny_bf16, model_cases, kernels, case):
    ins, obs = _case(tiny_bf16, model_cases, case)
    actions = _sample(tiny_bf16, obs, ins["noise"], int(ins["num_steps"]), kernels)
    upstream = model_cases[f"{case}/out/bf16/actions"]
    assert cosine(actions, upstream) >= BF16_MIN_COSINE
    assert rel_err(actions, upstream) <= BF16_MAX_REL


def _prefill_only(kernels, params, obs, num_steps):
    impl = implementations.get(kernels)
    params = impl.prepare(params, num_steps)
    plan = impl.plan(params, obs)
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
    k, v = (np.stack([np.asarray(a) for a in layers]) for layers in prefix.kv)  # per-layer tuples -> [L,B,S,K,H]
    assert k.shape[2] == plan.prefix_len >= n.max()  # the cache holds only the bucket
    for name, ours in (("prefix_k", k), ("prefix_v", v)):
        ref = model_cases[f"{case}/out/fp32/{name}"]
        for b in range(ours.shape[1]):  # compacted row j holds upstream's j-th valid slot
            assert rel_err(ours[:, b, : n[b]], ref[:, b, valid[b]]) <= FP32_REL_TOL, (name, b)


# Tiles of the kept kernels other than the defaults, each against the reference (float32, the mixed-rows case).
TILE_VARIANTS = {
    "prefill-rows-32": FastPathOptions(
        attention="pallas", prefill_attention_tiles=ragged_prefill_attention.BlockSizes(block_rows=32)),
    "prefill-keys-128-one-stage": FastPathOptions(
        attention="pallas", prefill_attention_tiles=ragged_prefill_attention.BlockSizes(block_k=128, num_stages=1)),
    "cross-attention-64-keys": FastPathOptions(
        attention="pallas", cross_attention_tiles=gqa_cross_attention.BlockSizes(block_k=64)),
    "geglu-32-columns": FastPathOptions(attention="pallas", geglu_tiles=SkinnyBlockSizes(block_n=32)),
    "bucket-128": FastPathOptions(attention="xla", bucket_size=128),
    # SigLIP's attention through jax.nn.dot_product_attention (pallas' default) and without it: on the CPU (and in
    # float32) jax.nn's XLA implementation; cuDNN's kernel on the card is checked by tests/test_kernels_on_gpu.py
    "pallas-vision-attention-unfused": FastPathOptions(attention="pallas", fused_attention="none"),
    "compact-vision-attention-fused": FastPathOptions(attention="xla", fused_attention="vision"),
}


@pytest.mark.parametrize("name", list(TILE_VARIANTS))
def test_tile_variants_match_reference(tiny_fp32, model_cases, reference_fp32_actions, name):
    impl = implementations.fast(f"test-{name}", TILE_VARIANTS[name], "")
    ins, obs = _case(tiny_fp32, model_cases, "batch2_mixed")
    actions = _sample(tiny_fp32, obs, ins["noise"], int(ins["num_steps"]), impl)
    assert rel_err(actions, reference_fp32_actions["batch2_mixed"]) <= FP32_REL_TOL


# --- the pieces -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MODEL_CASES)
def test_plan_is_the_smallest_that_holds_every_row(tiny_fp32, model_cases, case):
    ins, obs = _case(tiny_fp32, model_cases, case)
    config = tiny_fp32.config
    views = np.stack([ins[f"image_masks/{v}"] for v in config.image_keys], axis=1).sum(axis=1)
    lengths = views * config.tokens_per_image + ins["tokenized_prompt_mask"].sum(axis=1)
    bucket = FastPathOptions().bucket_size
    plan = fast_prefix.plan_for(tiny_fp32.params, obs, bucket)
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
    impl = implementations.COMPACT
    prepared = impl.prepare(tiny_fp32.params, 2)
    padded = 2 * config.tokens_per_image + config.max_token_len
    assert impl.plan(prepared, obs) == fast_prefix.PrefixPlan(num_views=2, prefix_len=padded)  # capped
    assert rel_err(_sample(tiny_fp32, obs, noise, 2, "compact"), ref) <= FP32_REL_TOL
    oversized = impl.specialize(fast_prefix.PrefixPlan(num_views=2, prefix_len=padded + 40))
    actions = jax.jit(oversized.sample, static_argnums=3)(prepared, obs, jnp.asarray(noise), 2)
    assert rel_err(actions, ref) <= FP32_REL_TOL


def test_unspecialised_phases_and_table_computed_in_the_jit_reproduce_upstream(tiny_fp32, model_cases):
    """The phases without a host plan (every view slot, whole padded prefix) on prepared params whose adaRMS table was
    dropped (so denoise computes it inside the jit) reproduce upstream."""
    ins, obs = _case(tiny_fp32, model_cases, "three_steps")
    steps = int(ins["num_steps"])
    prepared = implementations.PALLAS.prepare(tiny_fp32.params, steps)
    layout = prepared[fast_denoise.CONSTANTS_KEY]["layout"]
    bare = {**prepared, fast_denoise.CONSTANTS_KEY: {"layout": layout}}
    run = jax.jit(implementations.PALLAS.sample, static_argnums=3)
    actions = np.asarray(run(bare, obs, jnp.asarray(ins["noise"]), steps))
    assert rel_err(actions, model_cases["three_steps/out/fp32/actions"]) <= FP32_REL_TOL


def test_modulation_table_is_cached_per_checkpoint_and_num_steps(tiny_fp32):
    params = tiny_fp32.params
    t10 = fast_denoise.modulation_table(params, 10)
    assert fast_denoise.modulation_table(params, 10) is t10
    t3 = fast_denoise.modulation_table(params, 3)
    assert t3 is not t10 and t3["final"][0].shape[0] == 3
    # Row i is the modulation at upstream's time i, computed the plain way.
    times = reference.euler_times(3)
    cond = reference.time_conditioning(params, jnp.full((1,), times[2]))
    plain = gemma.expert_modulations(params["PaliGemma"]["llm"], cond, jnp.float32)
    for ours, ref in zip(t3["ffw"], plain["ffw"], strict=True):
        assert rel_err(ours[2], ref) <= FP32_REL_TOL
    # Another checkpoint (here: one conditioning leaf replaced by an equal copy) gets its own table.
    other = {**params, "time_mlp_in": {k: np.array(x) for k, x in params["time_mlp_in"].items()}}
    t10_other = fast_denoise.modulation_table(other, 10)
    assert t10_other is not t10
    assert rel_err(t10_other["final"][0], t10["final"][0]) == 0.0


BAD_OPTIONS = [  # (options class, bad field values, what the error names)
    (FastPathOptions, dict(attention="cuda"), "attention"),
    (FastPathOptions, dict(bucket_size=0), "bucket_size"),
    (ragged_prefill_attention.BlockSizes, dict(block_rows=24), "block_rows"),
]


@pytest.mark.parametrize("cls,bad,match", BAD_OPTIONS, ids=[m for _, _, m in BAD_OPTIONS])
def test_bad_options_are_rejected(cls, bad, match):
    with pytest.raises(ValueError, match=match):
        cls(**bad)


# --- the layout the ops read ---------------------------------------------------------------------------------------


def test_model_loaded_for_pallas_holds_only_the_packed_weights(reference_dir, model_cases):
    """Model.load(kernels="pallas") packs once: the model holds the fused QKV, the padded SigLIP MLP and the transposed
    gating instead of the originals, and samples bit-for-bit the actions `pallas` gives on params loaded for the
    reference (which its prepare packs itself)."""
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
    assert "Pallas geglu_matmul" in packed.describe() and "Pallas gqa_cross_attention_packed" in packed.describe()


def test_packing_is_idempotent(tiny_fp32):
    once = fast_path.pack(tiny_fp32.params, implementations.PALLAS.options)
    twice = fast_path.pack(once, implementations.PALLAS.options)
    assert jax.tree.structure(once) == jax.tree.structure(twice)
    assert all(a is b for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice), strict=True))


def test_ops_refuse_a_layout_they_cannot_read(tiny_fp32):
    """A layout an op cannot read is an error naming the op and the key, never a quiet switch to another kernel."""
    compact_layout = fast_ops.layout_of(fast_path.pack(tiny_fp32.params, implementations.COMPACT.options))
    assert compact_layout.expert_gating == "openpi"
    with pytest.raises(fast_ops.LayoutError, match="Pallas GeGLU.*gating_einsum_t"):
        fast_ops.ops_for("pallas", compact_layout, ragged_prefill_attention.BlockSizes(),
                         gqa_cross_attention.BlockSizes(), SkinnyBlockSizes())
    pallas_params = fast_path.pack(tiny_fp32.params, implementations.PALLAS.options)
    with pytest.raises(fast_ops.LayoutError, match="gating_einsum_t"):
        implementations.COMPACT.prepare(pallas_params, 2)
    with pytest.raises(fast_ops.LayoutError, match="prepare"):  # stacked params straight into the phases
        fast_ops.layout_of(tiny_fp32.params)
    unpacked = layer_stack.unstack_layers(tiny_fp32.params)
    with pytest.raises(fast_ops.LayoutError, match=r"layers\[0\].*plain arrays, not fused"):
        fast_ops.layout_of(unpacked)


def test_mixed_layouts_across_layers_are_an_error(tiny_fp32):
    params = fast_path.pack(tiny_fp32.params, implementations.PALLAS.options)
    layers = list(params["PaliGemma"]["llm"]["layers"])
    mlp = dict(layers[1]["mlp_1"])
    mlp["gating_einsum"] = jnp.swapaxes(mlp.pop("gating_einsum_t"), 1, 2)
    layers[1] = {**layers[1], "mlp_1": mlp}
    mixed = layer_stack.replace_path(params, layer_stack.LLM_PATH, tuple(layers))
    with pytest.raises(fast_ops.LayoutError, match="layer 1"):
        fast_ops.layout_of(mixed)


def test_quantized_expert_weights_get_their_own_matmuls_and_say_so(tiny_fp32, model_cases):
    """An FP8 checkpoint's q/kv weights are fused into one FP8 weight per layer and its MLPs keep openpi's keys: the
    ops read both with the weights' own matmuls (chosen at prepare, named by describe), and the actions stay close
    to float32."""
    from checkpoints.quantize import Plan, quantize_params

    quantized = quantize_params(tiny_fp32.params, Plan())
    model = Model(config=tiny_fp32.config, params=fast_path.pack(quantized, implementations.PALLAS.options),
                  implementation=implementations.PALLAS)
    layout = fast_ops.layout_of(model.params)
    assert layout.expert_qkv == "fused_quantized" and layout.expert_gating == "quantized"
    assert "quantized weights' own matmuls" in model.describe() and "expert qkv: fused FP8" in model.describe()
    ins, obs = _case(model, model_cases, "batch2_mixed")
    actions = np.asarray(model.sample(obs, noise=ins["noise"], num_steps=int(ins["num_steps"])))
    assert cosine(actions, model_cases["batch2_mixed/out/fp32/actions"]) >= 0.99


# --- the compile cache ----------------------------------------------------------------------------------------------


def test_precompiled_buckets_never_recompile(tiny_fp32):
    from pi05_jax.synthetic import synthetic_arrays, synthetic_noise

    model = Model(config=tiny_fp32.config, params=tiny_fp32.params, implementation=implementations.COMPACT)
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
    steady = [o for o in steady if fast_prefix.plan_for(model.params, o) in plans]
    assert len(steady) == 4
    noise = synthetic_noise(config)
    with compile_cache.count_compilations() as c:
        for obs in steady:
            jax.block_until_ready(model.sample(obs, noise=noise, num_steps=2))
    assert c.count == 0, c.functions

    # A new bucket (one valid view) compiles once, then never again.
    new = obs_for((True, False, False), 10)
    assert fast_prefix.plan_for(model.params, new) not in plans
    with compile_cache.count_compilations() as c:
        jax.block_until_ready(model.sample(new, noise=noise, num_steps=2))
    assert c.count >= 1
    with compile_cache.count_compilations() as c:
        jax.block_until_ready(model.sample(new, noise=noise, num_steps=2))
    assert c.count == 0, c.functions


def test_precompile_rejects_impossible_inputs(tiny_fp32):
    model = dataclasses.replace(tiny_fp32, implementation=implementations.COMPACT)
    with pytest.raises(ValueError, match="views"):
        compile_cache.precompile(model, views=(4,))
    with pytest.raises(ValueError, match="prompt_lens"):
        compile_cache.precompile(model, views=(1,), prompt_lens=(0,))


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

"""The fast path's phases for one `FastPathOptions`: what `pi05_jax.implementations` builds `compact` and `pallas`
from. Each piece is documented where it lives:
- `pi05_jax.fast.packing`: the weights unstacked per layer and packed (fused QKV, padded SigLIP MLP, the transposed
  gating for the Pallas GeGLU), once per checkpoint (`pack`, at load; `prepare` caches it for raw params).
- `pi05_jax.fast.prefix`: SigLIP on the valid views only; the prefix compacted to a bucket with per-row lengths;
  the last prefill layer computes K and V only.
- `pi05_jax.fast.denoise`: adaRMS + time MLP precomputed per (checkpoint, num_steps); the Euler loop.
- `pi05_jax.fast.ops`: which kernel runs each piece, from the options and the packed weights' layout.

Static shapes come from the host: `plan(params, obs)` reads the observation's masks and returns a `PrefixPlan`
(valid-view count, bucket), so the executable is keyed by (batch, valid views, bucket, num_steps); the phases take
the plan as a keyword. Phases called without one (e.g. inside another jit) use a plan that holds any observation:
all view slots and the whole padded prefix.
"""

from __future__ import annotations

import jax

from pi05_jax.fast import denoise as fast_denoise
from pi05_jax.fast import packing, prefix, vision
from pi05_jax.fast.ops import (
    MEGAKERNELS,
    Layout,
    Ops,
    expert_stack_backend,
    fused_attention_backend,
    layout_of,
    ops_for,
)
from pi05_jax.fast.options import FastPathOptions
from pi05_jax.fast.prefix import PrefixPlan
from pi05_jax.model import layer_stack, reference


def layout_in(params) -> Layout:
    """The layout `prepare` recorded, else read off the params (trace time: static)."""
    constants = params.get(fast_denoise.CONSTANTS_KEY, {})
    return constants.get("layout") or layout_of(params)


def ops(params, options: FastPathOptions) -> Ops:
    """The ops for these params (their layout and dtype) on JAX's default backend (trace time)."""
    platform = jax.default_backend()
    return ops_for(options.attention, layout_in(params), options.prefill_attention_tiles,
                   options.cross_attention_tiles, options.geglu_tiles, fused_attention=options.fused_attention,
                   fused_backend=fused_attention_backend(platform, reference.params_dtype(params)),
                   expert=options.expert, stack_backend=expert_stack_backend(platform))


def pack(params, options: FastPathOptions, *, consume: bool = False) -> dict:
    """params in the fast path's layout (unstacked, packed). `consume=True` frees the stacked arrays as they are
    converted (runtime.Model.load: peak memory is the weights plus one stacked leaf)."""
    params = layer_stack.unstack_layers(params, consume=consume)
    return packing.pack_weights(params, transpose_expert_gating=options.transpose_expert_gating)


def prepare(params, num_steps: int, *, options: FastPathOptions) -> dict:
    """params ready for the phases: unstacked and packed (once per checkpoint: cached, so already-packed params pass
    as they are), plus the device constants for num_steps and the layout. The ops are checked here, so a layout
    they cannot read fails at load, not at the first call."""
    params = layer_stack.unstack_layers_cached(params)
    params = packing.pack_weights_cached(params, transpose_expert_gating=options.transpose_expert_gating)
    layout = layout_of(params)
    ops_for(options.attention, layout, options.prefill_attention_tiles, options.cross_attention_tiles,
            options.geglu_tiles, expert=options.expert)
    params = fast_denoise.with_constants(params, num_steps, layout)
    if options.expert in MEGAKERNELS:
        params = fast_denoise.with_megakernel_constants(params, loop=options.expert == "megakernel-loop")
    return params


def plan(params, obs, *, options: FastPathOptions) -> PrefixPlan:
    return prefix.plan_for(params, obs, options.bucket_size)


def vision_phase(params, obs, *, plan: PrefixPlan | None, options: FastPathOptions):
    plan = plan or prefix.full_plan(params, obs)
    chosen = ops(params, options)

    def encode(images, dtype):
        return vision.encode_images(params["PaliGemma"]["img"], images, dtype=dtype, ops=chosen)

    return prefix.encode_valid_views(obs, plan.num_views, reference.params_dtype(params), encode=encode)


def prefill_phase(params, obs, views, *, plan: PrefixPlan | None, options: FastPathOptions):
    plan = plan or prefix.full_plan(params, obs)
    tokens, lengths = prefix.compact_prefix_tokens(params, obs, views, plan.prefix_len,
                                                   reference.params_dtype(params))
    return prefix.prefill(params["PaliGemma"]["llm"], tokens, lengths, ops(params, options))


def denoise_phase(params, compact_prefix, noise, num_steps, *, options: FastPathOptions):
    return fast_denoise.denoise(params, compact_prefix, noise, num_steps, ops=ops(params, options))

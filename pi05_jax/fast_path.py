"""The fast paths `compact` (plain-JAX attention) and `pallas` (the Pallas kernels), registered in
`pi05_jax.sampler.IMPLEMENTATIONS` so `--kernels compact|pallas` selects them.

Both run the same exact restructuring of upstream's computation (each piece is documented where it lives):
- `pi05_jax.compact_prefix`: SigLIP on the valid views only; the prefix compacted to a bucket with per-row lengths;
  the last prefill layer computes K and V only.
- `pi05_jax.denoise_fast`: adaRMS + time MLP precomputed per (checkpoint, num_steps) and cached on the device;
  Euler steps a fori_loop (or unrolled); the suffix attention sees the bucket-long cache plus the action tokens.
- `pi05_jax.weight_packing`: on the unstacked layout, `prepare` also fuses each Gemma layer's q/kv weights (one QKV
  GEMM per layer, RoPE on q and k together) and SigLIP's query/key/value, and zero-pads SigLIP's mlp_dim to a multiple
  of 128 (optionally its head_dim), once per checkpoint; exact up to the GEMMs' accumulation order. For `pallas` it
  also stores the expert's gating weight transposed, the layout the Pallas GeGLU matmul streams.
- `pi05_jax.layer_stack`: `prepare` hands the phases the params with per-layer weight buffers (converted once per
  checkpoint and cached; params that are already unstacked, e.g. from `runtime.Model.load`, are used as they are),
  so SigLIP, prefill and the expert loop over layers in Python and every GEMM reads its weight in place, instead of
  a lax.scan that copies each layer's slice of the stacked weight before the matmul.
`fused` (experimental, slower today: docs/PERF.md) is `pallas` with `pi05_jax.denoise_fused`'s expert layer. Other
`FastPathOptions` (SigLIP attention in Pallas, attention and GeGLU tiles, the Pallas combine of the cross-attention's
splits, the expert's projections as Pallas split-K matmuls (Triton, or Mosaic GPU kernels that load their weights
before waiting for their input: Programmatic Dependent Launch, not yet measured), the gated residual + adaRMS norm as
one Pallas kernel on their partials, the cross-attention streaming the GeGLU weight into L2) are measured alternatives
that lost or tied; they stay selectable for the next card. `compact` uses XLA's attention and matmuls; `pallas` calls
`pallas_kernels.ragged_prefill_attention` in prefill, and in denoise `pallas_kernels.gqa_cross_attention` (reading q,
k and v in place from the fused QKV GEMM's output) and `pallas_kernels.skinny_matmul.geglu_matmul` for the expert's
gate/up + GeGLU on a transposed copy of its gating weight (in Pallas interpret mode on the CPU).

Static shapes come from the host: `prepare` (run by `sampler.sample_actions` before the jit) reads the observation's
masks and returns a `PrefixPlan` (valid-view count, bucket), so the executable is keyed by (batch, valid views,
bucket, num_steps); `specialize(plan)` bakes the plan into the phases. Phases called without a plan (e.g. inside
another jit) use a plan that holds any observation: all view slots and the whole padded prefix, bucketed.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax.numpy as jnp

# Imported up front for its side effect: it loads Pallas' fuser module, which registers a JAX config flag. Loaded
# lazily while the first pallas_call is traced, that flag changes the tracing context after the sampler's first
# compile, so the second call of a `pallas` executable would compile again.
import pallas_kernels._interpret  # noqa: F401
from pallas_kernels import gqa_cross_attention, pdl_matmul, ragged_prefill_attention
from pallas_kernels.residual_norm import ResidualNormBlockSizes
from pallas_kernels.skinny_matmul import SkinnyBlockSizes
from pi05_jax import compact_prefix, denoise_fast, denoise_fused, gemma, layer_stack, sampler, siglip, weight_packing
from pi05_jax.compact_prefix import DEFAULT_BUCKET_SIZE, PrefixPlan
from pi05_jax.expert_kernels import (  # noqa: F401 (re-exported: the expert's kernel ops, as tests and scripts know them)
    DEFAULT_GEGLU_TILES,
    DEFAULT_PROJECTION_SPLITS,
    PDL_PROJECTION_SPLITS,
    ProjectionSplits,
    SplitPartials,
    pallas_attn_out,
    pallas_expert_mlp,
    pallas_qkv_rotated,
    pallas_residual_norm,
)
from pi05_jax.fused_expert_options import FusedExpertOptions

ATTENTIONS = ("xla", "pallas")
VISION_ATTENTIONS = ("xla", "pallas")
CROSS_ATTENTION_QKV = ("packed", "split")
EXPERT_MATMULS = ("pallas", "xla")
# the expert's gate/up + GeGLU: Triton on a transposed copy, XLA, or the Mosaic GPU PDL kernel on that copy
EXPERT_GEGLU = ("pallas", "xla", "mosaic")
# the expert's projections: all three in Pallas (QKV needs the packed attention), attention-out and down only, none
EXPERT_PROJECTIONS = ("xla", "pallas", "out_down", "mosaic")
DEFAULT_PREFILL_ATTENTION_TILES = ragged_prefill_attention.BlockSizes()
# 128-key blocks in one pipeline stage: each program of a 128-key split loads its K and V tiles at once instead of
# in two dependent 64-key steps (H200, interleaved in the sampler: 16.09 vs 16.34 / 16.41 ms, docs/PERF.md)
DEFAULT_CROSS_ATTENTION_TILES = gqa_cross_attention.BlockSizes(block_k=128, num_stages=1)
DEFAULT_RESIDUAL_NORM_TILES = ResidualNormBlockSizes()


@dataclasses.dataclass(frozen=True)
class FastPathOptions:
    attention: str = "xla"  # "xla": plain-JAX masked attention; "pallas": the Pallas kernels
    # SigLIP's self-attention: "xla" (upstream's einsum + softmax) or "pallas" (ragged_prefill_attention with one KV
    # head per query head and every length full; needs fuse_siglip_qkv and pad_siglip_heads: head_dim 72 -> 128)
    vision_attention: str = "xla"
    # tiles of the Pallas prefill attention (query rows and keys per step, warps, stages)
    prefill_attention_tiles: ragged_prefill_attention.BlockSizes = DEFAULT_PREFILL_ATTENTION_TILES
    # how the Pallas cross-attention merges its flash-decoding splits (gqa_cross_attention.BlockSizes.combine)
    cross_attention_combine: str = "xla"
    # how the expert's q, k, v reach the Pallas cross-attention when its QKV weight is fused: "packed" (read in place
    # from the GEMM's [B,T,K,G+2,H] layout, gqa_cross_attention_packed: one XLA fusion for RoPE and the q scale) or
    # "split" (q, k and v sliced out first: three fusions)
    cross_attention_qkv: str = "packed"
    # with the packed cross-attention and the Pallas GeGLU: extra programs of the attention kernel stream the layer's
    # transposed gating weight (16.8 MB, the next big read) into L2 while the attention runs (BlockSizes.prefetch_*)
    cross_attention_prefetch: bool = False
    # tiles of the Pallas cross-attention (gqa_cross_attention.BlockSizes; its `combine` is cross_attention_combine)
    cross_attention_tiles: gqa_cross_attention.BlockSizes = DEFAULT_CROSS_ATTENTION_TILES
    # the expert's gate/up GEMM + GeGLU with attention="pallas": "pallas" (pallas_kernels.skinny_matmul.geglu_matmul
    # on a transposed copy of gating_einsum made by prepare, weight_packing.PackOptions.transpose_expert_gating) or
    # "xla" (XLA's GEMM on openpi's layout, then the GeGLU fusion) or "mosaic" (pallas_kernels.pdl_matmul's
    # pdl_geglu_matmul on the same transposed copy: Mosaic GPU, its weight slab loaded before waiting on the input;
    # bfloat16 only, the Triton kernel in float32). attention="xla" always runs XLA's.
    expert_geglu: str = "pallas"
    expert_geglu_tiles: SkinnyBlockSizes = DEFAULT_GEGLU_TILES  # tiles of that kernel
    # the expert's QKV, attention-out and down projections with attention="pallas": "pallas" (all three as
    # pallas_kernels.skinny_matmul.skinny_matmul, K split, on transposed copies made by prepare; QKV only with
    # cross_attention_qkv="packed"), "out_down" (attention-out and down in Pallas, QKV in XLA), "mosaic" (as
    # "pallas", through the Mosaic GPU PDL kernel pallas_kernels.pdl_matmul; bfloat16 only, Triton's in float32) or
    # "xla"
    expert_projections: str = "xla"
    expert_projection_splits: ProjectionSplits = DEFAULT_PROJECTION_SPLITS  # their K splits and tiles (Triton)
    expert_pdl_splits: ProjectionSplits = PDL_PROJECTION_SPLITS  # the same for the Mosaic GPU PDL kernels
    # the PDL kernels issue griddepcontrol.launch_dependents / wait (False: the same kernels without them)
    expert_pdl: bool = True
    # the expert's gated residual adds and the adaRMS norm after each, with attention="pallas": "pallas"
    # (pallas_kernels.residual_norm.gated_residual_norm: one kernel for both, summing a Pallas projection's split-K
    # partials itself) or "xla" (XLA's residual fusion, then its norm fusion)
    expert_residual_norm: str = "xla"
    expert_residual_norm_tiles: ResidualNormBlockSizes = DEFAULT_RESIDUAL_NORM_TILES  # rows per program of it
    bucket_size: int = DEFAULT_BUCKET_SIZE  # prefix length granularity (see compact_prefix.DEFAULT_BUCKET_SIZE)
    # Euler steps as straight-line code (True) or a lax.fori_loop (False); None: a fori_loop on unstacked layers (its
    # weights are loop invariants; 18 layer bodies to compile, not 180), unrolled on stacked ones (the old default).
    unroll_steps: bool | None = None
    # with a fori_loop: Euler steps per loop iteration (lax.fori_loop's `unroll`); 1 = one step per iteration
    step_unroll: int = 1
    # stacked layers: the expert's layers unrolled in Python (True) or a lax.scan (False); unstacked: always unrolled
    unroll_layers: bool = False
    # the denoise loop's action tokens padded with zero tokens to a multiple of this many rows, never keys, dropped at
    # the end (denoise_fast.denoise's pad_action_rows); None: 64 where the Mosaic GPU matmuls run (whole 64-row
    # tiles, no pad before each of them), else 0 (off)
    pad_action_rows: int | None = None
    # prepare() converts stacked params to per-layer buffers (pi05_jax.layer_stack), once per checkpoint
    unstack_layers: bool = True
    # prepare-time weight restructurings of the unstacked layout (pi05_jax.weight_packing); ignored when stacked
    fuse_gemma_qkv: bool = True  # one [D, (N+2K)*H] QKV GEMM per Gemma layer (prefix LLM and expert)
    fuse_siglip_qkv: bool = True  # one [D, 3*N*H] QKV GEMM (+ one bias add) per SigLIP layer
    pad_siglip_mlp: bool = True  # SigLIP mlp_dim zero-padded to a multiple of pad_multiple (4304 -> 4352)
    pad_siglip_heads: bool = False  # SigLIP's fused q/k/v head_dim zero-padded (72 -> 128); needs fuse_siglip_qkv
    pad_multiple: int = 128
    # the expert layer with fused Pallas GEMMs (pi05_jax.denoise_fused: adaRMS folded into the QKV and gate/up GEMMs,
    # gated residuals into the out/down GEMMs; which pieces, and their tiles); needs unstacked layers with fused QKV,
    # else denoise_fast runs. None: denoise_fast.
    fused_expert: FusedExpertOptions | None = None

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.vision_attention not in VISION_ATTENTIONS:
            raise ValueError(f"vision_attention must be one of {VISION_ATTENTIONS}, got {self.vision_attention!r}")
        if self.vision_attention == "pallas" and not (self.fuse_siglip_qkv and self.pad_siglip_heads):
            raise ValueError("vision_attention='pallas' needs fuse_siglip_qkv=True and pad_siglip_heads=True (the "
                             "Triton kernel needs a power-of-2 head dim: SigLIP's 72 is padded to 128)")
        if self.cross_attention_qkv not in CROSS_ATTENTION_QKV:
            raise ValueError(f"cross_attention_qkv must be one of {CROSS_ATTENTION_QKV}, got "
                             f"{self.cross_attention_qkv!r}")
        if self.expert_geglu not in EXPERT_GEGLU:
            raise ValueError(f"expert_geglu must be one of {EXPERT_GEGLU}, got {self.expert_geglu!r}")
        if self.expert_projections not in EXPERT_PROJECTIONS:
            raise ValueError(f"expert_projections must be one of {EXPERT_PROJECTIONS}, got "
                             f"{self.expert_projections!r}")
        if self.expert_residual_norm not in EXPERT_MATMULS:
            raise ValueError(f"expert_residual_norm must be one of {EXPERT_MATMULS}, got "
                             f"{self.expert_residual_norm!r}")
        if self.cross_attention_combine not in gqa_cross_attention.COMBINES:
            raise ValueError(f"cross_attention_combine must be one of {gqa_cross_attention.COMBINES}, got "
                             f"{self.cross_attention_combine!r}")
        if self.bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {self.bucket_size=}")
        if self.pad_action_rows is not None and self.pad_action_rows < 0:
            raise ValueError(f"pad_action_rows must be >= 0 or None, got {self.pad_action_rows=}")
        self.pack_options()  # validates the packing fields

    def pack_options(self) -> weight_packing.PackOptions:
        return weight_packing.PackOptions(
            fuse_gemma_qkv=self.fuse_gemma_qkv, fuse_siglip_qkv=self.fuse_siglip_qkv,
            pad_siglip_mlp=self.pad_siglip_mlp, pad_siglip_heads=self.pad_siglip_heads, pad_multiple=self.pad_multiple,
            transpose_expert_gating=self.pallas_geglu, transpose_expert_projections=self.pallas_projections)

    @property
    def pallas_geglu(self) -> bool:
        """Whether the expert's GeGLU runs a Pallas kernel (Triton or Mosaic GPU) on the transposed gating weight (the
        fused expert reads openpi's gating layout)."""
        return self.attention == "pallas" and self.expert_geglu in ("pallas", "mosaic") and self.fused_expert is None

    @property
    def pallas_projections(self) -> tuple[str, ...]:
        """The expert's projections that run the Pallas skinny matmul (weight_packing.EXPERT_PROJECTIONS' names;
        its QKV needs the packed attention); () for none."""
        if self.attention != "pallas" or self.fused_expert is not None or self.expert_projections == "xla":
            return ()
        if self.expert_projections in ("pallas", "mosaic") and self.cross_attention_qkv == "packed":
            return weight_packing.EXPERT_PROJECTIONS
        return ("attn_out", "down")

    @property
    def action_rows(self) -> int:
        """pad_action_rows with None resolved: 64 when a Mosaic GPU PDL matmul runs in the expert, else 0."""
        if self.pad_action_rows is not None:
            return self.pad_action_rows
        return 64 if self.mosaic_geglu or (self.mosaic_projections and self.pallas_projections) else 0

    @property
    def mosaic_geglu(self) -> bool:
        return self.pallas_geglu and self.expert_geglu == "mosaic"

    @property
    def mosaic_projections(self) -> bool:
        """Whether pallas_projections run the Mosaic GPU PDL matmul instead of the Triton one."""
        return self.expert_projections == "mosaic"

    @property
    def pallas_residual_norm(self) -> bool:
        return self.attention == "pallas" and self.expert_residual_norm == "pallas" and self.fused_expert is None


# --- attention callables ------------------------------------------------------------------------------------------


def pallas_prefill_attention(lengths, tiles: ragged_prefill_attention.BlockSizes = DEFAULT_PREFILL_ATTENTION_TILES):
    return lambda q, k, v: ragged_prefill_attention.ragged_prefill_attention(q, k, v, lengths, block_sizes=tiles)


def pallas_vision_attention(q, k, v):
    """SigLIP's full self-attention (every patch valid) through the ragged prefill kernel: N KV heads, group 1."""
    from pallas_kernels.ragged_prefill_attention import ragged_prefill_attention

    return ragged_prefill_attention(q, k, v, jnp.full((q.shape[0],), q.shape[1], jnp.int32))


def pallas_suffix_attention(lengths, combine: str = "xla", qkv: str = "packed",
                            tiles: gqa_cross_attention.BlockSizes = DEFAULT_CROSS_ATTENTION_TILES,
                            self_length: int | None = None):
    blocks = dataclasses.replace(tiles, combine=combine)

    def attend(q, ck, cv, k, v):
        return gqa_cross_attention.gqa_cross_attention(q, ck, cv, lengths, k, v, block_sizes=blocks,
                                                       self_length=self_length)

    if qkv == "packed":  # denoise_fast calls this on layers with a fused QKV weight
        attend.packed = lambda qkv_rotated, ck, cv, prefetch=None: gqa_cross_attention.gqa_cross_attention_packed(
            qkv_rotated, ck, cv, lengths, prefetch=prefetch, block_sizes=blocks, self_length=self_length)
    return attend



def _gating_weight(layer):
    """What the cross-attention prefetches: the expert's transposed gating weight, which geglu_matmul reads next."""
    return layer["mlp_1"].get("gating_einsum_t")


def expert_matmuls(options: FastPathOptions) -> denoise_fast.ExpertMatmuls:
    """The expert layer's matmuls for these options: the Pallas skinny kernels (Triton, or Mosaic GPU with PDL)
    where prepare transposed weights; with the Pallas residual + norm, the attention-out and down projections hand
    it their unreduced partials."""
    fused_norm = options.pallas_residual_norm
    reduce = not fused_norm
    projections, splits = options.pallas_projections, options.expert_projection_splits
    mosaic = dict(mosaic=options.mosaic_projections, pdl_splits=options.expert_pdl_splits, pdl=options.expert_pdl)
    ops = {}
    if options.pallas_geglu or "down" in projections:
        ops["mlp"] = functools.partial(pallas_expert_mlp, geglu_tiles=options.expert_geglu_tiles, reduce=reduce,
                                       splits=splits, mosaic_geglu=options.mosaic_geglu,
                                       mosaic_down=options.mosaic_projections, pdl_splits=options.expert_pdl_splits,
                                       pdl=options.expert_pdl)
    if "qkv" in projections:
        ops["qkv_rotated"] = functools.partial(pallas_qkv_rotated, splits=splits, **mosaic)
    if "attn_out" in projections:
        ops["attn_out"] = functools.partial(pallas_attn_out, reduce=reduce, splits=splits, **mosaic)
    if options.cross_attention_prefetch and options.pallas_geglu and options.cross_attention_qkv == "packed":
        ops["prefetch"] = _gating_weight
    if fused_norm:
        ops["residual_norm"] = functools.partial(pallas_residual_norm, tiles=options.expert_residual_norm_tiles)
    return denoise_fast.ExpertMatmuls(**ops) if ops else denoise_fast.XLA_MATMULS


def _attentions(options: FastPathOptions):
    if options.attention == "pallas":
        return (functools.partial(pallas_prefill_attention, tiles=options.prefill_attention_tiles),
                functools.partial(pallas_suffix_attention, combine=options.cross_attention_combine,
                                  qkv=options.cross_attention_qkv, tiles=options.cross_attention_tiles))
    return compact_prefix.xla_prefill_attention, denoise_fast.xla_suffix_attention


# --- phases -------------------------------------------------------------------------------------------------------


def vision(params, obs, *, plan: PrefixPlan | None, options: FastPathOptions):
    plan = plan or compact_prefix.full_plan(params, obs)
    encode = None
    if options.fuse_siglip_qkv or options.pad_siglip_mlp:  # the layers may hold packed weights
        attention_fn = pallas_vision_attention if options.vision_attention == "pallas" else None

        def encode(images, dtype):
            return siglip.encode_images_packed(params["PaliGemma"]["img"], images, dtype=dtype,
                                               attention_fn=attention_fn)
    return compact_prefix.encode_valid_views(params, obs, plan.num_views, sampler.params_dtype(params), encode=encode)


def prefill(params, obs, views, *, plan: PrefixPlan | None, options: FastPathOptions):
    plan = plan or compact_prefix.full_plan(params, obs)
    tokens, lengths = compact_prefix.compact_prefix_tokens(params, obs, views, plan.prefix_len,
                                                           sampler.params_dtype(params))
    llm = params["PaliGemma"]["llm"]
    if options.fuse_gemma_qkv and layer_stack.is_unstacked(llm["layers"]):  # the layers may hold fused QKV weights
        # compact_prefix.compact_prefill's positions (0..S-1), with the packed-aware layer loop
        b, s, _ = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
        kv = gemma.prefill_packed(llm, tokens, positions, _attentions(options)[0](lengths))
        return compact_prefix.CompactPrefix(kv=kv, lengths=lengths)
    return compact_prefix.compact_prefill(params, tokens, lengths, _attentions(options)[0])


def denoise(params, prefix, noise, num_steps, *, options: FastPathOptions):
    if options.fused_expert is not None and denoise_fused.supported(params):
        return denoise_fused.denoise(params, prefix, noise, num_steps, suffix_attention=_attentions(options)[1],
                                     options=options.fused_expert)
    return denoise_fast.denoise(params, prefix, noise, num_steps, suffix_attention=_attentions(options)[1],
                                unroll_steps=options.unroll_steps, unroll_layers=options.unroll_layers,
                                step_unroll=options.step_unroll,
                                expert_matmuls=expert_matmuls(options), pad_action_rows=options.action_rows)


@functools.cache
def _warned(name: str, reason: str) -> bool:
    warnings.warn(f"{name}: the Mosaic GPU PDL matmuls {reason}; the expert runs the Triton kernels instead",
                  stacklevel=4)
    return True


def _warn_if_mosaic_cannot_run(name: str, options: FastPathOptions, params) -> None:
    """Say once per implementation when options ask for the Mosaic GPU PDL kernels and none of them can run here
    (they fall back quietly per matmul otherwise: expert_kernels._pdl_ready)."""
    if not (options.mosaic_geglu or (options.mosaic_projections and options.pallas_projections)):
        return
    if not pdl_matmul.runs_here():
        _warned(name, "need a Hopper GPU (sm_90) or the CPU (interpret mode)")
    elif sampler.params_dtype(params) != jnp.bfloat16:
        _warned(name, f"take bfloat16 only, the model is {sampler.params_dtype(params)}")


def make_implementation(name: str, options: FastPathOptions, description: str = "") -> sampler.Implementation:
    """An Implementation running the fast path with these options (register it to select it by name)."""

    def phases(plan):
        return dict(vision=functools.partial(vision, plan=plan, options=options),
                    prefill=functools.partial(prefill, plan=plan, options=options))

    def prepare(params, obs, num_steps):
        plan = compact_prefix.plan_for(params, obs, options.bucket_size)
        _warn_if_mosaic_cannot_run(name, options, params)
        if options.unstack_layers:
            params = layer_stack.unstack_layers_cached(params)
            params = weight_packing.pack_weights_cached(params, options.pack_options())
        if options.fused_expert is not None and denoise_fused.supported(params):
            return denoise_fused.with_constants(params, num_steps), plan
        return denoise_fast.with_constants(params, num_steps), plan

    @functools.cache
    def specialize(plan: PrefixPlan) -> sampler.Implementation:
        return dataclasses.replace(base, name=f"{name}[views={plan.num_views},prefix={plan.prefix_len}]",
                                   prepare=None, specialize=None, **phases(plan))

    base = sampler.Implementation(
        name=name, denoise=functools.partial(denoise, options=options), description=description,
        prepare=prepare, specialize=specialize, **phases(None))
    _OPTIONS[name] = options
    return base


_OPTIONS: dict[str, FastPathOptions] = {}  # implementation name -> its options (what make_implementation built)


def pack_for(kernels: str, params) -> dict:
    """params in the packed layout the implementation registered as `kernels` builds in prepare (unchanged for other
    implementations or stacked layers). runtime.Model.load calls it once so the model holds only the packed weights:
    the originals they replace (the unfused q/kv, SigLIP's unpadded MLP, the untransposed gating) can be freed."""
    options = _OPTIONS.get(kernels)
    if options is None or not options.unstack_layers or not options.pack_options().any:
        return params
    return weight_packing.pack_weights(params, options.pack_options())


def wants_unstacked_layers(kernels: str) -> bool:
    """Whether the implementation registered as `kernels` runs on unstacked layers (so a model loaded for it can
    hold its params in that layout only, see runtime.Model.load)."""
    options = _OPTIONS.get(kernels)
    return options is not None and options.unstack_layers and sampler.IMPLEMENTATIONS.get(kernels) is not None


COMPACT = make_implementation(
    "compact", FastPathOptions(attention="xla"),
    "valid views only, compacted bucketed prefix, precomputed adaRMS, per-layer weight buffers; XLA attention")
PALLAS = make_implementation(
    "pallas", FastPathOptions(attention="pallas"),
    "as 'compact', with the Pallas ragged prefill and GQA cross-attention kernels (interpret mode on CPU)")
FUSED = make_implementation(
    "fused", FastPathOptions(attention="pallas", fused_expert=FusedExpertOptions()),
    "experimental: as 'pallas', with the expert layer as fused Pallas GEMMs (adaRMS norm, RoPE, GeGLU and gated "
    "residuals folded in; pi05_jax.denoise_fused); exact, but slower than 'pallas' on the H200 (docs/PERF.md)")
PALLAS_PDL = make_implementation(
    "pallas-pdl", FastPathOptions(attention="pallas", expert_projections="mosaic", expert_geglu="mosaic"),
    "experimental: as 'pallas', with the expert's GEMMs as Mosaic GPU kernels that load their weights before waiting "
    "for their input (Programmatic Dependent Launch, pallas_kernels.pdl_matmul; bfloat16 on Hopper, Triton's "
    "kernels in float32 and on other GPUs); not yet measured on a card")
sampler.register(COMPACT)
sampler.register(PALLAS)
sampler.register(FUSED)
sampler.register(PALLAS_PDL)

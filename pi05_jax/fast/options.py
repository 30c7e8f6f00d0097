"""The fast path's choices: which attention kernels, their tiles, the prefix bucket and how the expert runs.
Everything else about the fast path is fixed (one layout, one forward pass); variants that lost on the card are in
git history (docs/PERF.md names the tag)."""

from __future__ import annotations

import dataclasses

from pallas_kernels import gqa_cross_attention, ragged_prefill_attention
from pallas_kernels.skinny_matmul import SkinnyBlockSizes
from pi05_jax.fast.ops import ATTENTIONS, EXPERTS, FUSED_ATTENTIONS
from pi05_jax.fast.prefix import DEFAULT_BUCKET_SIZE

DEFAULT_CROSS_ATTENTION_TILES = gqa_cross_attention.BlockSizes()
DEFAULT_PREFILL_ATTENTION_TILES = ragged_prefill_attention.BlockSizes()
DEFAULT_GEGLU_TILES = SkinnyBlockSizes()


@dataclasses.dataclass(frozen=True)
class FastPathOptions:
    # "xla": XLA's masked attention and GEMMs (`compact`); "pallas": the Pallas ragged prefill attention, GQA
    # cross-attention and the expert's GeGLU matmul (`pallas`)
    attention: str = "xla"
    prefill_attention_tiles: ragged_prefill_attention.BlockSizes = DEFAULT_PREFILL_ATTENTION_TILES
    cross_attention_tiles: gqa_cross_attention.BlockSizes = DEFAULT_CROSS_ATTENTION_TILES
    geglu_tiles: SkinnyBlockSizes = DEFAULT_GEGLU_TILES
    bucket_size: int = DEFAULT_BUCKET_SIZE  # prefix length granularity (pi05_jax.fast.prefix.DEFAULT_BUCKET_SIZE)
    # "vision": SigLIP's attention as one jax.nn.dot_product_attention (cuDNN's fused kernel on a GPU in bf16; its
    # XLA implementation on the CPU and in float32); "none": upstream's einsum-softmax-einsum
    fused_attention: str = "none"
    # "layers": the expert's layers as separate kernels (the ops above); "megakernel": each Euler step's 18 expert
    # layers as one persistent Mosaic GPU kernel (pallas_kernels.expert_megakernel; bf16 weights, 64-row tiles; its
    # grid follows from the expert's sizes: pi05_jax.fast.megakernel.tiles_for); "megakernel-loop": all Euler steps
    # of a batch row, with the action projections, in one such kernel (pallas_kernels.expert_loop; not yet run on a
    # card: docs/PERF.md)
    expert: str = "layers"

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.fused_attention not in FUSED_ATTENTIONS:
            raise ValueError(f"fused_attention must be one of {FUSED_ATTENTIONS}, got {self.fused_attention!r}")
        if self.expert not in EXPERTS:
            raise ValueError(f"expert must be one of {EXPERTS}, got {self.expert!r}")
        if self.bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {self.bucket_size=}")

    @property
    def transpose_expert_gating(self) -> bool:
        """Whether the packed layout stores the expert's gating weight transposed (what the Pallas GeGLU reads)."""
        return self.attention == "pallas"

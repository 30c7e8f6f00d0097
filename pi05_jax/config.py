"""Model configuration: frozen dataclasses whose sizes come from a checkpoint's shapes.

Nothing here hard-codes the full model: `checkpoints.config_inference.infer_config` reads every size from the
parameter shapes, and `preset("full")` / `preset("tiny")` only exist for random-weight demos and benchmarks.
"""

from __future__ import annotations

import dataclasses

# openpi's camera slots for pi0 / pi0.5, in the order their tokens enter the prefix.
IMAGE_KEYS: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
IMAGE_RESOLUTION = 224


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """One Gemma stream: the PaliGemma LLM (prefix) or the action expert (suffix)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads must be a multiple of num_kv_heads: {self.num_heads=} {self.num_kv_heads=}")


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    num_patches: int  # length of the learned position embedding (256 for 224x224 with patch 14)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class Pi05Config:
    llm: GemmaConfig
    expert: GemmaConfig
    siglip: SiglipConfig
    vocab_size: int
    action_dim: int
    action_horizon: int = 50
    max_token_len: int = 200
    image_keys: tuple[str, ...] = IMAGE_KEYS

    @property
    def tokens_per_image(self) -> int:
        return self.siglip.num_patches

    @property
    def padded_prefix_len(self) -> int:
        return len(self.image_keys) * self.tokens_per_image + self.max_token_len


def preset(name: str) -> Pi05Config:
    """Architectures for random-weight demos and benchmarks; real checkpoints infer theirs from shapes."""
    if name == "full":
        # gemma_2b + gemma_300m + SigLIP So400m/14, as upstream openpi's Pi0Config(pi05=True).
        return Pi05Config(
            llm=GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
            expert=GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
            siglip=SiglipConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, num_patches=256),
            vocab_size=257_152,
            action_dim=32,
        )
    if name == "tiny":
        # The shared reference model's sizes (../shared/reference/tiny_pi05/config.json).
        return Pi05Config(
            llm=GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
            expert=GemmaConfig(width=32, depth=4, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=16),
            siglip=SiglipConfig(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=14, num_patches=256),
            vocab_size=1024,
            action_dim=32,
        )
    raise ValueError(f"unknown preset {name!r}; choose 'tiny' or 'full'")


PRESETS = ("tiny", "full")

"""Infer a `Pi05Config` from a checkpoint's parameter shapes (no weights needed), and validate the layout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from checkpoints.errors import CheckpointError
from checkpoints.layout import param_shapes
from pi05_jax.config import GemmaConfig, Pi05Config, SiglipConfig

_LLM = "PaliGemma/llm/layers"
_IMG = "PaliGemma/img"


def _shape(shapes: Mapping[str, Sequence[int]], path: str, rank: int, where: str) -> tuple[int, ...]:
    if path not in shapes:
        raise CheckpointError(f"{where}: missing key {path!r} (needed to infer the model's sizes)")
    shape = tuple(int(s) for s in shapes[path])
    if len(shape) != rank:
        raise CheckpointError(f"{where}: key {path!r} has rank {len(shape)} (shape {shape}), expected rank {rank}")
    return shape


def _gemma(shapes, suffix: str, where: str) -> GemmaConfig:
    depth, num_heads, width, head_dim = _shape(shapes, f"{_LLM}/attn/q_einsum{suffix}/w", 4, where)
    _, _, num_kv_heads, _, _ = _shape(shapes, f"{_LLM}/attn/kv_einsum{suffix}/w", 5, where)
    _, _, _, mlp_dim = _shape(shapes, f"{_LLM}/mlp{suffix}/gating_einsum", 4, where)
    return GemmaConfig(width, depth, mlp_dim, num_heads, num_kv_heads, head_dim)


def infer_config(
    shapes: Mapping[str, Sequence[int]],
    *,
    where: str = "checkpoint",
    action_horizon: int = 50,
    max_token_len: int = 200,
) -> Pi05Config:
    """Read every size from the flat {path: shape} map, then check every key against the full layout."""
    llm = _gemma(shapes, "", where)
    expert = _gemma(shapes, "_1", where)
    p, _, _, sw = _shape(shapes, f"{_IMG}/embedding/kernel", 4, where)
    _, num_patches, _ = _shape(shapes, f"{_IMG}/pos_embedding", 3, where)
    block = f"{_IMG}/Transformer/encoderblock"
    sdepth, _, sheads, _ = _shape(shapes, f"{block}/MultiHeadDotProductAttention_0/query/kernel", 4, where)
    _, _, smlp = _shape(shapes, f"{block}/MlpBlock_0/Dense_0/kernel", 3, where)
    vocab, _ = _shape(shapes, "PaliGemma/llm/embedder/input_embedding", 2, where)
    action_dim, _ = _shape(shapes, "action_in_proj/kernel", 2, where)
    try:
        config = Pi05Config(
            llm=llm,
            expert=expert,
            siglip=SiglipConfig(sw, sdepth, smlp, sheads, p, num_patches),
            vocab_size=vocab,
            action_dim=action_dim,
            action_horizon=action_horizon,
            max_token_len=max_token_len,
        )
        expected = param_shapes(config)
    except ValueError as e:
        raise CheckpointError(f"{where}: inconsistent sizes: {e}") from e
    validate_shapes(shapes, expected, where=where)
    return config


def validate_shapes(
    shapes: Mapping[str, Sequence[int]], expected: Mapping[str, tuple[int, ...]], *, where: str
) -> None:
    """Every expected key present with its exact shape; no key we would silently ignore."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing key {missing[0]!r}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{where}: unexpected key {unexpected[0]!r}{more}; this loader knows openpi's pi0.5 layout only"
        )
    for path, want in expected.items():
        got = tuple(int(s) for s in shapes[path])
        if len(got) != len(want):
            raise CheckpointError(f"{where}: key {path!r} has rank {len(got)} (shape {got}), expected shape {want}")
        if got != want:
            stacked = "/layers/" in path or "/encoderblock/" in path
            if stacked and got[0] != want[0]:
                raise CheckpointError(
                    f"{where}: inconsistent depths: key {path!r} is stacked over {got[0]} layers, "
                    f"expected {want[0]} (shape {got}, expected {want})"
                )
            raise CheckpointError(f"{where}: key {path!r} has shape {got}, expected {want}")

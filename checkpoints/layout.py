"""openpi's pi0.5 parameter layout: every key path and its shape, as a function of the config.

Key paths are exactly upstream's (`PaliGemma/llm/layers/attn/q_einsum/w`, ...); layer weights are stacked over
depth on axis 0 (openpi scans its layers). This table is the single place the layout is written down: the loader
validates against it, the random-weight writer creates it, and the tests count parameters with it.
"""

from __future__ import annotations

from pi05_jax.config import Pi05Config


def param_shapes(config: Pi05Config) -> dict[str, tuple[int, ...]]:
    """Flat {"a/b/c": shape} of every parameter of a pi0.5 model with this config."""
    v, llm, ex, a = config.siglip, config.llm, config.expert, config.action_dim
    p = v.patch_size
    vh = v.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "PaliGemma/img/embedding/kernel": (p, p, 3, v.width),
        "PaliGemma/img/embedding/bias": (v.width,),
        "PaliGemma/img/pos_embedding": (1, v.num_patches, v.width),
        "PaliGemma/img/Transformer/encoder_norm/scale": (v.width,),
        "PaliGemma/img/Transformer/encoder_norm/bias": (v.width,),
        "PaliGemma/img/head/kernel": (v.width, llm.width),
        "PaliGemma/img/head/bias": (llm.width,),
    }
    blk = "PaliGemma/img/Transformer/encoderblock"
    d = v.depth
    for ln in ("LayerNorm_0", "LayerNorm_1"):
        shapes[f"{blk}/{ln}/scale"] = (d, v.width)
        shapes[f"{blk}/{ln}/bias"] = (d, v.width)
    mha = f"{blk}/MultiHeadDotProductAttention_0"
    for proj in ("query", "key", "value"):
        shapes[f"{mha}/{proj}/kernel"] = (d, v.width, v.num_heads, vh)
        shapes[f"{mha}/{proj}/bias"] = (d, v.num_heads, vh)
    shapes[f"{mha}/out/kernel"] = (d, v.num_heads, vh, v.width)
    shapes[f"{mha}/out/bias"] = (d, v.width)
    shapes[f"{blk}/MlpBlock_0/Dense_0/kernel"] = (d, v.width, v.mlp_dim)
    shapes[f"{blk}/MlpBlock_0/Dense_0/bias"] = (d, v.mlp_dim)
    shapes[f"{blk}/MlpBlock_0/Dense_1/kernel"] = (d, v.mlp_dim, v.width)
    shapes[f"{blk}/MlpBlock_0/Dense_1/bias"] = (d, v.width)

    if llm.depth != ex.depth:
        raise ValueError(f"LLM and action expert must have the same depth: {llm.depth=} {ex.depth=}")
    L = "PaliGemma/llm"
    shapes[f"{L}/embedder/input_embedding"] = (config.vocab_size, llm.width)
    shapes[f"{L}/final_norm/scale"] = (llm.width,)
    shapes[f"{L}/final_norm_1/Dense_0/kernel"] = (ex.width, 3 * ex.width)
    shapes[f"{L}/final_norm_1/Dense_0/bias"] = (3 * ex.width,)
    d = llm.depth
    for sfx, g in (("", llm), ("_1", ex)):
        shapes[f"{L}/layers/attn/q_einsum{sfx}/w"] = (d, g.num_heads, g.width, g.head_dim)
        shapes[f"{L}/layers/attn/kv_einsum{sfx}/w"] = (d, 2, g.num_kv_heads, g.width, g.head_dim)
        shapes[f"{L}/layers/attn/attn_vec_einsum{sfx}/w"] = (d, g.num_heads, g.head_dim, g.width)
        shapes[f"{L}/layers/mlp{sfx}/gating_einsum"] = (d, 2, g.width, g.mlp_dim)
        shapes[f"{L}/layers/mlp{sfx}/linear"] = (d, g.mlp_dim, g.width)
    for norm in ("pre_attention_norm", "pre_ffw_norm"):
        shapes[f"{L}/layers/{norm}/scale"] = (d, llm.width)
        shapes[f"{L}/layers/{norm}_1/Dense_0/kernel"] = (d, ex.width, 3 * ex.width)
        shapes[f"{L}/layers/{norm}_1/Dense_0/bias"] = (d, 3 * ex.width)

    shapes["action_in_proj/kernel"] = (a, ex.width)
    shapes["action_in_proj/bias"] = (ex.width,)
    shapes["action_out_proj/kernel"] = (ex.width, a)
    shapes["action_out_proj/bias"] = (a,)
    for name in ("time_mlp_in", "time_mlp_out"):
        shapes[f"{name}/kernel"] = (ex.width, ex.width)
        shapes[f"{name}/bias"] = (ex.width,)
    return shapes


def count_params(config: Pi05Config) -> int:
    total = 0
    for shape in param_shapes(config).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dict -> {"a/b/c": leaf}."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: dict[str, object]) -> dict:
    """{"a/b/c": leaf} -> nested dict."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree

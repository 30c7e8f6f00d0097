"""Two layouts of the per-layer weights, and one loop that runs over either.

- stacked (openpi's checkpoint layout): every leaf of a layer group carries the depth on axis 0 and the model loops
  with `lax.scan`. Inside the scan's while loop XLA dynamic-slices each layer's weight out of the stacked array and,
  before a cuBLAS GEMM, copies it: one extra read + write of every weight per layer per call (measured: 37% of the
  full model's device time in memcpy kernels).
- unstacked: the group is a tuple of per-layer dicts (arrays without the depth axis) and the loop is unrolled in
  Python, so every GEMM reads its own weight buffer directly.

The two layer groups are `params["PaliGemma"]["llm"]["layers"]` and
`params["PaliGemma"]["img"]["Transformer"]["encoderblock"]`. `unstack_layers` converts both (any pytree leaf: plain
arrays and the quantized weight dataclasses of pi05_jax.quantized alike); `scan_or_unroll` is the loop.

Axis legend: L layers.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from pi05_jax.leaf_cache import LeafCache

LLM_PATH = ("PaliGemma", "llm", "layers")
IMG_PATH = ("PaliGemma", "img", "Transformer", "encoderblock")


def is_unstacked(layers) -> bool:
    """True for the unstacked layout (a tuple of per-layer pytrees), False for stacked leaves."""
    return isinstance(layers, tuple)


def num_layers(layers) -> int:
    if is_unstacked(layers):
        return len(layers)
    leaves = jax.tree.leaves(layers)
    if not leaves:
        raise ValueError("a stacked layer group without leaves has no depth")
    return int(leaves[0].shape[0])


def unstack(layers, *, consume: bool = False) -> tuple:
    """A stacked layer group -> a tuple of per-layer pytrees (leaf[i] of every leaf); unstacked stays as it is.

    `consume=True` frees each stacked device array as soon as its slices exist, so converting a loaded checkpoint
    needs the weights plus one stacked leaf of memory, not two copies of the weights (the caller must not use the
    stacked arrays afterwards)."""
    if is_unstacked(layers):
        return layers
    n = num_layers(layers)
    if not consume:
        return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))
    leaves, treedef = jax.tree.flatten(layers)
    per_leaf = []
    for a in leaves:
        per_leaf.append(jax.block_until_ready([a[i] for i in range(n)]))
        if isinstance(a, jax.Array):
            a.delete()
    return tuple(jax.tree.unflatten(treedef, [slices[i] for slices in per_leaf]) for i in range(n))


def per_layer(layers, select: Callable):
    """`select` applied to the whole stacked group, or to every layer of an unstacked one."""
    return tuple(select(p) for p in layers) if is_unstacked(layers) else select(layers)


def get_path(tree, path):
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            raise KeyError(f"params have no {'/'.join(path)} (missing {k!r})")
        tree = tree[k]
    return tree


def replace_path(tree, path, value):
    if not path:
        return value
    return {**tree, path[0]: replace_path(tree[path[0]], path[1:], value)}


def params_unstacked(params) -> bool:
    """True when both layer groups of `params` are in the unstacked layout."""
    return is_unstacked(get_path(params, LLM_PATH)) and is_unstacked(get_path(params, IMG_PATH))


def unstack_layers(params, *, consume: bool = False) -> dict:
    """params with both layer groups in the unstacked layout (new dicts along the two paths; other leaves shared).
    `consume=True`: the stacked arrays are freed as they are converted (see `unstack`)."""
    for path in (LLM_PATH, IMG_PATH):
        params = replace_path(params, path, unstack(get_path(params, path), consume=consume))
    return params


_UNSTACKED = LeafCache()  # stacked layer groups -> their unstacked copies


def unstack_layers_cached(params) -> dict:
    """`unstack_layers`, converted once per checkpoint (keyed by the identity of the stacked leaves,
    pi05_jax.leaf_cache): a repeated call on the same params returns the same per-layer arrays. Already-unstacked
    params come back as they are."""
    groups = tuple(get_path(params, path) for path in (LLM_PATH, IMG_PATH))
    if all(is_unstacked(g) for g in groups):
        return params
    unstacked = _UNSTACKED.get(groups, lambda: tuple(unstack(g) for g in groups))
    for path, group in zip((LLM_PATH, IMG_PATH), unstacked, strict=True):
        params = replace_path(params, path, group)
    return params


def scan_or_unroll(body: Callable, carry, layers, *xs):
    """Run `body(carry, (layer_params, *per_layer_xs)) -> (carry, y)` over the layers.

    Stacked `layers`: one `lax.scan` over (layers, *xs), each x a pytree with the depth on axis 0; ys come back
    stacked. Unstacked `layers` (a tuple): a Python loop; each x must be a tuple with one entry per layer (see
    `split_layers` for a stacked pytree); ys come back as a tuple of per-layer outputs."""
    if not is_unstacked(layers):
        return jax.lax.scan(body, carry, (layers, *xs))
    depth = len(layers)
    for j, x in enumerate(xs):
        if not isinstance(x, tuple) or len(x) != depth:
            got = f"{type(x).__name__} of length {len(x)}" if isinstance(x, tuple) else type(x).__name__
            raise ValueError(f"scan_or_unroll over {depth} unstacked layers needs per-layer xs[{j}] as a tuple of "
                             f"{depth} entries, got {got}")
    ys = []
    for i, p in enumerate(layers):
        carry, y = body(carry, (p, *(x[i] for x in xs)))
        ys.append(y)
    return carry, tuple(ys)


def split_layers(tree, depth: int) -> tuple:
    """A pytree whose leaves carry the depth on axis 0 -> a tuple of `depth` per-layer pytrees (static slices)."""
    return tuple(jax.tree.map(lambda a, i=i: a[i], tree) for i in range(depth))

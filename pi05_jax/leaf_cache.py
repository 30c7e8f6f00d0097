"""Results derived from a checkpoint's arrays, cached by the identity of the arrays they come from.

The fast paths derive things from a checkpoint once and reuse them on every call: the per-layer copy of the stacked
weights (layer_stack), the packed copy (weight_packing), the per-(checkpoint, num_steps) tables (denoise_fast,
denoise_fused). A `LeafCache` keys each result by a tag, the pytree's structure (which includes static metadata
such as a quantized weight's options, so a tree rebuilt with other options is a different entry) and the id() of
every leaf, and holds those leaves by weak reference only: a checkpoint that is dropped is not kept alive by what
was derived from it, its entries are evicted on the next miss, and a recycled id() is never mistaken for the same
array.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import jax


class LeafCache:
    def __init__(self):
        self._entries: dict[tuple, tuple[list, object]] = {}

    def get(self, tree, compute: Callable[[], object], *, tag: Hashable = None):
        """compute()'s result for this tree's structure and leaves (and tag), computed once while the leaves live."""
        leaves, treedef = jax.tree.flatten(tree)
        key = (tag, treedef, tuple(id(x) for x in leaves))
        hit = self._entries.get(key)
        if hit is not None and all(ref() is leaf for ref, leaf in zip(hit[0], leaves, strict=True)):
            return hit[1]
        value = compute()
        for k in [k for k, (refs, _) in self._entries.items() if any(r() is None for r in refs)]:
            del self._entries[k]  # results for arrays that are gone
        self._entries[key] = ([weakref.ref(x) for x in leaves], value)
        return value

    def __len__(self) -> int:
        return len(self._entries)

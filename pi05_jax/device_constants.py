"""Device constants derived from a checkpoint's arrays, cached by the identity of the arrays they come from.

The fast paths precompute tables per (checkpoint, num_steps): denoise_fast's adaRMS table, denoise_fused's
shift-through-weight tables. A `LeafCache` keys each result by a tag (e.g. num_steps) and the id() of every leaf
it was computed from, and holds those leaves by weak reference only: a checkpoint that is dropped is not kept
alive by its tables, its entries are evicted on the next lookup, and a recycled id() is never mistaken for the
same array.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import jax


class LeafCache:
    def __init__(self):
        self._entries: dict[tuple, tuple[list, object]] = {}

    def get(self, tree, compute: Callable[[], object], *, tag: Hashable = None):
        """compute()'s result for these leaves of `tree` (and tag), computed once while the leaves live."""
        leaves = jax.tree.leaves(tree)
        key = (tag, tuple(id(x) for x in leaves))
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

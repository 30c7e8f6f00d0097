"""Results derived from a checkpoint's arrays, cached by the identity of the arrays they come from.

The fast paths derive things from a checkpoint once and reuse them on every call: the per-layer copy of the stacked
weights (pi05_jax.model.layer_stack), the packed copy (pi05_jax.fast.packing), the per-(checkpoint, num_steps)
tables (pi05_jax.fast.denoise). A `LeafCache` keys each result by a tag, the pytree's structure (which includes
static metadata such as a quantized weight's options, so a tree rebuilt with other options is a different entry)
and the id() of every leaf, and holds those leaves by weak reference only: a checkpoint that is dropped is not kept
alive by what was derived from it, its entries are evicted on the next miss, and a recycled id() is never mistaken
for the same array. Python scalar leaves (which cannot be weakly referenced) are keyed by value.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import jax
import numpy as np


class LeafCache:
    def __init__(self):
        self._entries: dict[tuple, _Entry] = {}

    def get(self, tree, compute: Callable[[], object], *, tag: Hashable = None):
        """compute()'s result for this tree's structure and leaves (and tag), computed once while the leaves live."""
        leaves, treedef = jax.tree.flatten(tree)
        key = (tag, treedef, tuple(_leaf_key(x) for x in leaves))
        entry = self._entries.get(key)
        if entry is not None and entry.holds(leaves):
            return entry.value(leaves)
        value = compute()
        for k in [k for k, e in self._entries.items() if e.dead()]:
            del self._entries[k]  # results for arrays that are gone
        self._entries[key] = _Entry(leaves, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)


def _weakref_or_none(x):
    try:
        return weakref.ref(x)
    except TypeError:  # Python scalars and other immutables: keyed by value instead
        return None


def _leaf_key(x):
    if isinstance(x, (jax.Array, np.ndarray)):  # nearly every leaf, on every call: no weakref probe
        return id(x)
    return id(x) if _weakref_or_none(x) is not None else ("value", type(x).__name__, x)


class _Entry:
    """One cached result. Leaves of the result that ARE leaves of the key (a packed copy shares every array it did
    not change with its source) are stored by position, not by reference, so the cache never keeps a key leaf alive
    and the entry can be evicted once the source is dropped; they are put back from the caller's leaves on a hit.
    (Arrays that merely view a key leaf, e.g. numpy slices of a stacked numpy array, do keep it alive.)"""

    def __init__(self, leaves: list, value):
        self._refs = [_weakref_or_none(x) for x in leaves]
        position = {id(x): i for i, (x, r) in enumerate(zip(leaves, self._refs, strict=True)) if r is not None}
        parts, self._treedef = jax.tree.flatten(value)
        shared = [position.get(id(v)) for v in parts]
        if any(i is not None for i in shared):
            self._value = None
            self._parts = [("key", i) if i is not None else ("own", v) for v, i in zip(parts, shared, strict=True)]
        else:
            self._value, self._parts = value, None

    def holds(self, leaves: list) -> bool:
        return all(r is None or r() is leaf for r, leaf in zip(self._refs, leaves, strict=True))

    def dead(self) -> bool:
        return any(r is not None and r() is None for r in self._refs)

    def value(self, leaves: list):
        if self._parts is None:
            return self._value
        return jax.tree.unflatten(self._treedef, [leaves[i] if kind == "key" else i for kind, i in self._parts])

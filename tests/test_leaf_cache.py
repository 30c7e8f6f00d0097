"""pi05_jax/leaf_cache.py (results keyed by tag, pytree structure and leaf identity, leaves held weakly), and the
regression it fixed in its users: `layer_stack.unstack_layers_cached` and `pi05_jax.fast.packing.pack_weights_cached`
once returned the copy cached for a quantized checkpoint when called again on the same arrays with other Fp8Weight
options (static metadata, so a different tree structure), silently dropping the new options.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints.quantize
import checkpoints.random_init
import pi05_jax.config
from pi05_jax.fast import packing
from pi05_jax.leaf_cache import LeafCache
from pi05_jax.model import layer_stack
from pi05_jax.quantized import fp8_weight
from pi05_jax.quantized.fp8_weight import Fp8Weight


class Counter:
    """compute() stand-in: returns a fresh object per call and counts the calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return object()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tagged:
    """A weight-like pytree with static metadata (as Fp8Weight's options)."""

    values: jax.Array
    note: str = dataclasses.field(default="", metadata=dict(static=True))


def test_same_leaves_hit_and_compute_once():
    cache, compute = LeafCache(), Counter()
    a, b = jnp.arange(4.0), np.ones(3, np.float32)
    first = cache.get({"a": a, "b": b}, compute)
    assert cache.get({"a": a, "b": b}, compute) is first  # a new container around the same leaves
    assert cache.get({"b": b, "a": a}, compute) is first  # dict key order is not structure
    assert compute.calls == 1 and len(cache) == 1


def test_tag_is_part_of_the_key():
    cache, compute = LeafCache(), Counter()
    tree = (jnp.arange(3.0),)
    plain = cache.get(tree, compute)
    tagged = cache.get(tree, compute, tag=("steps", 10))
    assert tagged is not plain and compute.calls == 2
    assert cache.get(tree, compute, tag=("steps", 10)) is tagged
    assert cache.get(tree, compute) is plain
    assert cache.get(tree, compute, tag=("steps", 5)) is not tagged
    assert compute.calls == 3 and len(cache) == 3


def test_same_leaves_other_structure_recomputes():
    cache, compute = LeafCache(), Counter()
    a, b = jnp.arange(3.0), jnp.arange(4.0)
    values = [cache.get(tree, compute) for tree in (
        (a, b), [a, b], {"x": a, "y": b}, {"x": a, "z": b}, (b, a), (Tagged(a), b), (Tagged(a, "other"), b))]
    assert compute.calls == len(values) == len(cache)
    assert len({id(v) for v in values}) == len(values)
    # static metadata alone told apart, and each still hits
    assert cache.get((Tagged(a, "other"), b), compute) is values[-1]
    assert cache.get((Tagged(a), b), compute) is values[-2]
    assert compute.calls == len(values)


def test_equal_values_in_another_array_recompute():
    cache, compute = LeafCache(), Counter()
    a = jnp.arange(5.0)
    twin = jnp.array(a)  # equal values, another array
    assert twin is not a and bool(jnp.all(twin == a))
    first = cache.get({"w": a}, compute)
    assert cache.get({"w": twin}, compute) is not first
    assert compute.calls == 2
    assert cache.get({"w": a}, compute) is first


@pytest.mark.parametrize("make", [pytest.param(jnp.ones, id="jax"), pytest.param(np.ones, id="numpy")])
def test_dead_leaves_are_evicted_on_the_next_miss(make):
    cache, compute = LeafCache(), Counter()
    keep, drop = make(3), make(4)
    cache.get({"w": keep}, compute)
    cache.get({"w": drop}, compute)
    assert len(cache) == 2
    fresh = make(5)  # allocated while `drop` lives: its id() cannot be drop's
    probe = weakref.ref(drop)
    del drop
    gc.collect()
    assert probe() is None, "the cache must not keep its key's leaves alive"
    assert len(cache) == 2  # nothing happens until a miss
    cache.get({"w": keep}, compute)  # a hit does not evict
    assert len(cache) == 2 and compute.calls == 2
    cache.get({"w": fresh}, compute)  # a miss: the dead entry goes, the new one comes
    assert len(cache) == 2 and compute.calls == 3
    cache.get({"w": keep}, compute)
    cache.get({"w": fresh}, compute)
    assert compute.calls == 3


def test_python_scalar_leaves_are_keyed_by_value():
    cache, compute = LeafCache(), Counter()
    a = jnp.arange(2.0)
    first = cache.get({"a": a, "eps": 1e-6}, compute)
    assert cache.get({"a": a, "eps": 1e-6}, compute) is first
    assert cache.get({"a": a, "eps": 1e-5}, compute) is not first
    assert compute.calls == 2


def test_results_sharing_key_leaves_do_not_keep_them_alive():
    """A derived copy that reuses some source arrays (as a packed checkpoint does) must not pin the source."""
    cache = LeafCache()
    src = {"kept": jnp.arange(3.0), "changed": jnp.arange(4.0)}
    def derive(tree):
        return {"kept": tree["kept"], "changed": tree["changed"] * 2}

    first = cache.get(src, functools.partial(derive, src))
    again = cache.get(src, functools.partial(derive, src))
    assert again["kept"] is src["kept"] and again["changed"] is first["changed"]  # same arrays on a hit
    probe = weakref.ref(src["kept"])
    del src, first, again
    gc.collect()
    assert probe() is None  # nothing in the cache holds the shared source array
    cache.get({"other": jnp.zeros(1)}, dict)
    assert len(cache) == 1  # the dead entry was evicted on that miss


# --- the regression: cached copies of a quantized checkpoint and its Fp8 options ----------------------------------


def fp8_weights(tree) -> list[Fp8Weight]:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Fp8Weight))
    return [leaf for leaf in leaves if isinstance(leaf, Fp8Weight)]


def activations(tree) -> set:
    return {w.options.activations if w.options else None for w in fp8_weights(tree)}


@pytest.fixture(scope="module")
def quantized_tiny():
    config = pi05_jax.config.preset("tiny")
    params = checkpoints.random_init.random_params(config, seed=0, dtype=np.float32)
    q = checkpoints.quantize.quantize_params(params, checkpoints.quantize.Plan(parts=("expert",)))
    assert fp8_weights(q), "the expert's weights should be Fp8Weights"
    return q


def test_unstack_layers_cached_keeps_new_fp8_options(quantized_tiny):
    q = quantized_tiny
    first = layer_stack.unstack_layers_cached(q)
    assert layer_stack.params_unstacked(first)
    assert layer_stack.unstack_layers_cached(q)["PaliGemma"]["llm"]["layers"] is first["PaliGemma"]["llm"]["layers"]
    assert activations(first) == {None}

    q_dynamic = fp8_weight.with_options(q, activations="dynamic")
    # the same arrays: only the static options differ
    assert all(a is b for a, b in zip(jax.tree.leaves(q_dynamic), jax.tree.leaves(q), strict=True))
    second = layer_stack.unstack_layers_cached(q_dynamic)
    assert len(fp8_weights(second)) == len(fp8_weights(first)) > 0
    assert activations(second) == {"dynamic"}
    assert activations(layer_stack.unstack_layers_cached(q)) == {None}  # the first entry is still there, unchanged


def test_pack_weights_cached_keeps_new_fp8_options(quantized_tiny):
    unstacked = layer_stack.unstack_layers_cached(quantized_tiny)
    first = packing.pack_weights_cached(unstacked, transpose_expert_gating=True)
    # the same arrays (containers are rebuilt on a hit)
    again = packing.pack_weights_cached(unstacked, transpose_expert_gating=True)
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(first), strict=True))
    assert activations(first) == {None}

    second = packing.pack_weights_cached(fp8_weight.with_options(unstacked, activations="dynamic"),
                                         transpose_expert_gating=True)
    assert len(fp8_weights(second)) == len(fp8_weights(first)) > 0
    assert activations(second) == {"dynamic"}

    # the whole chain, as the fast path prepares a checkpoint
    chained = packing.pack_weights_cached(
        layer_stack.unstack_layers_cached(fp8_weight.with_options(quantized_tiny, activations="dynamic")),
        transpose_expert_gating=True)
    assert activations(chained) == {"dynamic"}
    assert activations(packing.pack_weights_cached(unstacked, transpose_expert_gating=True)) == {None}

"""The matmul FLOPs a function really executes, read from its jaxpr (no compilation, no run).

Every `dot_general` counts 2 x (product of the lhs shape) x (product of the rhs free dims); a `scan` body counts
`length` times; `cond` counts its most expensive branch. Work the walk cannot see is reported, not guessed:
a `while` whose trip count is not static (counted once, marked inexact) and `pallas_call` kernels (opaque: not
counted). `bench` uses it to state what each implementation computes (padded or valid tokens) next to the floor.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.extend import core as jcore


@dataclasses.dataclass
class MatmulCount:
    flops: int = 0
    opaque: list = dataclasses.field(default_factory=list)  # primitive names whose work is not counted
    inexact: list = dataclasses.field(default_factory=list)  # loops whose trip count is unknown (counted once)

    @property
    def exact(self) -> bool:
        return not self.opaque and not self.inexact


def dot_general_flops(lhs_shape, rhs_shape, dimension_numbers) -> int:
    (_, rhs_contract), (_, rhs_batch) = dimension_numbers
    rhs_free = [d for i, d in enumerate(rhs_shape) if i not in rhs_contract and i not in rhs_batch]
    return 2 * math.prod(lhs_shape) * math.prod(rhs_free)


def _jaxprs_in(value):
    if isinstance(value, jcore.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jcore.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _jaxprs_in(v)


def _count(jaxpr, count: MatmulCount) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += dot_general_flops(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape,
                                       eqn.params["dimension_numbers"])
        elif name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec
            out_features = rhs[spec[0]]
            total += 2 * math.prod(out) * math.prod(rhs) // out_features  # rhs in-features are per group
        elif name == "pallas_call":
            count.opaque.append(name)
        elif name == "scan":
            total += eqn.params["length"] * _count(eqn.params["jaxpr"].jaxpr, count)
        elif name == "cond":
            total += max(_count(b.jaxpr, count) for b in eqn.params["branches"])
        elif name == "while":
            count.inexact.append(name)
            total += _count(eqn.params["body_jaxpr"].jaxpr, count)
        else:
            for value in eqn.params.values():
                for sub in _jaxprs_in(value):
                    total += _count(sub, count)
    return total


def matmul_flops(fn, *args) -> MatmulCount:
    """Trace fn(*args) and count its matmul FLOPs."""
    closed = jax.make_jaxpr(fn)(*args)
    count = MatmulCount()
    count.flops = _count(closed.jaxpr, count)
    return count

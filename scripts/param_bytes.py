#!/usr/bin/env python3
"""Bytes of weights a deployment holds, from shapes only (jax.eval_shape: nothing allocated, runs on a laptop).

For a preset and a fast path: the unstacked weights as loaded, the weights packed for that fast path
(`fast_path.pack_for`, what `runtime.Model.load` keeps), and what a model would hold if it kept the originals beside
the packed copies (the layout before Model.load packed).

    python scripts/param_bytes.py [--preset full] [--kernels pallas] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.layout import unflatten
from checkpoints.random_init import param_shapes
from pi05_jax import fast_path, layer_stack
from pi05_jax.config import preset


def _bytes(leaves) -> int:
    return int(sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="full", choices=["full", "tiny"])
    ap.add_argument("--kernels", default="pallas")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    params = unflatten({p: jax.ShapeDtypeStruct(s, dtype) for p, s in param_shapes(preset(args.preset)).items()})

    def loaded(p):
        unstacked = layer_stack.unstack_layers(p)
        return unstacked, fast_path.pack_for(args.kernels, unstacked)

    unpacked, packed = jax.eval_shape(loaded, params)
    before = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(unpacked)}
    after = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(packed)}
    new = [v for k, v in after.items() if k not in before or before[k].shape != v.shape]
    gib = 2.0**30
    print(f"{args.preset} {args.dtype}, {args.kernels}: unpacked {_bytes(before.values()) / gib:.3f} GiB; packed (what "
          f"Model.load keeps) {_bytes(after.values()) / gib:.3f} GiB; originals + packed copies "
          f"{(_bytes(before.values()) + _bytes(new)) / gib:.3f} GiB ({_bytes(new) / gib:.3f} GiB of packed leaves)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

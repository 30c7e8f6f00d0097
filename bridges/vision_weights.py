"""Read only the vision tower's weights (`params["PaliGemma"]["img"]`) from an openpi checkpoint, as float32 numpy.

Exporting SigLIP must not need the 3B-parameter LLM in memory: orbax restores just the `PaliGemma/img` subtree
(partial restore), onto the CPU, whatever the stored dtype (bfloat16 checkpoints are widened exactly).
"""

from __future__ import annotations

import pathlib

import numpy as np

from checkpoints.errors import CheckpointError
from checkpoints.layout import flatten, unflatten
from pi05_jax.config import Pi05Config

IMG_PREFIX = "PaliGemma/img/"


def load_vision_params(checkpoint_dir: str | pathlib.Path) -> tuple[Pi05Config, dict]:
    """(config inferred from the checkpoint's shapes, nested {img key: float32 ndarray})."""
    import jax
    import orbax.checkpoint as ocp

    from checkpoints import openpi_io

    path = openpi_io.params_dir(checkpoint_dir)
    config = openpi_io.read_config(checkpoint_dir)
    tree = openpi_io._metadata_tree(path)  # same reader as the full loader, so errors read the same
    flat = flatten(tree["params"])
    wanted = {k: v for k, v in flat.items() if k.startswith(IMG_PREFIX)}
    if not wanted:
        raise CheckpointError(f"{str(path)!r}: no keys under 'PaliGemma/img/' (not a pi0/pi0.5 checkpoint?)")
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    item = {"params": unflatten(wanted)}
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray, sharding=cpu), item)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                        partial_restore=True))
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{str(path)!r}: restoring the vision weights failed "
                              f"({type(e).__name__}: {str(e)[:300]})") from e
    out = {}
    for key, leaf in flatten(restored["params"]).items():
        key = key.removesuffix("/value")
        out[key[len(IMG_PREFIX):]] = np.asarray(leaf, dtype=np.float32)
    return config, unflatten(out)

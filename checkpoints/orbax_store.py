"""The one module that talks to orbax: find a checkpoint's params item, read its metadata, restore and save it.

Every checkpoint reader and writer of this package (`openpi_io`, `quantized_io`, `quantize`) builds on these
functions and this module imports none of them. An item is openpi's `{"params": <nested dict>}`; training
checkpoints add a trailing "value" key to every leaf, which `read_metadata` and `restore_params` strip.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from checkpoints.errors import CheckpointError
from checkpoints.layout import flatten, unflatten

ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
VALUE_SUFFIX = "/value"


def params_dir(checkpoint_dir: str | pathlib.Path) -> pathlib.Path:
    """The orbax params item of a checkpoint directory (`<dir>/params`, or `<dir>` itself when it is the item)."""
    root = pathlib.Path(checkpoint_dir).expanduser().resolve()
    if not root.exists():
        raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint path {str(root)!r} is a file, expected a directory holding params/")
    path = root / "params"
    if not path.is_dir():
        if any((root / m).exists() for m in ORBAX_MARKERS):
            path = root  # pointed straight at the params item
        else:
            raise CheckpointError(
                f"{str(root)!r} is not an openpi checkpoint: no 'params/' directory "
                f"(expected <dir>/params/ written by orbax, and <dir>/assets/<asset_id>/norm_stats.json)"
            )
    if not any((path / m).exists() for m in ORBAX_MARKERS):
        raise CheckpointError(f"{str(path)!r} is not an orbax checkpoint (no _METADATA or manifest.ocdbt)")
    return path


def metadata_tree(path: pathlib.Path) -> dict:
    """The item's tree of array metadata ({"params": ...}); works with orbax 0.11 (a tree) and 0.12
    (StepMetadata)."""
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            md = ckptr.metadata(path)
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{str(path)!r}: cannot read orbax metadata ({type(e).__name__}: {e})") from e
    tree = getattr(md, "item_metadata", md)  # orbax >= 0.12: StepMetadata.item_metadata
    tree = getattr(tree, "tree", tree)  # orbax >= 0.12: TreeMetadata.tree
    if not isinstance(tree, dict) or "params" not in tree:
        keys = list(tree.keys()) if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointError(f"{str(path)!r}: expected an item {{'params': ...}} (openpi's layout), found {keys}")
    return tree


def strip_value_suffix(flat: dict[str, object]) -> tuple[dict[str, object], bool]:
    """({key without the training layout's trailing "/value": leaf}, whether every key had it)."""
    if flat and all(k.endswith(VALUE_SUFFIX) for k in flat):
        return {k[: -len(VALUE_SUFFIX)]: v for k, v in flat.items()}, True
    return flat, False


@dataclasses.dataclass(frozen=True)
class StoredParams:
    """What the metadata says about a params item, read without touching the weights."""

    path: pathlib.Path  # the params item
    tree: dict  # orbax's metadata tree {"params": ...}, keys as stored
    flat: dict[str, object]  # {"a/b/c": array metadata}, without the "/value" suffix
    has_value: bool  # the training layout (every leaf ends in "value")

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(getattr(v, "shape", ())) for k, v in self.flat.items()}

    def dtypes(self) -> dict[str, str]:
        """{key: stored dtype name}; CheckpointError naming the key when the metadata has none."""
        out = {}
        for k, v in self.flat.items():
            dtype = getattr(v, "dtype", None)
            if dtype is None:
                raise CheckpointError(f"{str(self.path)!r}: key {k!r} has no dtype in the orbax metadata")
            out[k] = jnp.dtype(dtype).name
        return out


def read_metadata(path: pathlib.Path) -> StoredParams:
    tree = metadata_tree(path)
    flat, has_value = strip_value_suffix(flatten(tree["params"]))
    return StoredParams(path=path, tree=tree, flat=flat, has_value=has_value)


def restore_params(stored: StoredParams, dtype_for: Callable[[str], object], *,
                   device: jax.Device | None = None) -> dict[str, jax.Array]:
    """Every array of the item on `device` (default: the first), each cast by orbax to `dtype_for(key)` as it is
    read (None: its stored dtype). Keys are passed and returned without the "/value" suffix."""
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])

    def args_for(stored_key: str):
        key = stored_key[: -len(VALUE_SUFFIX)] if stored.has_value else stored_key
        dtype = dtype_for(key)
        return ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=sharding,
                                    dtype=None if dtype is None else jnp.dtype(dtype))

    item = {"params": stored.tree["params"]}
    restore_args = {"params": unflatten({k: args_for(k) for k in flatten(stored.tree["params"])})}
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(stored.path,
                                     args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
    except Exception as e:
        raise CheckpointError(
            f"{str(stored.path)!r}: restoring the weights failed; the checkpoint is corrupted or truncated "
            f"({type(e).__name__}: {str(e)[:300]})"
        ) from e
    flat, _ = strip_value_suffix(flatten(restored["params"]))
    return flat


def save_params_item(path: pathlib.Path, params: dict) -> None:
    """Write `{"params": params}` (nested dict of numpy / jax arrays) as an orbax item at `path` (replaced)."""
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path, {"params": params}, force=True)

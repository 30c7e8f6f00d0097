"""openpi checkpoint loading: both leaf layouts, casting, config inference from shapes, and clear errors."""

from __future__ import annotations

import ast
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import openpi_io, orbax_store
from checkpoints.config_inference import infer_config
from checkpoints.errors import CheckpointError
from checkpoints.layout import count_params, flatten, param_shapes
from checkpoints.random_init import random_params
from pi05_jax.config import preset

# openpi's Pi0Config(pi05=True) parameter count (gemma_2b + gemma_300m + SigLIP So400m/14), from the spec.
UPSTREAM_FULL_PARAM_COUNT = 3_353_433_872


def _ref_ckpt(reference_dir):
    return reference_dir / "checkpoint"


def test_config_inferred_from_shapes_matches_reference_config(reference_dir):
    want = json.loads((reference_dir / "config.json").read_text())
    cfg = openpi_io.read_config(_ref_ckpt(reference_dir))
    for stream, got in (("paligemma", cfg.llm), ("action_expert", cfg.expert)):
        for field, value in want[stream].items():
            assert getattr(got, field) == value, (stream, field)
    for field, value in want["siglip"].items():
        assert getattr(cfg.siglip, field) == value, field
    assert cfg.vocab_size == want["vocab_size"]
    assert cfg.action_dim == want["action_dim"]


def test_full_config_has_upstreams_parameter_count_without_weights():
    cfg = preset("full")
    shapes = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in param_shapes(cfg).items()}
    assert infer_config({k: v.shape for k, v in shapes.items()}) == cfg
    assert count_params(cfg) == UPSTREAM_FULL_PARAM_COUNT
    assert sum(int(np.prod(v.shape)) for v in shapes.values()) == UPSTREAM_FULL_PARAM_COUNT


def test_full_size_sampler_shape_checks_with_eval_shape():
    """The whole full-size sampler traces (shapes only, no weights, no compile) and returns [B, 50, 32]."""
    from checkpoints.layout import unflatten
    from pi05_jax import implementations
    from pi05_jax.model import reference
    from pi05_jax.observation import Observation

    cfg = preset("full")
    params = unflatten({k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in param_shapes(cfg).items()})
    b = 1
    obs = Observation(
        images={k: jax.ShapeDtypeStruct((b, 224, 224, 3), jnp.float32) for k in cfg.image_keys},
        image_masks={k: jax.ShapeDtypeStruct((b,), jnp.bool_) for k in cfg.image_keys},
        state=jax.ShapeDtypeStruct((b, 32), jnp.float32),
        tokenized_prompt=jax.ShapeDtypeStruct((b, 200), jnp.int32),
        tokenized_prompt_mask=jax.ShapeDtypeStruct((b, 200), jnp.bool_),
    )
    noise = jax.ShapeDtypeStruct((b, 50, 32), jnp.float32)
    out = jax.eval_shape(lambda p, o, n: implementations.REFERENCE.sample(p, o, n, 10), params, obs, noise)
    assert out.shape == (b, 50, 32) and out.dtype == jnp.float32
    pre = jax.eval_shape(lambda p, o: reference.reference_prefill(p, o, reference.encode_views(p, o, jnp.bfloat16)),
                         params, obs)
    assert pre.kv[0].shape == (18, b, 3 * 256 + 200, 1, 256)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cast_on_load(reference_dir, dtype):
    cfg, params = openpi_io.load_params(_ref_ckpt(reference_dir), dtype=dtype)
    leaves = jax.tree.leaves(params)
    assert all(leaf.dtype == jnp.dtype(dtype) for leaf in leaves)
    assert len(flatten(params)) == len(param_shapes(cfg))


def test_training_layout_with_value_suffix_loads_identically(reference_dir, tmp_path):
    _, params = openpi_io.load_params(_ref_ckpt(reference_dir), dtype="float32")
    host = jax.tree.map(np.asarray, params)
    openpi_io.save_params(tmp_path / "train", host, value_suffix=True)
    # the written checkpoint really has the training layout
    tree = orbax_store.metadata_tree(orbax_store.params_dir(tmp_path / "train"))
    assert all(k.endswith("/value") for k in flatten(tree["params"]))
    _, loaded = openpi_io.load_params(tmp_path / "train", dtype="float32")
    for (ka, a), (kb, b) in zip(sorted(flatten(host).items()), sorted(flatten(loaded).items()), strict=True):
        assert ka == kb
        np.testing.assert_array_equal(a, np.asarray(b))


def test_orbax_011_metadata_api_returning_a_plain_tree(reference_dir, monkeypatch):
    """orbax 0.11's PyTreeCheckpointer.metadata returns the tree itself (0.12 wraps it in StepMetadata)."""
    import orbax.checkpoint as ocp

    real = ocp.PyTreeCheckpointer.metadata

    def old_style(self, path):
        return real(self, path).item_metadata.tree

    cfg_new, params_new = openpi_io.load_params(_ref_ckpt(reference_dir), dtype="float32")
    monkeypatch.setattr(ocp.PyTreeCheckpointer, "metadata", old_style)
    assert not hasattr(ocp.PyTreeCheckpointer().metadata(openpi_io.params_dir(_ref_ckpt(reference_dir))),
                       "item_metadata")
    cfg_old, params_old = openpi_io.load_params(_ref_ckpt(reference_dir), dtype="float32")
    assert cfg_old == cfg_new
    for a, b in zip(jax.tree.leaves(params_old), jax.tree.leaves(params_new), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _write(tmp_path, flat_mutator, name="ckpt"):
    from checkpoints.layout import unflatten

    flat = flatten(random_params(preset("tiny")))
    flat_mutator(flat)
    openpi_io.save_params(tmp_path / name, unflatten(flat))
    return tmp_path / name


def test_error_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        openpi_io.load_params(tmp_path / "nope")


def test_error_not_an_orbax_checkpoint(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "weights.npy").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not an orbax checkpoint"):
        openpi_io.load_params(tmp_path)
    with pytest.raises(CheckpointError, match="no 'params/' directory"):
        openpi_io.load_params(tmp_path / "params")


def test_error_missing_key_names_it(tmp_path):
    path = _write(tmp_path, lambda f: f.pop("PaliGemma/llm/layers/mlp_1/linear"))
    with pytest.raises(CheckpointError, match="missing key 'PaliGemma/llm/layers/mlp_1/linear'"):
        openpi_io.load_params(path)


def test_error_unexpected_key_names_it(tmp_path):
    path = _write(tmp_path, lambda f: f.__setitem__("PaliGemma/llm/extra/w", np.ones((2, 2), np.float32)))
    with pytest.raises(CheckpointError, match="unexpected key 'PaliGemma/llm/extra/w'"):
        openpi_io.load_params(path)


def test_error_wrong_rank_names_key(tmp_path):
    key = "PaliGemma/llm/layers/pre_ffw_norm/scale"
    path = _write(tmp_path, lambda f: f.__setitem__(key, np.ones((4, 64, 1), np.float32)))
    with pytest.raises(CheckpointError, match=f"'{key}' has rank 3"):
        openpi_io.load_params(path)


def test_error_inconsistent_depths(tmp_path):
    key = "PaliGemma/llm/layers/mlp/linear"
    path = _write(tmp_path, lambda f: f.__setitem__(key, np.ones((3, 128, 64), np.float32)))
    with pytest.raises(CheckpointError, match="inconsistent depths.*mlp/linear"):
        openpi_io.load_params(path)


def test_error_truncated_checkpoint(reference_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(_ref_ckpt(reference_dir), ckpt)
    data_files = [p for p in (ckpt / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    biggest = max(data_files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="corrupted or truncated|cannot read orbax metadata"):
        openpi_io.load_params(ckpt)


def test_error_deleted_metadata(reference_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(_ref_ckpt(reference_dir), ckpt)
    (ckpt / "params" / "manifest.ocdbt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        openpi_io.load_params(ckpt)


CHECKPOINTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "checkpoints"


def _checkpoints_imports(path: pathlib.Path) -> tuple[set[str], list[str]]:
    """(checkpoints modules `path` imports at module level, problems: imports of checkpoints modules inside a
    function or class, and `_private` names reached in another checkpoints module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top, problems, aliases = set(), [], {}

    def imported(node) -> list[tuple[str, str | None]]:
        """[(checkpoints module, name bound to it or None)] of one import statement."""
        if isinstance(node, ast.Import):
            return [(a.name, a.asname or a.name) for a in node.names if a.name.startswith("checkpoints.")]
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "checkpoints":
            if node.module == "checkpoints":
                return [(f"checkpoints.{a.name}", a.asname or a.name) for a in node.names]
            for a in node.names:
                if a.name.startswith("_"):
                    problems.append(f"{path.name}:{node.lineno} imports private {node.module}.{a.name}")
            return [(node.module, None)]
        return []

    for node in tree.body:
        for module, bound in imported(node):
            top.add(module)
            if bound:
                aliases[bound] = module
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for inner in ast.walk(node):
                for module, _ in imported(inner):
                    problems.append(f"{path.name}:{inner.lineno} imports {module} inside {node.name}()")
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_")):
            problems.append(f"{path.name}:{node.lineno} uses private {aliases[node.value.id]}.{node.attr}")
    return top, problems


def test_checkpoints_import_graph_is_a_dag_of_module_level_imports():
    """Every checkpoints module imports the others at module level only, uses none of their private names, and
    the graph has no cycle (found by a depth-first search here, so a cycle is named)."""
    graph, problems = {}, []
    for path in sorted(CHECKPOINTS_DIR.glob("*.py")):
        deps, found = _checkpoints_imports(path)
        graph[f"checkpoints.{path.stem}"] = deps
        problems += found
    assert not problems, "\n".join(problems)
    unknown = {d for deps in graph.values() for d in deps} - set(graph)
    assert not unknown, f"imports of checkpoints modules that do not exist: {sorted(unknown)}"
    state: dict[str, str] = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join([*trail, module])
        state[module] = "open"
        for dep in sorted(graph[module]):
            visit(dep, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
    # the layering the package documents: the orbax layer builds on no reader or writer
    assert graph["checkpoints.orbax_store"] <= {"checkpoints.errors", "checkpoints.layout"}

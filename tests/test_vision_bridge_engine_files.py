"""`pi05 build-vision-engine`, the TensorRT builder wrapper and the engine manifests, on the CPU.

TensorRT's builder cannot be installed on these machines, so `bridges.tensorrt_engine` is driven here by a small
stand-in `tensorrt` module that records what the wrapper asks of TensorRT's Python API and parses our ONNX for
real; what a real TensorRT does with it is not tested here (bridges/README.md says so).
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bridges import tensorrt_engine
from bridges.builtin_engine import write_builtin_engine
from bridges.engine_manifest import EngineFileError, read_manifest
from pi05_jax.cli import main


def build(reference_dir, tmp_path, *extra):
    argv = ["build-vision-engine", "--checkpoint", str(reference_dir / "checkpoint"), "--quiet", *extra]
    return main(argv)


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def standin_tensorrt(record: dict, *, parse_ok: bool = True) -> types.ModuleType:
    """Just enough of TensorRT 10's Python API for bridges.tensorrt_engine.build_plan, recording every call."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.0-standin"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", VERSION_COMPATIBLE="VERSION_COMPATIBLE",
                                            EXCLUDE_LEAN_RUNTIME="EXCLUDE_LEAN_RUNTIME")
    record.update(set=[], cleared=[])

    class Config:
        builder_optimization_level = None

        def set_memory_pool_limit(self, pool, size):
            record["pool"] = (pool, size)

        def set_flag(self, flag):
            record["set"].append(flag)

        def clear_flag(self, flag):
            record["cleared"].append(flag)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            record["network_flags"] = flags
            return "network"

        def create_builder_config(self):
            record["config"] = Config()
            return record["config"]

        def build_serialized_network(self, network, config):
            record["optimization_level"] = config.builder_optimization_level
            return b"stand-in plan"

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            model = onnx.load(path)
            onnx.checker.check_model(model)
            record["input_shape"] = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
            record["output_type"] = model.graph.output[0].type.tensor_type.elem_type
            return parse_ok

        def get_error(self, i):
            return "stand-in parser error: unsupported node"

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, object
    return trt


def test_without_tensorrt_says_what_to_install_and_still_writes_onnx(reference_dir, tmp_path, no_tensorrt, capsys,
                                                                     tiny_fp32):
    onnx_path = tmp_path / "siglip.onnx"
    status = build(reference_dir, tmp_path, "--views", "2", "--output", str(tmp_path / "v2.plan"),
                   "--onnx-output", str(onnx_path))
    err = capsys.readouterr().err
    assert status == 3
    assert "`import tensorrt` failed" in err and "pip install tensorrt-cu13" in err and "trtexec" in err
    assert not (tmp_path / "v2.plan").exists()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images = np.zeros((2, 224, 224, 3), np.float32)
    (out,) = session.run(None, {"images": images})
    assert out.shape == (2, 256, tiny_fp32.config.llm.width) and out.dtype == np.float16  # fp16 is the default
    # Without --onnx-output the temporary export is cleaned up.
    assert build(reference_dir, tmp_path, "--views", "1", "--output", str(tmp_path / "v1.plan")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["siglip.onnx"]


def test_runtime_only_tensorrt_is_named(monkeypatch):
    lean = types.ModuleType("tensorrt")
    lean.__version__ = "10.9"
    lean.Runtime = lean.Logger = object
    monkeypatch.setitem(sys.modules, "tensorrt", lean)
    with pytest.raises(tensorrt_engine.TensorRTUnavailable, match=r"\(10.9\) lacks Builder, OnnxParser.*runtime-only"):
        tensorrt_engine.import_tensorrt()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_builds_through_tensorrts_api(reference_dir, tmp_path, monkeypatch, precision):
    record: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", standin_tensorrt(record))
    plan = tmp_path / f"v3_{precision}.plan"
    assert build(reference_dir, tmp_path, "--views", "3", "--precision", precision, "--output", str(plan)) == 0
    assert plan.read_bytes() == b"stand-in plan"
    assert record["input_shape"] == [3, 224, 224, 3]
    strongly_typed = bool(record["network_flags"] & (1 << 5))
    if precision == "fp32":  # float32 parity: weakly typed float32 network, TF32 off
        assert not strongly_typed and record["cleared"] == ["TF32"]
        assert record["output_type"] == onnx.TensorProto.FLOAT
    else:  # the fp16 graph's own types (LayerNorm statistics in float32) are kept
        assert strongly_typed and record["cleared"] == []
        assert record["output_type"] == onnx.TensorProto.FLOAT16
    assert record["pool"] == ("workspace", 4 << 30)
    manifest = read_manifest(plan)
    assert (manifest.kind, manifest.precision, manifest.views) == ("tensorrt", precision, 3)
    assert manifest.output_dtype == {"fp32": "float32", "fp16": "float16"}[precision]
    assert manifest.builder == "tensorrt 10.0-standin"
    assert not list(tmp_path.glob("*.onnx"))


def test_parser_errors_are_reported(reference_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", standin_tensorrt({}, parse_ok=False))
    assert build(reference_dir, tmp_path, "--views", "1", "--precision", "fp32", "--output",
                 str(tmp_path / "x.plan")) == 1
    err = capsys.readouterr().err
    assert "parser rejected" in err and "stand-in parser error: unsupported node" in err
    assert not list(tmp_path.iterdir())  # no plan, no manifest, no leftover ONNX


def test_version_compatible_plan_for_the_lean_runtime(reference_dir, tmp_path, monkeypatch):
    record: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", standin_tensorrt(record))
    assert build(reference_dir, tmp_path, "--views", "1", "--output", str(tmp_path / "v.plan"),
                 "--version-compatible") == 0
    assert record["set"] == ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]


def test_fp8_needs_calibration_and_builds_with_it(reference_dir, tmp_path, monkeypatch):
    assert build(reference_dir, tmp_path, "--views", "1", "--precision", "fp8", "--output",
                 str(tmp_path / "v.plan")) == 2
    record: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", standin_tensorrt(record))
    assert build(reference_dir, tmp_path, "--views", "1", "--precision", "fp8", "--output", str(tmp_path / "v.plan"),
                 "--calibration", str(reference_dir / "model_cases.npz")) == 0
    assert record["network_flags"] & (1 << 5)
    assert read_manifest(tmp_path / "v.plan").precision == "fp8"


def test_builtin_backend_writes_the_engine_file(reference_dir, tmp_path, tiny_fp32):
    out = tmp_path / "cli.p5ve"
    assert build(reference_dir, tmp_path, "--views", "2", "--backend", "builtin", "--output", str(out)) == 0
    write_builtin_engine(tiny_fp32.params["PaliGemma"]["img"], tmp_path / "direct.p5ve", views=2)
    assert out.read_bytes() == (tmp_path / "direct.p5ve").read_bytes()
    assert read_manifest(out).kind == "builtin"
    assert build(reference_dir, tmp_path, "--views", "2", "--backend", "builtin", "--precision", "fp16",
                 "--output", str(out)) == 2


def test_adopting_a_plan_built_elsewhere(reference_dir, tmp_path, no_tensorrt):
    elsewhere = tmp_path / "trtexec_output.plan"
    elsewhere.write_bytes(b"opaque plan bytes")
    out = tmp_path / "adopted.plan"
    assert build(reference_dir, tmp_path, "--views", "2", "--precision", "fp16", "--from-plan", str(elsewhere),
                 "--output", str(out)) == 0
    assert out.read_bytes() == b"opaque plan bytes"
    manifest = read_manifest(out)
    assert (manifest.kind, manifest.precision, manifest.input_shape) == ("tensorrt", "fp16", (2, 224, 224, 3))


def test_manifest_errors_name_the_file(tmp_path):
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"x")
    (tmp_path / "x.plan.json").write_text("{not json")
    with pytest.raises(EngineFileError, match=r"x.plan.json.*not readable JSON"):
        read_manifest(plan)
    (tmp_path / "x.plan.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(EngineFileError, match=r"format 'something else'"):
        read_manifest(plan)
    (tmp_path / "x.plan.json").write_text(json.dumps({"format": "pi05-vision-engine/1", "kind": "tensorrt"}))
    with pytest.raises(EngineFileError, match=r"missing fields \['depth'"):
        read_manifest(plan)


def test_help_teaches():
    with pytest.raises(SystemExit) as done:
        main(["build-vision-engine", "--help"])
    assert done.value.code == 0

"""`--vision` / `--vision-engine` on the command line: `pi05 infer`, `serve` and `bench` run SigLIP through an
engine file built by `pi05 build-vision-engine --backend builtin` (the custom call on the CPU), and bad engine files
fail with one clear line and exit status 2 before anything slow (or a port) happens."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pi05_jax import cli
from tests.conftest import rel_err

# The builtin engine computes in float32 like our JAX tower: float32 rounding only.
FLOAT32_TOLERANCE = 1e-5
CASE = "libero_like"  # batch 1: the reference layout encodes 1 x 3 view slots -> an engine for 3 images


def pi05(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def checkpoint(reference_dir):
    return reference_dir / "checkpoint"


@pytest.fixture(scope="module")
def engine(checkpoint, tmp_path_factory):
    """A float32 builtin engine for 3 images from the reference checkpoint, built through the CLI."""
    out = tmp_path_factory.mktemp("engines") / "siglip_v3.p5ve"
    rc = cli.main(["build-vision-engine", "--checkpoint", str(checkpoint), "--views", "3", "--backend", "builtin",
                   "--output", str(out), "--quiet"])
    assert rc == 0 and out.is_file()
    return out


def infer_args(checkpoint, reference_dir, output, *vision):
    return ["infer", "--checkpoint", checkpoint, "--inputs", reference_dir / "model_cases.npz", "--case", CASE,
            "--dtype", "float32", "--kernels", "reference", "--output", output, "--quiet", *vision]


def test_infer_through_the_engine_gives_the_xla_actions(capsys, checkpoint, reference_dir, engine, model_cases,
                                                        tmp_path):
    from bridges import vision_bridge

    rc, _, err = pi05(capsys, *infer_args(checkpoint, reference_dir, tmp_path / "xla.npz"))
    assert rc == 0, err
    before = vision_bridge.stats("cpu")["executes"]
    rc, _, err = pi05(capsys, *infer_args(checkpoint, reference_dir, tmp_path / "engine.npz",
                                            "--vision", "builtin", "--vision-engine", engine))
    assert rc == 0, err
    assert vision_bridge.stats("cpu")["executes"] >= before + 2  # the engine really ran (first call + warm run)
    xla = np.load(tmp_path / "xla.npz")["actions"]
    bridged = np.load(tmp_path / "engine.npz")["actions"]
    assert bridged.dtype == np.float32 and bridged.shape == xla.shape
    assert rel_err(bridged, xla) <= FLOAT32_TOLERANCE
    assert rel_err(bridged, model_cases[f"{CASE}/out/fp32/actions"]) <= FLOAT32_TOLERANCE


def _fp16_copy(engine, dst):
    """`engine` with a manifest claiming fp16: a precision a float32 model must not take."""
    from bridges.engine_manifest import manifest_path

    dst.write_bytes(engine.read_bytes())
    manifest = json.loads(manifest_path(engine).read_text())
    manifest.update(precision="fp16", output_dtype="float16")
    manifest_path(dst).write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("problem", ["missing", "no_vision", "no_engine", "wrong_kind", "wrong_precision",
                                     "wrong_count"])
def test_infer_rejects_bad_engines_in_one_line(capsys, checkpoint, reference_dir, engine, tmp_path, problem):
    vision, want = {
        "missing": (["--vision", "builtin", "--vision-engine", tmp_path / "nope.p5ve"], "not found"),
        "no_vision": (["--vision-engine", engine], "--vision-engine needs --vision tensorrt or --vision builtin"),
        "no_engine": (["--vision", "tensorrt"], "--vision tensorrt needs --vision-engine FILE"),
        "wrong_kind": (["--vision", "tensorrt", "--vision-engine", engine],
                       "is a builtin engine, but --vision tensorrt was asked for"),
        "wrong_precision": (["--vision", "builtin", "--vision-engine", _fp16_copy(engine, tmp_path / "h.p5ve")],
                            "precision fp16, which a float32 model does not take"),
        # batch2_mixed runs 2 x 3 = 6 images through the reference layout; the engine takes 3
        "wrong_count": (["--vision", "builtin", "--vision-engine", engine], "runs SigLIP on 6 images"),
    }[problem]
    args = infer_args(checkpoint, reference_dir, tmp_path / "out.npz", *vision)
    if problem == "wrong_count":
        args[args.index(CASE)] = "batch2_mixed"
    rc, _, err = pi05(capsys, *args)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pi05 infer: error:") and want in lines[0], err
    assert not (tmp_path / "out.npz").exists()


def test_bench_times_xla_and_engine_vision_side_by_side(capsys, engine, tmp_path):
    out_json = tmp_path / "bench.json"
    rc, out, err = pi05(capsys, "bench", "--preset", "tiny", "--dtype", "float32", "--runs", "2", "--quiet",
                        "--vision", "builtin", "--vision-engine", engine, "--json", out_json)
    assert rc == 0, err
    doc = json.loads(out_json.read_text())
    (r,) = doc["implementations"]
    v = r["vision_bridged"]
    assert "error" not in v, v
    assert v["kind"] == "builtin" and v["engines"] == [str(engine.resolve())]
    assert v["vision"]["n"] == 2 and v["xla_vision"]["n"] == 2
    assert v["vision"]["median_s"] > 0 and v["xla_vision"]["median_s"] > 0
    assert np.isfinite(v["tokens_rel_err_vs_xla"])
    assert "--vision builtin --vision-engine" in doc["command"]
    assert "vision phase, XLA vs the builtin engine" in out
    table = out.split("vision phase, XLA vs the builtin engine")[1].splitlines()
    assert any(line.startswith("reference") and f"{v['speedup_vs_xla']:.2f}x" in line
               and f"{v['tokens_rel_err_vs_xla']:.1e}" in line for line in table), out


def test_bench_rejects_a_bad_engine_before_timing(capsys, engine, tmp_path):
    rc, out, err = pi05(capsys, "bench", "--preset", "tiny", "--dtype", "float32", "--runs", "1", "--quiet",
                        "--vision", "builtin", "--vision-engine", _fp16_copy(engine, tmp_path / "h.p5ve"))
    assert rc == 2 and "precision fp16, which a float32 model does not take" in err
    assert out == ""


def test_serve_parses_the_vision_args_and_rejects_a_bad_engine_before_listening(capsys, checkpoint, engine,
                                                                               tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--checkpoint", str(checkpoint), "--adapter", "libero", "--vision",
                              "tensorrt", "--vision-engine", f"{engine},{engine}"])
    assert (args.vision, args.vision_engine) == ("tensorrt", f"{engine},{engine}")
    assert parser.parse_args(["serve", "--checkpoint", str(checkpoint), "--adapter", "libero"]).vision == "xla"
    rc, _, err = pi05(capsys, "serve", "--checkpoint", checkpoint, "--adapter", "libero", "--port", "0",
                      "--vision", "builtin", "--vision-engine", tmp_path / "nope.p5ve")
    assert rc == 2 and "not found" in err and "listening" not in err
    rc, _, err = pi05(capsys, "serve", "--checkpoint", checkpoint, "--adapter", "libero", "--port", "0",
                      "--vision", "tensorrt", "--vision-engine", engine)
    assert rc == 2 and "is a builtin engine, but --vision tensorrt" in err and "listening" not in err


def test_vision_weights_of_a_quantized_checkpoint(capsys, checkpoint, tiny_fp32, tmp_path):
    """`pi05 quantize` output: the config comes from the quantized reader and the FP8 SigLIP weights are
    dequantized exactly as the quantized loader's Fp8Weight does; the unquantized leaves are the source's."""
    from bridges.vision_weights import load_vision_params
    from checkpoints.layout import flatten
    from checkpoints.quantized_io import load_quantized_params

    qdir = tmp_path / "fp8"
    rc, _, err = pi05(capsys, "quantize", "--checkpoint", checkpoint, "--format", "fp8", "--parts", "siglip",
                      "--output", qdir, "--quiet")
    assert rc == 0, err
    config, img = load_vision_params(qdir)
    assert config == tiny_fp32.config
    _, qparams = load_quantized_params(qdir, dtype=np.float32)
    want = flatten(qparams["PaliGemma"]["img"])
    got = flatten(img)
    assert sorted(got) == sorted(want)
    source = flatten(tiny_fp32.params["PaliGemma"]["img"])
    n_quantized = 0
    for key, w in want.items():
        if hasattr(w, "dequantize"):
            n_quantized += 1
            np.testing.assert_array_equal(got[key], np.asarray(w.dequantize(np.float32)))
            assert rel_err(got[key], np.asarray(source[key])) <= 0.1  # FP8 weights, not garbage
        else:
            np.testing.assert_array_equal(got[key], np.asarray(w, np.float32))
    assert n_quantized == 6  # q, k, v, out, and the two MLP kernels

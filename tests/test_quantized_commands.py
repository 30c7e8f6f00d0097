"""Quantized checkpoints are first-class (issue 18): a `pi05 quantize` output (FP8 with calibrated static activation
scales, and FP4) runs through every command that takes a checkpoint, `bench`, `profile`, `demo`, `infer` and `serve`,
driven through the real entry points; its actions meet the FP8 accuracy gate against float32 (cosine >= 0.99, MSE
<= 0.01), and a damaged copy gives one error line naming the file, the key and the shape.

Kept small for CI: one calibration case, few runs and steps, one server start."""

from __future__ import annotations

import json
import re
import shutil
import signal

import numpy as np
import pytest

from tests.conftest import case_inputs, cosine, run_cli

# The project's accuracy claim for quantized weights (tests/test_quantize.py's FP8_GATE), against float32 actions.
GATE = {"cosine": 0.99, "mse": 0.01}
FORMATS = ("fp8", "fp4")
# bench compiles every implementation and each of its phases, so CI benches the two fast paths on FP8 and profiles
# FP4 (the same selection and loading code); `reference` on quantized weights is tests/test_quantize.py's


def _meets_gate(actions, want) -> tuple[float, float]:
    actions, want = np.asarray(actions, np.float64), np.asarray(want, np.float64)
    assert actions.shape == want.shape and np.all(np.isfinite(actions))
    cos, mse = cosine(actions, want), float(np.mean((actions - want) ** 2))
    assert cos >= GATE["cosine"] and mse <= GATE["mse"], f"cosine {cos:.6f}, MSE {mse:.3e} (gate {GATE})"
    return cos, mse


@pytest.fixture(scope="module")
def quantized(reference_dir, model_cases, tmp_path_factory) -> dict:
    """{"fp8": FP8 checkpoint calibrated on libero_like (static activation scales), "fp4": FP4 expert MLPs + FP8,
    dynamic scales}, written once through `pi05 quantize`."""
    root = tmp_path_factory.mktemp("quantized_commands")
    calibration = root / "calibration.npz"
    arrays = {k: model_cases[k] for k in model_cases.files if k.startswith("libero_like/in/")}
    arrays["libero_like/in/num_steps"] = np.asarray(2)  # the amax over 2 Euler steps: fewer calls to record
    np.savez(calibration, **arrays)
    dirs = {}
    for fmt, extra in (("fp8", ["--calibration", str(calibration)]), ("fp4", [])):
        dirs[fmt] = root / fmt
        code, out, err = run_cli(["quantize", "--checkpoint", str(reference_dir / "checkpoint"), "--format", fmt,
                                  "--output", str(dirs[fmt]), "--quiet", *extra])
        assert code == 0, err[-2000:]
        scaling = "static" if fmt == "fp8" else "dynamic"
        assert f"({scaling} activation scaling)" in out, out
    return dirs


def test_bench_runs_a_quantized_checkpoint_on_the_cpu(quantized, tmp_path):
    fmt, kernels = "fp8", ("compact", "pallas")
    code, out, err = run_cli(["bench", "--checkpoint", str(quantized[fmt]), "--device", "cpu", "--kernels",
                              ",".join(kernels), "--runs", "1", "--steps", "2", "--views", "1", "--prompt-len", "10",
                              "--dtype", "float32", "--quiet", "--json", str(tmp_path / "b.json")])
    assert code == 0, err[-2000:]
    assert f"checkpoint:{quantized[fmt]}" in out
    table = out[out.index("\nimpl "):]
    rows = [line.split()[0] for line in table.strip().splitlines()[1:len(kernels) + 1]]
    assert rows == list(kernels), table[:800]  # a row per implementation, in order
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["load"]["weights_source"] == "checkpoint load"
    assert [r["name"] for r in doc["implementations"]] == list(kernels)
    for r in doc["implementations"]:
        assert r["actions_finite"] and r["total"]["median_s"] > 0 and r["compile_s"] > 0, r["name"]
    # every implementation computes the same quantized model: close to the first one's actions (FP8 activation
    # rounding differs between the paths' token layouts: not float32 rounding, still within a few percent)
    for r in doc["implementations"][1:]:
        assert r["actions_rel_err_vs_first"] <= 0.05, (r["name"], r["actions_rel_err_vs_first"])


def test_bench_compares_a_checkpoint_with_its_quantized_copy_in_one_run(quantized, reference_dir, tmp_path):
    """`pi05 bench --checkpoint A --compare-checkpoint B`: both timed in one run, and the comparison's figures are the
    two models' own: its relative error equals the one computed here from each checkpoint's actions (runtime.Model,
    bench's inputs) and meets the FP8 gate against the float32 checkpoint."""
    from pi05_jax.runtime import Model
    from pi05_jax.synthetic import synthetic_noise, synthetic_observation

    src, fp8 = reference_dir / "checkpoint", quantized["fp8"]
    code, out, err = run_cli(["bench", "--checkpoint", str(src), "--compare-checkpoint", str(fp8), "--device", "cpu",
                              "--kernels", "compact", "--runs", "1", "--steps", "2", "--views", "1", "--prompt-len",
                              "10", "--dtype", "float32", "--quiet", "--json", str(tmp_path / "b.json")])
    assert code == 0, err[-2000:]
    doc = json.loads((tmp_path / "b.json").read_text())
    first, second = doc["implementations"]
    assert (first["name"], second["name"]) == ("compact", f"compact@{fp8.name}")
    assert (first["checkpoint"], second["checkpoint"]) == (str(src), str(fp8))
    assert f"compact@{fp8.name}" in out and "--compare-checkpoint" in doc["command"]
    assert second["speedup_vs_first"] > 0 and first["actions_rel_err_vs_first"] == 0.0
    actions = {}
    for name, ckpt in (("float", src), ("fp8", fp8)):
        model = Model.load(ckpt, dtype="float32", kernels="compact")
        obs = synthetic_observation(model.config, batch=1, views=1, prompt_len=10, seed=0)
        actions[name] = np.asarray(model.sample(obs, noise=synthetic_noise(model.config, batch=1, seed=0),
                                                num_steps=2), np.float64)
    want = np.linalg.norm(actions["fp8"] - actions["float"]) / np.linalg.norm(actions["float"])
    assert want > 0 and abs(second["actions_rel_err_vs_first"] - want) <= 1e-5 * want, (second, want)
    assert abs(second["actions_cos_vs_first"] - cosine(actions["fp8"], actions["float"])) <= 1e-9
    _meets_gate(actions["fp8"], actions["float"])


def test_bench_refuses_to_compare_different_architectures(reference_dir, tmp_path):
    import dataclasses

    from checkpoints.openpi_io import read_config
    from checkpoints.random_init import write_random_checkpoint

    src = reference_dir / "checkpoint"
    config = read_config(src)
    other = write_random_checkpoint(tmp_path / "other", dataclasses.replace(config, action_dim=config.action_dim + 1))
    code, _, err = run_cli(["bench", "--checkpoint", str(src), "--compare-checkpoint", str(other), "--device", "cpu",
                            "--quiet"])
    assert code == 2 and "--compare-checkpoint" in err and "action_dim" in err, err[-1500:]
    code, _, err = run_cli(["bench", "--preset", "tiny", "--compare-checkpoint", str(src), "--device", "cpu",
                            "--quiet"])
    assert code == 2 and "needs --checkpoint" in err, err[-1500:]
    code, _, err = run_cli(["bench", "--checkpoint", str(src), "--compare-checkpoint", str(tmp_path / "missing"),
                            "--device", "cpu", "--quiet"])
    assert code == 2 and "--compare-checkpoint" in err and "missing" in err, err[-1500:]


def test_profile_traces_a_quantized_checkpoint(quantized, tmp_path):
    code, out, err = run_cli(["profile", "--checkpoint", str(quantized["fp4"]), "--device", "cpu", "--kernels",
                              "compact", "--runs", "1", "--steps", "2", "--views", "1", "--prompt-len", "10",
                              "--top", "5", "--trace-dir", str(tmp_path / "traces"), "--json",
                              str(tmp_path / "p.json"), "--quiet"])
    assert code == 0, err[-2000:]
    (summary,) = json.loads((tmp_path / "p.json").read_text())["implementations"]
    assert list((tmp_path / "traces" / "compact").rglob("perfetto_trace.json.gz"))
    assert 0 < len(summary["top"]) <= 5 and summary["calls"] == 1
    for phase in ("vision", "prefill", "denoise"):
        assert summary["phases"][phase]["time_us"] > 0, phase
    assert "compact:" in out and "by phase:" in out


@pytest.fixture(scope="module")
def float_demo_actions(tiny_fp32):
    """The float32 checkpoint's actions on the demo's synthetic observation and noise (2 steps)."""
    from pi05_jax.synthetic import synthetic_noise, synthetic_observation

    obs = synthetic_observation(tiny_fp32.config, views=2, prompt_len=60)
    return np.asarray(tiny_fp32.sample(obs, noise=synthetic_noise(tiny_fp32.config), num_steps=2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_demo_runs_a_given_quantized_checkpoint(quantized, float_demo_actions, tmp_path, fmt):
    before = sorted(p.name for p in quantized[fmt].iterdir())
    out_file = tmp_path / "actions.npz"
    code, out, err = run_cli(["demo", "--checkpoint", str(quantized[fmt]), "--num-steps", "2", "--runs", "1",
                              "--output", str(out_file), "--quiet"])
    assert code == 0, err[-2000:]
    # the packed layout runs: FP8 q/kv fused into one FP8 weight, the quantized MLPs through their own matmuls
    assert f"model: {quantized[fmt]}: compact (float32)" in out and "expert qkv: fused FP8" in out, out
    assert "actions shape (1, 50, 32)" in out and "finite True" in out
    _meets_gate(np.load(out_file)["actions"], float_demo_actions)
    assert sorted(p.name for p in quantized[fmt].iterdir()) == before  # the checkpoint is only read


def test_demo_checkpoint_arguments(quantized, tmp_path):
    code, _, err = run_cli(["demo", "--checkpoint", str(quantized["fp8"]), "--preset", "tiny"])
    assert code == 2 and "--preset" in err
    code, _, err = run_cli(["demo", "--checkpoint", str(tmp_path / "missing"), "--quiet"])
    assert code == 2 and "missing" in err and "not a directory" in err


@pytest.mark.parametrize("fmt, kernels", [("fp8", "compact"), ("fp4", "pallas")])
def test_infer_runs_a_quantized_checkpoint(quantized, reference_dir, model_cases, tmp_path, fmt, kernels):
    out_file = tmp_path / "actions.npz"
    code, out, err = run_cli(["infer", "--checkpoint", str(quantized[fmt]), "--inputs",
                              str(reference_dir / "model_cases.npz"), "--case", "three_steps", "--kernels", kernels,
                              "--dtype", "float32", "--output", str(out_file), "--quiet"])
    assert code == 0, err[-2000:]
    assert "finite True" in out
    _meets_gate(np.load(out_file)["actions"], model_cases["three_steps/out/fp32/actions"])


def test_serve_round_trip_on_a_quantized_checkpoint(quantized, reference_dir):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from tests.test_server import ServerProcess

    cases = np.load(reference_dir / "policy_cases.npz")
    obs = case_inputs(cases, "libero")
    obs["prompt"] = str(obs["prompt"])
    server = ServerProcess(reference_dir, "--warm", "example", checkpoint=quantized["fp8"])
    try:
        reply = WebsocketClientPolicy("127.0.0.1", server.port).infer(obs)
    finally:
        status = server.stop(signal.SIGINT)
    assert status == 0, "".join(server.lines[-20:])
    assert reply["actions"].shape == (50, 7) and reply["actions"].dtype == np.float32
    _meets_gate(reply["actions"], cases["libero/out/fp32/actions"])
    assert any(f"loading quantized checkpoint {quantized['fp8']}" in line for line in server.lines)
    assert any("stopped after 1 replies (0 errors" in line for line in server.lines)


# --- damaged copies -----------------------------------------------------------------------------------------------

Q = "PaliGemma/llm/layers/attn/q_einsum/w"
GATING = "PaliGemma/llm/layers/mlp_1/gating_einsum"


def _damaged_copy(src, dst, mutate):
    """`src` rewritten with its flat {key: array} mutated (the manifest and assets copied as they are)."""
    import orbax.checkpoint as ocp

    from checkpoints import openpi_io
    from checkpoints.layout import flatten, unflatten

    with ocp.PyTreeCheckpointer() as ckptr:
        flat = flatten(ckptr.restore(src / "params")["params"])
    mutate(flat)
    openpi_io.save_params(dst, unflatten(flat))
    shutil.copy2(src / "pi05_quantization.json", dst / "pi05_quantization.json")
    shutil.copytree(src / "assets", dst / "assets")
    return dst


def _shorter(key, axis):
    return lambda flat: flat.__setitem__(key, np.take(flat[key], range(flat[key].shape[axis] - 1), axis=axis))


DAMAGE = {
    "fp8 scales missing": ("fp8", lambda f: f.pop(f"{Q}/fp8_scales"),
                           [Q, "missing its array 'fp8_scales'", "(4, 8, 64, 16)"]),
    "fp8 key missing": ("fp8", lambda f: [f.pop(k) for k in list(f) if k.startswith(Q + "/")],
                        [Q, "missing all of its arrays", "(4, 8, 64, 16)"]),
    "fp8 values mis-shaped": ("fp8", _shorter(f"{Q}/fp8_values", 2),
                              [f"{Q}/fp8_values", "shape (4, 8, 63, 16)", "(4, 8, 64, 16)"]),
    "fp8 scales mis-shaped": ("fp8", _shorter(f"{Q}/fp8_scales", 2), [Q, "scales have shape (4, 8, 15)",
                                                                      "expected (4, 8, 16)"]),
    "fp8 act scale mis-shaped": ("fp8", _shorter(f"{Q}/fp8_act_scale", 0), [Q, "got shape (3,)", "(4,)"]),
    "fp4 packed mis-shaped": ("fp4", _shorter(f"{GATING}/fp4_packed", 3),
                              [f"{GATING}/fp4_packed", "shape (4, 2, 16, 63)", "(4, 2, 32, 64)"]),
    "fp4 block scales missing": ("fp4", lambda f: f.pop(f"{GATING}/fp4_block_scales"),
                                 [GATING, "missing its array 'fp4_block_scales'", "(4, 2, 32, 64)"]),
    "plain key mis-shaped": ("fp8", _shorter("action_out_proj/bias", 0),
                             ["action_out_proj/bias", "shape (31,)", "expected (32,)"]),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_quantized_checkpoint_names_the_file_key_and_shape(quantized, reference_dir, tmp_path, name):
    fmt, mutate, needles = DAMAGE[name]
    bad = _damaged_copy(quantized[fmt], tmp_path / "damaged", mutate)
    code, _, err = run_cli(["infer", "--checkpoint", str(bad), "--inputs", str(reference_dir / "model_cases.npz"),
                            "--case", "three_steps", "--output", str(tmp_path / "o.npz"), "--quiet"])
    lines = [line for line in err.splitlines() if line.startswith("pi05 infer: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert str(bad / "params") in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "o.npz").exists()


def test_a_damaged_quantized_checkpoint_fails_the_same_in_every_command(quantized, tmp_path):
    bad = _damaged_copy(quantized["fp8"], tmp_path / "damaged", _shorter(f"{Q}/fp8_values", 2))
    for argv in (["bench", "--device", "cpu", "--runs", "1"], ["demo"],
                 ["profile", "--device", "cpu", "--trace-dir", str(tmp_path / "t")]):
        code, _, err = run_cli([*argv, "--checkpoint", str(bad), "--quiet"])
        assert code == 2 and re.search(rf"pi05 {argv[0]}: error: .*{re.escape(Q)}/fp8_values has shape", err), err


# --- FP4 is marked for the cards it is for --------------------------------------------------------------------------


def test_fp4_is_marked_for_blackwell_and_thor_in_help_and_readme():
    from pi05_jax.cli import build_parser
    from tests.conftest import ROOT

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    quantize = sub.choices["quantize"]
    text = " ".join(quantize.format_help().split())
    assert text.count("not faster on Hopper") >= 3, text  # the description, --format, the fp4 example
    fmt = next(a for a in quantize._actions if a.dest == "fmt")
    assert "fp4" in fmt.help and "Blackwell/Thor, not faster on Hopper" in fmt.help
    readme = " ".join((ROOT / "README.md").read_text().split())
    fp4 = readme[readme.index("- **FP4** (`--format fp4`"):]
    assert fp4.index("for Blackwell / Jetson Thor, not faster on Hopper") < 120

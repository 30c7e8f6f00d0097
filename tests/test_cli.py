"""`pi05 infer`, `pi05 demo` and `pi05 compare`, driven through the real entry point."""

from __future__ import annotations

import numpy as np
import pytest

from pi05_jax.cli import main
from tests.conftest import MODEL_CASES, rel_err


def _infer(reference_dir, tmp_path, case, *extra, inputs=None):
    out = tmp_path / f"{case}.npz"
    argv = ["infer", "--checkpoint", str(reference_dir / "checkpoint"),
            "--inputs", str(inputs or reference_dir / "model_cases.npz"), "--case", case,
            "--output", str(out), "--quiet", *extra]
    return main(argv), out


@pytest.mark.parametrize("case", MODEL_CASES)
def test_infer_float32_matches_upstream(reference_dir, model_cases, tmp_path, case, capsys):
    status, out = _infer(reference_dir, tmp_path, case, "--dtype", "float32")
    assert status == 0
    actions = np.load(out)["actions"]
    assert actions.dtype == np.float32
    assert rel_err(actions, model_cases[f"{case}/out/fp32/actions"]) <= 1e-5
    printed = capsys.readouterr().out
    assert f"actions shape {actions.shape}" in printed and "timing:" in printed


def test_infer_default_runs_float32_on_the_cpu(reference_dir, model_cases, tmp_path):
    """On the CPU `infer` defaults to float32 (CPUs emulate bfloat16): upstream's float32 actions to rounding."""
    status, out = _infer(reference_dir, tmp_path, "libero_like")
    assert status == 0
    assert rel_err(np.load(out)["actions"], model_cases["libero_like/out/fp32/actions"]) <= 1e-5


def _write_bad_case(model_cases, tmp_path, mutate):
    ins = {k: model_cases[k] for k in model_cases.files if k.startswith("libero_like/in/")}
    mutate(ins)
    path = tmp_path / "bad.npz"
    np.savez(path, **ins)
    return path


BAD_INPUTS = {
    "missing key": (lambda d: d.pop("libero_like/in/tokenized_prompt_mask"), "tokenized_prompt_mask"),
    "wrong shape": (lambda d: d.__setitem__("libero_like/in/state", np.zeros((1, 8), np.float32)), "'state'"),
    "wrong dtype": (lambda d: d.__setitem__("libero_like/in/image_masks/base_0_rgb", np.ones((1,), np.int32)),
                    "image_masks/base_0_rgb"),
    "image batch mismatch": (
        lambda d: d.__setitem__("libero_like/in/images/left_wrist_0_rgb", np.zeros((2, 224, 224, 3), np.float32)),
        "images/left_wrist_0_rgb"),
    "mask batch mismatch": (lambda d: d.__setitem__("libero_like/in/image_masks/base_0_rgb", np.ones((2,), bool)),
                            "image_masks/base_0_rgb"),
    "unknown view": (lambda d: d.__setitem__("libero_like/in/image_masks/top_rgb", np.ones((1,), bool)), "top_rgb"),
    "nan in state": (lambda d: d["libero_like/in/state"].__setitem__((0, 3), np.nan), "'state' holds NaN"),
    "noise shape": (lambda d: d.__setitem__("libero_like/in/noise", np.zeros((1, 50, 7), np.float32)), "noise"),
    "token out of vocab": (lambda d: d["libero_like/in/tokenized_prompt"].__setitem__((0, 0), 10**6),
                           "tokenized_prompt"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_infer_bad_input_names_the_key(reference_dir, model_cases, tmp_path, capsys, name):
    mutate, key = BAD_INPUTS[name]
    path = _write_bad_case(model_cases, tmp_path, mutate)
    status, out = _infer(reference_dir, tmp_path, "libero_like", "--dtype", "float32", inputs=path)
    err = capsys.readouterr().err
    assert status == 2
    assert key in err, err
    assert not out.exists()


def test_infer_unknown_case_lists_cases(reference_dir, tmp_path, capsys):
    status, _ = _infer(reference_dir, tmp_path, "nope")
    err = capsys.readouterr().err
    assert status == 2 and "no case 'nope'" in err and "libero_like" in err


def test_infer_missing_checkpoint(reference_dir, tmp_path, capsys):
    status = main(["infer", "--checkpoint", str(tmp_path / "missing"), "--inputs",
                   str(reference_dir / "model_cases.npz"), "--case", "libero_like", "--output",
                   str(tmp_path / "o.npz"), "--quiet"])
    assert status == 2 and "does not exist" in capsys.readouterr().err


def test_demo_builds_a_checkpoint_once_and_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PI05_CACHE", str(tmp_path))
    assert main(["demo", "--runs", "1", "--num-steps", "2"]) == 0
    first = capsys.readouterr()
    assert "writing a random-weight tiny checkpoint" in first.err
    assert "actions shape (1, 50, 32)" in first.out and "finite True" in first.out
    assert (tmp_path / "demo-tiny" / "params").is_dir()
    assert (tmp_path / "demo-tiny" / "tokenizer.model").is_file()  # serve finds it (tests/test_demo_tokenizer.py)
    assert main(["demo", "--runs", "1", "--num-steps", "2"]) == 0
    assert "using cached demo checkpoint" in capsys.readouterr().err


def test_compare_metrics_and_thresholds(tmp_path, capsys):
    import json

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 50, 32)).astype(np.float32)
    ours = ref + 1e-3 * rng.standard_normal(ref.shape).astype(np.float32)
    np.savez(tmp_path / "a.npz", actions=ours)
    np.savez(tmp_path / "b.npz", **{"case/out/fp32/actions": ref})
    js = tmp_path / "m.json"
    assert main(["compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--ref-key", "case/out/fp32/actions",
                 "--max-rel-err", "1e-2", "--min-cosine", "0.999", "--json", str(js)]) == 0
    m = json.loads(js.read_text())
    d = ours.astype(np.float64) - ref
    assert m["rel_err"] == pytest.approx(np.sqrt((d**2).sum() / (ref.astype(np.float64) ** 2).sum()), rel=1e-9)
    assert m["mse"] == pytest.approx((d**2).mean(), rel=1e-9)
    assert m["max_abs_err"] == pytest.approx(np.abs(d).max(), rel=1e-9)
    assert len(m["per_dim_max_abs_err"]) == 32
    assert main(["compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--ref-key", "case/out/fp32/actions",
                 "--max-rel-err", "1e-5"]) == 1
    assert "FAIL: relative error" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 2


def test_every_command_help_has_examples(capsys):
    from pi05_jax.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "example" in text.lower(), f"`pi05 {name} --help` has no examples"


def test_kernels_help_names_every_implementation():
    """--kernels' help text (written without importing JAX) lists exactly the implementations of the one list."""
    import re

    from pi05_jax.commands.common import KERNELS_HELP
    from pi05_jax.implementations import IMPLEMENTATIONS

    assert set(re.findall(r"'([a-z0-9_-]+)'", KERNELS_HELP)) == set(IMPLEMENTATIONS)

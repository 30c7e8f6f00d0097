"""Policy-level parity: raw robot observations through the whole pi0.5 pipeline (adapter, normalize, resize,
tokenize, model, unnormalize, adapter outputs) against upstream openpi's actions in the shared policy_cases.npz."""

from __future__ import annotations

import numpy as np
import pytest

from pi05_jax.cli import main
from pi05_jax.policy.adapters import AdapterError
from pi05_jax.policy.errors import PolicyInputError
from pi05_jax.policy.pipeline import build_policy
from tests.conftest import cosine, rel_err

ADAPTERS = {"libero": 7, "droid": 8}  # adapter -> robot action dims
# Tolerances keyed by dtype (README of the shared reference): float32 is rounding only; bfloat16 vs upstream bf16.
MAX_REL_ERR = {"float32": 1e-5, "bfloat16": 1e-2}
MIN_COSINE = {"bfloat16": 0.9999}
REF_KEY = {"float32": "fp32", "bfloat16": "bf16"}


@pytest.fixture(scope="module")
def policy_cases(reference_dir):
    return np.load(reference_dir / "policy_cases.npz")


def raw_case(cases, name):
    prefix = f"{name}/in/"
    return {k[len(prefix):]: cases[k] for k in cases.files if k.startswith(prefix)}


def make_policy(model, reference_dir, adapter, **kw):
    return build_policy(model, checkpoint=reference_dir / "checkpoint", adapter=adapter, norm_stats=adapter,
                        tokenizer=str(reference_dir / "tokenizer.model"), **kw)


@pytest.fixture(scope="module")
def models(tiny_fp32, tiny_bf16):
    return {"float32": tiny_fp32, "bfloat16": tiny_bf16}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_policy_matches_upstream(models, reference_dir, policy_cases, adapter, dtype):
    policy = make_policy(models[dtype], reference_dir, adapter)
    raw = raw_case(policy_cases, adapter)
    noise = raw.pop("noise")
    out = policy.infer(raw, noise=noise)
    ref = policy_cases[f"{adapter}/out/{REF_KEY[dtype]}/actions"]
    actions = out["actions"]
    assert actions.shape == ref.shape == (50, ADAPTERS[adapter])
    assert actions.dtype == np.float32
    assert rel_err(actions, ref) <= MAX_REL_ERR[dtype]
    if dtype in MIN_COSINE:
        assert cosine(actions, ref) >= MIN_COSINE[dtype]
    assert out["policy_timing"]["infer_ms"] > 0


def test_policy_without_noise_is_seeded_and_finite(tiny_fp32, reference_dir, policy_cases):
    raw = raw_case(policy_cases, "libero")
    raw.pop("noise")
    a = make_policy(tiny_fp32, reference_dir, "libero", seed=3).infer(raw)["actions"]
    b = make_policy(tiny_fp32, reference_dir, "libero", seed=3).infer(raw)["actions"]
    c = make_policy(tiny_fp32, reference_dir, "libero", seed=4).infer(raw)["actions"]
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a)) and not np.allclose(a, c)


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_infer_cli_raw_case_matches_upstream(reference_dir, policy_cases, tmp_path, adapter):
    out = tmp_path / f"{adapter}.npz"
    status = main(["infer", "--checkpoint", str(reference_dir / "checkpoint"),
                   "--inputs", str(reference_dir / "policy_cases.npz"), "--case", adapter,
                   "--adapter", adapter, "--norm-stats", adapter, "--tokenizer", str(reference_dir / "tokenizer.model"),
                   "--dtype", "float32", "--output", str(out), "--quiet"])
    assert status == 0
    actions = np.load(out)["actions"]
    assert rel_err(actions, policy_cases[f"{adapter}/out/fp32/actions"]) <= MAX_REL_ERR["float32"]


def test_infer_cli_needs_an_asset_id_when_there_are_several(reference_dir, tmp_path, capsys):
    status = main(["infer", "--checkpoint", str(reference_dir / "checkpoint"),
                   "--inputs", str(reference_dir / "policy_cases.npz"), "--case", "libero", "--adapter", "libero",
                   "--tokenizer", str(reference_dir / "tokenizer.model"), "--output", str(tmp_path / "o.npz"),
                   "--quiet"])
    assert status == 2
    assert "several norm stats assets" in capsys.readouterr().err


def test_bad_raw_observation_is_a_clear_error(tiny_fp32, reference_dir, policy_cases):
    policy = make_policy(tiny_fp32, reference_dir, "droid")
    raw = raw_case(policy_cases, "droid")
    raw.pop("noise")
    raw["observation/joint_position"] = np.zeros(40, np.float32)
    with pytest.raises(PolicyInputError, match="'state' has 41 dims but its norm stats have 8"):
        policy.infer(raw)
    raw = raw_case(policy_cases, "droid")
    with pytest.raises(PolicyInputError, match="missing key 'observation/gripper_position'"):
        policy.infer({k: v for k, v in raw.items() if k != "observation/gripper_position"})


def test_policy_arguments_are_checked(tiny_fp32, reference_dir):
    with pytest.raises(AdapterError, match="unknown adapter"):
        make_policy(tiny_fp32, reference_dir, "aloha")
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        make_policy(tiny_fp32, reference_dir, "libero", num_steps=0)


@pytest.mark.slow
def test_warmup_compiles_everything_requests_need(tiny_fp32, reference_dir, policy_cases):
    """After warm-up (what `pi05 serve` runs before opening its port), requests of any prompt length compile
    nothing: the fast path's prefix buckets for this robot's camera count are all built."""
    import dataclasses

    from pi05_jax import implementations
    from pi05_jax.compile_cache import count_compilations

    # the fast path: one executable per prefix bucket, all of which warm-up must build
    model = dataclasses.replace(tiny_fp32, implementation=implementations.COMPACT, _prepared={})
    policy = make_policy(model, reference_dir, "libero", num_steps=2)
    assert policy.warmup() > 0
    raw = raw_case(policy_cases, "libero")
    raw.pop("noise")
    with count_compilations() as compiled:
        for prompt in ("go", str(raw["prompt"]) * 8):  # a short and an over-long (truncated) prompt
            out = policy.infer({**raw, "prompt": prompt})
            assert np.all(np.isfinite(out["actions"]))
    assert compiled.count == 0, compiled.functions

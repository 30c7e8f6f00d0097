"""FP4 MLP weights in the whole model: actions vs upstream's float32 actions on every shared reference case.

The gate is the project's accuracy claim for quantized weights: cosine >= 0.99 and MSE <= 0.01 against the
reference files' `<case>/out/fp32/actions`, on every case, for
  - the FP4 checkpoint `pi05 quantize --format fp4` writes (FP8 linears, NVFP4 expert MLPs), loaded through the
    checkpoint loader like any checkpoint, and the same with `--fp4-scope expert+prefill`;
  - FP4 MLP weights alone (`quantize_params_fp4`, everything else float32), both scopes.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from checkpoints import openpi_io
from pi05_jax import sampler
from pi05_jax.cli import main
from pi05_jax.observation import observation_from_arrays
from pi05_jax.quantized import QuantizationError
from pi05_jax.quantized.fp4_weight import (
    Fp4Weight,
    params_from_arrays,
    params_to_arrays,
    quantize_params_fp4,
    with_options,
)
from tests.conftest import MODEL_CASES, case_inputs, cosine, rel_err

MIN_COSINE = 0.99
MAX_MSE = 0.01
SCOPES = ("expert", "expert+prefill")


def run_case(params, tiny, cases, name):
    inputs = case_inputs(cases, name)
    obs = observation_from_arrays(inputs, tiny.config, where=name)
    actions = sampler.sample_actions(params, obs, noise=inputs["noise"], num_steps=int(inputs["num_steps"]))
    return np.asarray(actions), cases[f"{name}/out/fp32/actions"]


def assert_gate(actions, ref, what):
    """Cosine and MSE of `actions` against the float32 reference actions, within the claim."""
    assert actions.shape == ref.shape, f"{what}: actions {actions.shape}, reference {ref.shape}"
    assert np.all(np.isfinite(actions)), f"{what}: non-finite actions"
    diff = np.asarray(actions, np.float64) - np.asarray(ref, np.float64)
    cos, mse = cosine(actions, ref), float(np.mean(diff**2))
    print(f"{what}: cosine {cos:.6f} mse {mse:.2e}")
    assert cos >= MIN_COSINE, f"{what}: cosine {cos:.6f} < {MIN_COSINE}"
    assert mse <= MAX_MSE, f"{what}: MSE {mse:.3e} > {MAX_MSE}"


@pytest.fixture(scope="module")
def expert_fp4(tiny_fp32):
    return quantize_params_fp4(tiny_fp32.params, "expert")


def test_only_the_scoped_mlp_leaves_are_replaced(tiny_fp32, expert_fp4):
    layers = expert_fp4["PaliGemma"]["llm"]["layers"]
    for leaf in ("gating_einsum", "linear"):
        assert isinstance(layers["mlp_1"][leaf], Fp4Weight)
        assert layers["mlp_1"][leaf].shape == tiny_fp32.params["PaliGemma"]["llm"]["layers"]["mlp_1"][leaf].shape
        assert not isinstance(layers["mlp"][leaf], Fp4Weight)
    both = quantize_params_fp4(tiny_fp32.params, "expert+prefill")["PaliGemma"]["llm"]["layers"]
    assert isinstance(both["mlp"]["linear"], Fp4Weight) and isinstance(both["mlp_1"]["linear"], Fp4Weight)
    n_fp4 = sum(isinstance(x, Fp4Weight) for x in jax.tree.leaves(expert_fp4, is_leaf=lambda n: isinstance(
        n, Fp4Weight)))
    assert n_fp4 == 2
    # the input tree is untouched
    assert not isinstance(tiny_fp32.params["PaliGemma"]["llm"]["layers"]["mlp_1"]["linear"], Fp4Weight)


@pytest.fixture(scope="module", params=SCOPES)
def fp4_checkpoint(request, reference_dir, tmp_path_factory):
    """(scope, config, params) of the float32 reference checkpoint quantized by `pi05 quantize --format fp4`
    and loaded back by the checkpoint loader."""
    scope = request.param
    out = tmp_path_factory.mktemp("fp4") / scope.replace("+", "_")
    assert main(["quantize", "--checkpoint", str(reference_dir / "checkpoint"), "--output", str(out),
                 "--format", "fp4", "--fp4-scope", scope, "--quiet"]) == 0
    config, params = openpi_io.load_params(out, dtype="float32")
    return scope, config, params


def test_fp4_checkpoint_meets_the_claim_on_every_case(fp4_checkpoint, tiny_fp32, model_cases):
    scope, config, params = fp4_checkpoint
    assert config == tiny_fp32.config
    n_fp4 = sum(isinstance(x, Fp4Weight) for x in jax.tree.leaves(params, is_leaf=lambda n: isinstance(
        n, Fp4Weight)))
    assert n_fp4 == (2 if scope == "expert" else 4), f"{scope}: {n_fp4} FP4 weights loaded"
    for name in MODEL_CASES:
        actions, ref = run_case(params, tiny_fp32, model_cases, name)
        assert_gate(actions, ref, f"fp4 checkpoint ({scope}) {name}")


@pytest.mark.parametrize("name", MODEL_CASES)
def test_expert_scope_weights_meet_the_claim(tiny_fp32, model_cases, expert_fp4, name):
    actions, ref = run_case(expert_fp4, tiny_fp32, model_cases, name)
    assert_gate(actions, ref, f"fp4 expert weights {name}")


def test_expert_plus_prefill_scope_weights_meet_the_claim(tiny_fp32, model_cases):
    params = quantize_params_fp4(tiny_fp32.params, "expert+prefill")
    for name in MODEL_CASES:
        actions, ref = run_case(params, tiny_fp32, model_cases, name)
        assert_gate(actions, ref, f"fp4 expert+prefill weights {name}")


def test_kernel_path_matches_dequantize_path_in_the_model(tiny_fp32, model_cases, expert_fp4):
    """The Pallas kernel (interpret mode) inside lax.scan equals dequantize + einsum, at float32 rounding."""
    kernel_params = with_options(expert_fp4, backend="pallas")
    dequant_params = with_options(expert_fp4, backend="dequant")
    a, _ = run_case(kernel_params, tiny_fp32, model_cases, "three_steps")
    b, _ = run_case(dequant_params, tiny_fp32, model_cases, "three_steps")
    assert rel_err(a, b) <= 1e-5  # float32 model: both paths are float32 matmuls of the same weights


def test_arrays_round_trip_gives_identical_actions(tiny_fp32, model_cases, expert_fp4):
    restored = params_from_arrays(params_to_arrays(expert_fp4))
    flat = params_to_arrays(expert_fp4)["PaliGemma"]["llm"]["layers"]["mlp_1"]["linear"]
    assert set(flat) == {"fp4_packed", "fp4_block_scales", "fp4_tensor_scale"}
    a, _ = run_case(restored, tiny_fp32, model_cases, "libero_like")
    b, _ = run_case(expert_fp4, tiny_fp32, model_cases, "libero_like")
    np.testing.assert_array_equal(a, b)


def test_quantize_params_errors(tiny_fp32, expert_fp4):
    with pytest.raises(ValueError, match="unknown FP4 scope"):
        quantize_params_fp4(tiny_fp32.params, "everything")
    with pytest.raises(QuantizationError, match="mlp_1/gating_einsum: already quantized"):
        quantize_params_fp4(expert_fp4, "expert")
    with pytest.raises(QuantizationError, match="PaliGemma/llm/layers"):
        quantize_params_fp4({"PaliGemma": {}}, "expert")

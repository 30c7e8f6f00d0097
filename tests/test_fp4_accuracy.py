"""FP4 MLP weights in the whole model: actions vs upstream's float32 actions on every shared reference case.

Issue 8's gate (expert scope): cosine >= 0.98 and MSE <= 0.02 against `out/fp32/actions`. The expert+prefill
scope (the prefix LLM's MLPs too) is reported, not gated.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pi05_jax import sampler
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

MIN_COSINE = 0.98
MAX_MSE = 0.02


def run_case(params, tiny, cases, name):
    inputs = case_inputs(cases, name)
    obs = observation_from_arrays(inputs, tiny.config, where=name)
    actions = sampler.sample_actions(params, obs, noise=inputs["noise"], num_steps=int(inputs["num_steps"]))
    return np.asarray(actions), cases[f"{name}/out/fp32/actions"]


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


@pytest.mark.parametrize("name", MODEL_CASES)
def test_expert_scope_meets_the_issue_gate(tiny_fp32, model_cases, expert_fp4, name):
    actions, ref = run_case(expert_fp4, tiny_fp32, model_cases, name)
    cos, mse = cosine(actions, ref), float(np.mean((actions - ref) ** 2))
    print(f"fp4 expert {name}: cosine {cos:.6f} mse {mse:.2e}")
    assert cos >= MIN_COSINE and mse <= MAX_MSE, f"{name}: cosine {cos:.4f} mse {mse:.4f}"


def test_expert_plus_prefill_scope_is_reported(tiny_fp32, model_cases):
    params = quantize_params_fp4(tiny_fp32.params, "expert+prefill")
    for name in MODEL_CASES:
        actions, ref = run_case(params, tiny_fp32, model_cases, name)
        print(f"fp4 expert+prefill {name}: cosine {cosine(actions, ref):.6f} "
              f"mse {float(np.mean((actions - ref) ** 2)):.2e}")


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

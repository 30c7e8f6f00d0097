"""The vision-engine custom call (bridges/csrc + bridges.vision_bridge) on the CPU: compiled here, run inside jit
through XLA's FFI with its stateful instantiate/execute handler, against our JAX SigLIP and upstream's actions."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridges import build_ffi, vision_bridge
from bridges.builtin_engine import write_builtin_engine
from bridges.engine_manifest import EngineFileError, manifest_path
from pi05_jax import implementations
from pi05_jax.config import IMAGE_KEYS
from pi05_jax.model import siglip
from pi05_jax.observation import observation_from_arrays
from tests.conftest import case_inputs, rel_err

# The builtin engine computes in float32 like our JAX tower: float32 rounding only.
FLOAT32_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def cpu_library():
    return vision_bridge.register("cpu")


@pytest.fixture(scope="module")
def img_params(tiny_fp32):
    return tiny_fp32.params["PaliGemma"]["img"]


@pytest.fixture(scope="module")
def engines(img_params, tmp_path_factory):
    """Builtin engine files for 1, 2, 3 and 6 images: batch x 3 view slots (reference layout, batch 1 and 2) and
    batch x valid views (the compact fast path: 2 for libero_like's [T,T,F], 6 for batch2_mixed's 2 x 3)."""
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for v in (1, 2, 3, 6):
        out[v] = root / f"siglip_v{v}.p5ve"
        write_builtin_engine(img_params, out[v], views=v)
    return out


@pytest.fixture(scope="module")
def images(model_cases):
    return np.concatenate([model_cases[f"batch2_mixed/in/images/{v}"] for v in IMAGE_KEYS])[[0, 2, 4]]


def copy_engine(src, dst, *, manifest_of=None, cut: int = 0, **changes):
    """A copy of engine `src` (minus its last `cut` bytes) with the manifest of `manifest_of` (default `src`),
    some of whose fields are replaced."""
    data = src.read_bytes()
    dst.write_bytes(data[:len(data) - cut])
    manifest = json.loads(manifest_path(manifest_of or src).read_text())
    manifest.update(changes)
    manifest_path(dst).write_text(json.dumps(manifest))
    return dst


def test_custom_call_matches_jax_siglip_inside_jit(cpu_library, engines, img_params, images):
    engine = vision_bridge.VisionEngine.open(engines[3])
    before = vision_bridge.stats("cpu")

    @jax.jit
    def tower(x):
        return engine(x) * 2.0  # fused with XLA ops around it: the call really sits inside the executable

    for scale in (1.0, 0.5):  # two runs of one executable: one instantiate, one execute each
        got = np.asarray(tower(jnp.asarray(images * scale))) / 2.0
        want = np.asarray(siglip.encode_images(img_params, images * scale, dtype=jnp.float32))
        assert rel_err(got, want) <= FLOAT32_TOLERANCE
    after = vision_bridge.stats("cpu")
    assert after["instantiates"] - before["instantiates"] == 1
    assert after["executes"] - before["executes"] == 2
    assert "custom_call_target=\"pi05_vision_engine\"" in tower.lower(jnp.asarray(images)).as_text("hlo")


@pytest.mark.parametrize("kernels,case", [("reference", "libero_like"), ("reference", "batch2_mixed"),
                                          ("compact", "libero_like"), ("compact", "batch2_mixed")])
def test_sampler_with_bridged_vision_gives_the_same_actions(cpu_library, engines, tiny_fp32, model_cases, kernels,
                                                            case):
    """`--vision builtin` against `--vision xla` (same --kernels) and upstream: the reference layout encodes
    batch x 3 slots, the compact fast path batch x valid views; the engine set holds every count."""
    ins = case_inputs(model_cases, case)
    obs = observation_from_arrays(ins, tiny_fp32.config)
    impl = implementations.get(kernels)
    model = type(tiny_fp32)(config=tiny_fp32.config, params=tiny_fp32.params, implementation=impl)
    xla = type(tiny_fp32)(config=tiny_fp32.config, params=tiny_fp32.params, implementation=impl)
    args = types.SimpleNamespace(vision="builtin", vision_engine=",".join(str(p) for p in engines.values()))
    name = vision_bridge.apply_vision_args(args, model)
    assert model.kernels == name != kernels
    steps = int(ins["num_steps"])
    before = vision_bridge.stats("cpu")["executes"]
    bridged = np.asarray(model.sample(obs, noise=ins["noise"], num_steps=steps))
    assert vision_bridge.stats("cpu")["executes"] == before + 1  # the engine really ran, once
    want = np.asarray(xla.sample(obs, noise=ins["noise"], num_steps=steps))
    assert rel_err(bridged, want) <= FLOAT32_TOLERANCE
    assert rel_err(bridged, model_cases[f"{case}/out/fp32/actions"]) <= FLOAT32_TOLERANCE


def test_missing_image_count_names_the_engines(cpu_library, engines, tiny_fp32, model_cases):
    ins = case_inputs(model_cases, "batch2_mixed")
    obs = observation_from_arrays(ins, tiny_fp32.config)
    model = type(tiny_fp32)(config=tiny_fp32.config, params=tiny_fp32.params)
    vision_bridge.apply_vision_args(types.SimpleNamespace(vision="builtin", vision_engine=str(engines[3])), model)
    with pytest.raises(EngineFileError, match=r"runs SigLIP on 6 images, but the vision engines given take 3 "
                                              r"\(siglip_v3.p5ve\).*--views 6"):
        model.sample(obs, noise=ins["noise"], num_steps=1)


def test_rejects_missing_or_mismatched_engines(cpu_library, engines, tiny_fp32, images, tmp_path):
    def apply(vision, path, dtype_model=tiny_fp32):
        model = type(dtype_model)(config=dtype_model.config, params=dtype_model.params)
        return vision_bridge.apply_vision_args(types.SimpleNamespace(vision=vision, vision_engine=path), model)

    with pytest.raises(EngineFileError, match=r"not found"):
        apply("builtin", str(tmp_path / "nope.plan"))
    with pytest.raises(EngineFileError, match=r"needs --vision-engine"):
        apply("tensorrt", None)
    with pytest.raises(EngineFileError, match=r"is a builtin engine, but --vision tensorrt"):
        apply("tensorrt", str(engines[3]))
    # Wrong input shape: an engine for 1 image called with 3.
    engine = vision_bridge.VisionEngine.open(engines[1])
    with pytest.raises(EngineFileError, match=r"takes images of shape \[1, 224, 224, 3\].*rebuild it with --views 3"):
        jax.jit(engine)(jnp.asarray(images))
    # Wrong precision: an fp16 engine for a float32 model.
    fp16 = copy_engine(engines[3], tmp_path / "fp16.plan", precision="fp16", output_dtype="float16")
    with pytest.raises(EngineFileError, match=r"precision fp16, which a float32 model does not take"):
        apply("builtin", str(fp16))
    # Manifest missing.
    bare = tmp_path / "bare.plan"
    bare.write_bytes(engines[3].read_bytes())
    with pytest.raises(EngineFileError, match=r"has no manifest"):
        apply("builtin", str(bare))


def test_engine_for_another_checkpoint_is_rejected(cpu_library, engines, tiny_fp32, tmp_path):
    other = copy_engine(engines[3], tmp_path / "other.p5ve", output_shape=[3, 256, 128])
    with pytest.raises(EngineFileError, match=r"128 wide, but the model's LLM width is 64"):
        vision_bridge.VisionEngine.open(other, out_width=tiny_fp32.config.llm.width)


def test_handler_itself_rejects_a_file_that_lies(cpu_library, engines, images, tmp_path):
    """The C++ side checks too: an engine whose manifest says 3 images but whose file holds 1 fails at
    instantiate with XLA's error carrying the handler's message."""
    liar = copy_engine(engines[1], tmp_path / "liar.p5ve", manifest_of=engines[3])
    engine = vision_bridge.VisionEngine.open(liar)
    with pytest.raises(Exception, match=r"takes 1 images per call, the call has 3"):
        jax.block_until_ready(jax.jit(engine)(jnp.asarray(images)))
    truncated = copy_engine(engines[3], tmp_path / "truncated.p5ve", cut=100)
    with pytest.raises(Exception, match=r"truncated weights"):
        jax.block_until_ready(jax.jit(vision_bridge.VisionEngine.open(truncated))(jnp.asarray(images)))


@pytest.mark.skipif(build_ffi.find_nvcc() is None, reason="nvcc not found (the CUDA library needs it to compile)")
def test_cuda_library_compiles(tmp_path):
    """CI has no GPU: compile the CUDA handler (sm_90 + PTX) and check it exports the FFI symbols."""
    lib = build_ffi.build("cuda", tmp_path, force=True)
    symbols = lib.read_bytes()
    for name in (b"pi05_vision_instantiate", b"pi05_vision_execute", b"pi05_vision_state_type_id",
                 b"pi05_vision_stats"):
        assert name in symbols

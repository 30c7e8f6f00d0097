"""Each pi0.5 input/output transform against an independent computation: openpi_client's own resize (from PyPI),
np.digitize for the state bins, a fresh sentencepiece processor for the prompt, the quantile formulas written out
here over the raw norm_stats.json. No model is needed; these run in a few seconds."""

from __future__ import annotations

import json
import logging
import types

import numpy as np
import pytest
import sentencepiece
from openpi_client import image_tools

from pi05_jax.config import IMAGE_KEYS, preset
from pi05_jax.policy import adapters, images, norm_stats, prompt_tokenizer
from pi05_jax.policy.errors import PolicyInputError
from pi05_jax.policy.pipeline import Policy, pad_to_dim

ADAPTERS = ("libero", "droid")


@pytest.fixture(scope="module")
def policy_cases(reference_dir):
    return np.load(reference_dir / "policy_cases.npz")


def raw_case(cases, name: str) -> dict:
    prefix = f"{name}/in/"
    return {k[len(prefix):]: cases[k] for k in cases.files if k.startswith(prefix) and not k.endswith("/noise")}


def raw_stats(reference_dir, asset: str) -> dict:
    body = json.loads((reference_dir / "checkpoint" / "assets" / asset / "norm_stats.json").read_text())
    return {k: {s: np.asarray(v, np.float64) for s, v in d.items()} for k, d in body["norm_stats"].items()}


def sp_processor(reference_dir):
    return sentencepiece.SentencePieceProcessor(model_file=str(reference_dir / "tokenizer.model"))


# ---------------------------------------------------------------- norm stats


@pytest.mark.parametrize("asset", ADAPTERS)
def test_normalize_quantile_matches_formula(reference_dir, asset):
    stats = norm_stats.load_norm_stats(reference_dir / "checkpoint" / "assets" / asset / "norm_stats.json")
    want = raw_stats(reference_dir, asset)["state"]
    rng = np.random.default_rng(1)
    for dim in (want["q01"].shape[0], want["q01"].shape[0] - 2):  # full and shorter state (stats are sliced)
        x = rng.uniform(-2, 2, size=dim).astype(np.float32)
        q01, q99 = want["q01"][:dim], want["q99"][:dim]
        expected = (x.astype(np.float64) - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0
        got = norm_stats.normalize_quantile(x, stats["state"])
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("asset", ADAPTERS)
def test_unnormalize_quantile_matches_formula_and_passes_extra_dims(reference_dir, asset):
    stats = norm_stats.load_norm_stats(reference_dir / "checkpoint" / "assets" / asset / "norm_stats.json")
    want = raw_stats(reference_dir, asset)["actions"]
    d = want["q01"].shape[0]
    x = np.random.default_rng(2).standard_normal((50, 32)).astype(np.float32)
    got = norm_stats.unnormalize_quantile(x, stats["actions"])
    # openpi's expression on the model's float32 output: (x + 1) / 2 stays float32, the stats promote to float64
    head = (x[:, :d] + 1.0) / 2.0 * (want["q99"] - want["q01"] + 1e-6) + want["q01"]
    assert head.dtype == np.float64
    np.testing.assert_array_equal(got[:, :d], head)
    np.testing.assert_array_equal(got[:, d:], x[:, d:])
    # and it inverts normalize on the stats' dims
    back = norm_stats.normalize_quantile(got[:, :d], stats["actions"], key="actions")
    np.testing.assert_allclose(back, x[:, :d], rtol=0, atol=1e-6)  # float32 rounding of (x + 1) / 2


def test_state_longer_than_stats_is_a_clear_error(reference_dir):
    stats = norm_stats.load_norm_stats(reference_dir / "checkpoint" / "assets" / "libero" / "norm_stats.json")
    with pytest.raises(PolicyInputError, match="'state' has 9 dims but its norm stats have 8"):
        norm_stats.normalize_quantile(np.zeros(9), stats["state"])


def test_norm_stats_asset_resolution(reference_dir, tmp_path):
    ckpt = reference_dir / "checkpoint"
    assert norm_stats.asset_ids(ckpt) == ["droid", "libero"]
    assert norm_stats.resolve_norm_stats_path(ckpt, "droid") == ckpt / "assets" / "droid" / "norm_stats.json"
    with pytest.raises(norm_stats.NormStatsError, match=r"several norm stats assets \['droid', 'libero'\]"):
        norm_stats.resolve_norm_stats_path(ckpt, None)
    with pytest.raises(norm_stats.NormStatsError, match="'nope' not found"):
        norm_stats.resolve_norm_stats_path(ckpt, "nope")
    # exactly one asset (with an openpi-style id holding a slash): the id may be left out
    one = tmp_path / "ckpt"
    target = one / "assets" / "physical-intelligence" / "libero"
    target.mkdir(parents=True)
    (target / "norm_stats.json").write_text((ckpt / "assets" / "libero" / "norm_stats.json").read_text())
    assert norm_stats.resolve_norm_stats_path(one, None) == target / "norm_stats.json"
    assert norm_stats.asset_ids(one) == ["physical-intelligence/libero"]


def test_norm_stats_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "norm_stats.json"
    bad.write_text(json.dumps({"norm_stats": {"state": {"mean": [0], "std": [1], "q01": [0]},
                                              "actions": {"mean": [0], "std": [1], "q01": [0], "q99": [1]}}}))
    with pytest.raises(norm_stats.NormStatsError, match=r"norm_stats\['state'\] has no 'q99'"):
        norm_stats.load_norm_stats(bad)
    bad.write_text("{not json")
    with pytest.raises(norm_stats.NormStatsError, match="not readable JSON"):
        norm_stats.load_norm_stats(bad)


# ---------------------------------------------------------------- images

RESIZE_SHAPES = [(256, 256), (180, 320), (480, 640), (320, 180), (225, 223), (100, 50), (7, 300), (224, 224),
                 (224, 300), (1, 1)]


@pytest.mark.parametrize("shape", RESIZE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_resize_with_pad_equals_openpi_client(shape):
    rng = np.random.default_rng(sum(shape))
    frame = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    want = image_tools.resize_with_pad(frame, 224, 224)
    got = images.resize_with_pad(frame, 224, 224)
    assert got.shape == want.shape == (224, 224, 3)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_resize_with_pad_batched_equals_openpi_client():
    frames = np.random.default_rng(3).integers(0, 256, size=(2, 3, 120, 160, 3), dtype=np.uint8)
    np.testing.assert_array_equal(images.resize_with_pad(frames, 224, 224),
                                  image_tools.resize_with_pad(frames, 224, 224))


def test_parse_image_float_and_channel_first_like_openpi():
    rng = np.random.default_rng(4)
    f = rng.uniform(0, 1, size=(3, 40, 60)).astype(np.float32)
    want = np.transpose((255 * f).astype(np.uint8), (1, 2, 0))
    np.testing.assert_array_equal(images.parse_image(f, key="cam"), want)
    u = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    np.testing.assert_array_equal(images.parse_image(u, key="cam"), u)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((224, 224), np.uint8), r"shape \(224, 224\), expected one frame"),
    (np.zeros((224, 224, 3), np.int64), "dtype int64, expected uint8"),
    (np.full((8, 8, 3), 2.0, np.float32), r"values in \[2, 2\]"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN or Inf"),
    (np.zeros((8, 8, 4), np.uint8), "3 color channels"),
    (np.zeros((2, 8, 8, 3), np.uint8), "expected one frame"),
])
def test_parse_image_rejects_bad_frames(bad, message):
    with pytest.raises(PolicyInputError, match=message):
        images.parse_image(bad, key="cam")


def test_to_model_range_endpoints_and_formula():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    got = images.to_model_range(x)
    assert got.dtype == np.float32
    assert got.min() == -1.0 and got.max() == 1.0
    np.testing.assert_allclose(got, x.astype(np.float64) / 127.5 - 1.0, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- prompt and state tokens


def test_discretize_state_matches_np_digitize():
    edges = np.linspace(-1, 1, 257)
    state = np.concatenate([edges, edges[:-1] + 1e-9, [-5.0, -1.0000001, 1.0, 1.5, 0.0]])
    expected = np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
    np.testing.assert_array_equal(prompt_tokenizer.discretize_state(state), expected)


def test_tokenize_matches_sentencepiece_on_the_pi05_prompt(reference_dir):
    tok = prompt_tokenizer.PromptTokenizer(reference_dir / "tokenizer.model", 200)
    sp = sp_processor(reference_dir)
    state = np.array([-1.2, -0.5, 0.0, 0.33, 0.999, 1.0, 2.0])
    prompt = "  pick_up the\nbowl  "
    bins = np.digitize(state, bins=np.linspace(-1, 1, 257)[:-1]) - 1
    text = "Task: pick up the bowl, State: " + " ".join(str(b) for b in bins) + ";\nAction: "
    ids = sp.encode(text, add_bos=True)
    assert ids[0] == sp.bos_id() and sp.eos_id() not in ids
    tokens, mask = tok.tokenize(prompt, state)
    assert tokens.shape == mask.shape == (200,) and tokens.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(tokens[: len(ids)], ids)
    assert not tokens[len(ids):].any()
    assert mask.sum() == len(ids) and mask[: len(ids)].all()


def test_tokenize_truncates_with_a_warning(reference_dir, caplog):
    tok = prompt_tokenizer.PromptTokenizer(reference_dir / "tokenizer.model", 16)
    sp = sp_processor(reference_dir)
    state = np.zeros(8)
    full = sp.encode(prompt_tokenizer.format_prompt("a long instruction " * 5, state), add_bos=True)
    assert len(full) > 16
    with caplog.at_level(logging.WARNING):
        tokens, mask = tok.tokenize("a long instruction " * 5, state)
    assert "truncating" in caplog.text
    np.testing.assert_array_equal(tokens, full[:16])
    assert mask.all()


def test_tokenizer_errors(reference_dir, tmp_path):
    with pytest.raises(prompt_tokenizer.TokenizerError, match="does not exist"):
        prompt_tokenizer.PromptTokenizer(tmp_path / "missing.model", 200)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(prompt_tokenizer.TokenizerError, match="not a sentencepiece model"):
        prompt_tokenizer.PromptTokenizer(tmp_path / "junk.model", 200)
    with pytest.raises(prompt_tokenizer.TokenizerError, match="pieces but the model's vocabulary has 100"):
        prompt_tokenizer.PromptTokenizer(reference_dir / "tokenizer.model", 200, vocab_size=100)


# ---------------------------------------------------------------- adapters


def test_libero_adapter_like_openpi(policy_cases):
    raw = raw_case(policy_cases, "libero")
    out = adapters.LIBERO.inputs(raw)
    np.testing.assert_array_equal(out["images"]["base_0_rgb"], raw["observation/image"])
    np.testing.assert_array_equal(out["images"]["left_wrist_0_rgb"], raw["observation/wrist_image"])
    right = out["images"]["right_wrist_0_rgb"]
    assert right.shape == raw["observation/image"].shape and not right.any()
    assert out["image_masks"] == {"base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": False}
    np.testing.assert_array_equal(out["state"], raw["observation/state"])
    assert out["prompt"] == str(raw["prompt"])
    assert adapters.LIBERO.outputs(np.ones((50, 32))).shape == (50, 7)


def test_droid_adapter_like_openpi(policy_cases):
    raw = raw_case(policy_cases, "droid")
    out = adapters.DROID.inputs(raw)
    np.testing.assert_array_equal(out["images"]["base_0_rgb"], raw["observation/exterior_image_1_left"])
    np.testing.assert_array_equal(out["images"]["left_wrist_0_rgb"], raw["observation/wrist_image_left"])
    assert not out["image_masks"]["right_wrist_0_rgb"] and not out["images"]["right_wrist_0_rgb"].any()
    np.testing.assert_array_equal(
        out["state"], np.concatenate([raw["observation/joint_position"], raw["observation/gripper_position"]]))
    assert adapters.DROID.outputs(np.ones((50, 32))).shape == (50, 8)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("observation/wrist_image"), "missing key 'observation/wrist_image'"),
    (lambda r: r.pop("prompt"), "missing key 'prompt'"),
    (lambda r: r.update({"observation/state": np.full(8, np.nan, np.float32)}), "'observation/state' holds NaN"),
    (lambda r: r.update({"observation/state": np.zeros((2, 8), np.float32)}), r"shape \(2, 8\), expected a 1-D"),
    (lambda r: r.update({"prompt": 3}), "'prompt' has type int, expected a string"),
    (lambda r: r.update({"observation/image": np.zeros((64, 64, 3), np.float64) + 7}), "float frames must be"),
])
def test_adapter_rejects_bad_requests_naming_the_key(policy_cases, change, message):
    raw = raw_case(policy_cases, "libero")
    change(raw)
    with pytest.raises(PolicyInputError, match=message):
        adapters.LIBERO.inputs(raw)


def test_json_robot_description(tmp_path, policy_cases):
    desc = tmp_path / "my_arm.json"
    desc.write_text(json.dumps({
        "views": {"base_0_rgb": "cam/front", "right_wrist_0_rgb": "cam/wrist"},
        "state": ["arm/joints", "arm/gripper"],
        "action_dim": 6,
        "default_prompt": "fold the towel",
    }))
    robot = adapters.load_adapter(str(desc))
    assert robot.name == "my_arm" and robot.action_dim == 6
    rng = np.random.default_rng(5)
    raw = {"cam/front": rng.integers(0, 256, (120, 160, 3), dtype=np.uint8),
           "cam/wrist": rng.uniform(0, 1, (3, 96, 96)).astype(np.float32),
           "arm/joints": np.arange(5, dtype=np.float32), "arm/gripper": np.float32(0.5)}
    out = robot.inputs(raw)
    assert out["image_masks"] == {"base_0_rgb": True, "left_wrist_0_rgb": False, "right_wrist_0_rgb": True}
    assert out["images"]["left_wrist_0_rgb"].shape == (120, 160, 3) and not out["images"]["left_wrist_0_rgb"].any()
    np.testing.assert_array_equal(out["images"]["right_wrist_0_rgb"],
                                  np.transpose((255 * raw["cam/wrist"]).astype(np.uint8), (1, 2, 0)))
    np.testing.assert_array_equal(out["state"], [0, 1, 2, 3, 4, 0.5])
    assert out["prompt"] == "fold the towel"
    assert robot.outputs(np.zeros((50, 32))).shape == (50, 6)


def test_json_description_equal_to_libero_gives_the_same_inputs(tmp_path, policy_cases):
    desc = tmp_path / "libero_copy.json"
    desc.write_text(json.dumps({"views": {"base_0_rgb": "observation/image",
                                          "left_wrist_0_rgb": "observation/wrist_image", "right_wrist_0_rgb": None},
                                "state": "observation/state", "action_dim": 7}))
    raw = raw_case(policy_cases, "libero")
    a, b = adapters.load_adapter(str(desc)).inputs(raw), adapters.LIBERO.inputs(raw)
    assert a["image_masks"] == b["image_masks"] and a["prompt"] == b["prompt"]
    for slot in IMAGE_KEYS:
        np.testing.assert_array_equal(a["images"][slot], b["images"][slot])


@pytest.mark.parametrize("body, message", [
    ({"views": {"base_0_rgb": "a"}, "state": ["s"]}, "missing field 'action_dim'"),
    ({"views": {"top_cam": "a"}, "state": ["s"], "action_dim": 7}, "slot 'top_cam'"),
    ({"views": {"base_0_rgb": None}, "state": ["s"], "action_dim": 7}, "at least one camera"),
    ({"views": {"base_0_rgb": "a"}, "state": [], "action_dim": 7}, "at least one raw key"),
    ({"views": {"base_0_rgb": "a"}, "state": ["s"], "action_dim": "7"}, "'action_dim' must be an integer"),
    ({"views": {"base_0_rgb": "a"}, "state": ["s"], "action_dim": 7, "colour": 1}, "unknown field 'colour'"),
])
def test_bad_json_description_names_the_field(tmp_path, body, message):
    desc = tmp_path / "robot.json"
    desc.write_text(json.dumps(body))
    with pytest.raises(adapters.AdapterError, match=message):
        adapters.load_adapter(str(desc))


def test_unknown_adapter_name():
    with pytest.raises(adapters.AdapterError, match="unknown adapter 'franka'"):
        adapters.load_adapter("franka")


# ---------------------------------------------------------------- the whole input pipeline, step by step


def independent_inputs(reference_dir, raw: dict, adapter: str, max_len: int, action_dim: int) -> dict:
    """openpi's pi0.5 input transforms written out with openpi_client, numpy and sentencepiece (no pi05_jax)."""
    stats = raw_stats(reference_dir, adapter)["state"]
    if adapter == "libero":
        frames = [raw["observation/image"], raw["observation/wrist_image"]]
        state = np.asarray(raw["observation/state"])
    else:
        frames = [raw["observation/exterior_image_1_left"], raw["observation/wrist_image_left"]]
        state = np.concatenate([raw["observation/joint_position"], raw["observation/gripper_position"]])
    frames.append(np.zeros_like(frames[0]))
    d = state.shape[-1]
    state = (state - stats["q01"][:d]) / (stats["q99"][:d] - stats["q01"][:d] + 1e-6) * 2.0 - 1.0
    bins = np.digitize(state, bins=np.linspace(-1, 1, 257)[:-1]) - 1
    prompt = str(raw["prompt"]).strip().replace("_", " ").replace("\n", " ")
    ids = sp_processor(reference_dir).encode(f"Task: {prompt}, State: {' '.join(map(str, bins))};\nAction: ",
                                             add_bos=True)[:max_len]
    out = {}
    for slot, frame, valid in zip(IMAGE_KEYS, frames, (True, True, False), strict=True):
        resized = image_tools.resize_with_pad(frame, 224, 224)
        out[f"images/{slot}"] = resized.astype(np.float32) / 255.0 * 2.0 - 1.0
        out[f"image_masks/{slot}"] = valid
    out["state"] = np.pad(state, (0, action_dim - d)).astype(np.float32)
    out["tokenized_prompt"] = np.array(ids + [0] * (max_len - len(ids)), np.int32)
    out["tokenized_prompt_mask"] = np.arange(max_len) < len(ids)
    return out


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_transform_inputs_equal_an_independent_pipeline(reference_dir, policy_cases, adapter):
    config = preset("tiny")
    stats_path = reference_dir / "checkpoint" / "assets" / adapter / "norm_stats.json"
    policy = Policy(model=types.SimpleNamespace(config=config), adapter=adapters.load_adapter(adapter),
                    norm_stats=norm_stats.load_norm_stats(stats_path),
                    tokenizer=prompt_tokenizer.PromptTokenizer(reference_dir / "tokenizer.model",
                                                               config.max_token_len))
    raw = raw_case(policy_cases, adapter)
    got = policy.transform_inputs(raw)
    want = independent_inputs(reference_dir, raw, adapter, config.max_token_len, config.action_dim)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert np.asarray(got[key]).dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_pad_to_dim():
    np.testing.assert_array_equal(pad_to_dim(np.array([1.0, 2.0]), 4), [1, 2, 0, 0])
    with pytest.raises(PolicyInputError, match="more than the model's action dim 2"):
        pad_to_dim(np.zeros(3), 2)

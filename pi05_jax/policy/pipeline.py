"""`Policy`: raw robot observation -> robot actions, openpi's pi0.5 inference pipeline around a loaded `Model`.

    adapter.inputs -> normalize state (quantile) -> resize_with_pad 224x224 -> tokenize prompt + discretized state
    -> pad state to action_dim -> uint8 -> [-1, 1] -> model.sample -> unnormalize (quantile) -> adapter.outputs

Thread-safe: transforms run in the caller's thread, model calls are serialized by a lock (one accelerator).
"""

from __future__ import annotations

import dataclasses
import pathlib
import threading
import time
from collections.abc import Mapping

import numpy as np

from pi05_jax.config import IMAGE_RESOLUTION
from pi05_jax.observation import check_noise, observation_from_arrays
from pi05_jax.policy.adapters import RobotAdapter, load_adapter
from pi05_jax.policy.errors import PolicyInputError
from pi05_jax.policy.images import resize_with_pad, to_model_range
from pi05_jax.policy.norm_stats import NormStats, load_norm_stats, normalize_quantile, resolve_norm_stats_path
from pi05_jax.policy.norm_stats import unnormalize_quantile as unnormalize
from pi05_jax.policy.prompt_tokenizer import PromptTokenizer


def pad_to_dim(x: np.ndarray, dim: int) -> np.ndarray:
    """Zero-pad the last axis to `dim` (openpi's PadStatesAndActions); longer vectors are an error."""
    x = np.asarray(x)
    if x.shape[-1] > dim:
        raise PolicyInputError(f"state has {x.shape[-1]} dims, more than the model's action dim {dim}")
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dim - x.shape[-1])])


@dataclasses.dataclass
class Policy:
    model: object  # pi05_jax.runtime.Model
    adapter: RobotAdapter
    norm_stats: dict[str, NormStats]
    tokenizer: PromptTokenizer
    num_steps: int = 10
    seed: int = 0
    norm_stats_path: str = ""

    def __post_init__(self):
        cfg = self.model.config
        self.adapter.check_slots(cfg.image_keys)
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        for key in ("state", "actions"):
            if self.norm_stats[key].dim > cfg.action_dim:
                raise ValueError(f"norm stats {key!r} have {self.norm_stats[key].dim} dims, more than the model's "
                                 f"action dim {cfg.action_dim} ({self.norm_stats_path})")
        if self.adapter.action_dim > cfg.action_dim:
            raise ValueError(f"robot {self.adapter.name!r} wants {self.adapter.action_dim} action dims; the model "
                             f"has {cfg.action_dim}")
        self._lock = threading.Lock()  # one model call at a time
        self._rng_lock = threading.Lock()
        self._rng = np.random.default_rng(self.seed)

    # ---- the input transforms, one observation (no batch axis) ----
    def transform_inputs(self, raw: Mapping[str, object]) -> dict[str, np.ndarray]:
        """Raw observation -> model arrays without the batch axis: images/<slot> float32 [224,224,3] in [-1,1],
        image_masks/<slot> bool, state float32 [action_dim], tokenized_prompt int32 [L], tokenized_prompt_mask."""
        cfg = self.model.config
        data = self.adapter.inputs(raw, cfg.image_keys)
        state = normalize_quantile(data["state"], self.norm_stats["state"], key="state")
        r = IMAGE_RESOLUTION
        images = {slot: resize_with_pad(img, r, r) for slot, img in data["images"].items()}
        tokens, mask = self.tokenizer.tokenize(data["prompt"], state)
        out = {f"images/{slot}": to_model_range(img) for slot, img in images.items()}
        out.update({f"image_masks/{slot}": np.bool_(m) for slot, m in data["image_masks"].items()})
        out["state"] = pad_to_dim(state, cfg.action_dim).astype(np.float32)
        out["tokenized_prompt"] = tokens
        out["tokenized_prompt_mask"] = mask
        return out

    def transform_outputs(self, actions: np.ndarray) -> np.ndarray:
        """Model actions [..., action_dim] (normalized) -> robot actions [..., adapter.action_dim] float32."""
        return self.adapter.outputs(unnormalize(actions, self.norm_stats["actions"])).astype(np.float32)

    # ---- the model ----
    def noise(self) -> np.ndarray:
        cfg = self.model.config
        with self._rng_lock:
            return self._rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)

    def sample(self, model_inputs: Mapping[str, np.ndarray], noise: np.ndarray) -> np.ndarray:
        """Normalized actions [horizon, action_dim] for one observation's model arrays."""
        import jax

        cfg = self.model.config
        batched = {k: np.asarray(v)[None] for k, v in model_inputs.items()}
        obs = observation_from_arrays(batched, cfg, where="policy inputs")
        noise = check_noise(np.asarray(noise)[None], 1, cfg)
        with self._lock:
            actions = self.model.sample(obs, noise=noise, num_steps=self.num_steps)
            actions = np.asarray(jax.block_until_ready(actions))
        return actions[0]

    def infer(self, raw: Mapping[str, object], *, noise: np.ndarray | None = None) -> dict:
        """openpi's Policy.infer: {"actions": float32 [horizon, adapter.action_dim],
        "policy_timing": {"infer_ms", "transform_ms"}}."""
        t0 = time.monotonic()
        model_inputs = self.transform_inputs(raw)
        noise = self.noise() if noise is None else noise
        t1 = time.monotonic()
        normalized = self.sample(model_inputs, noise)
        t2 = time.monotonic()
        actions = self.transform_outputs(normalized)
        t3 = time.monotonic()
        return {"actions": actions,
                "policy_timing": {"infer_ms": (t2 - t1) * 1e3, "transform_ms": ((t1 - t0) + (t3 - t2)) * 1e3}}

    def example_request(self) -> dict:
        """A plausible raw request for this robot (smooth non-zero frames, mid-range state) for warm-up and demos;
        the whole state goes to the first state key, later keys get empty vectors."""
        r = IMAGE_RESOLUTION
        yy, xx = np.meshgrid(np.linspace(0, 1, r), np.linspace(0, 1, r), indexing="ij")
        frame = (np.stack([xx, yy, 0.5 * (xx + yy)], -1) * 255).astype(np.uint8)
        request = {key: frame for _, key in self.adapter.views if key}
        stats = self.norm_stats["state"]
        for i, key in enumerate(self.adapter.state_keys):
            request[key] = (0.5 * (stats.q01 + stats.q99)).astype(np.float32) if i == 0 else np.zeros(0, np.float32)
        request[self.adapter.prompt_key] = self.adapter.default_prompt or "pick up the object"
        return request

    def warmup(self, progress=None) -> float:
        """Compile every executable this robot's requests can need (its valid-view count, every prompt length's
        prefix bucket, this num_steps), then run one request end to end; returns seconds."""
        from pi05_jax.compile_cache import precompile

        t0 = time.perf_counter()
        views = sum(1 for _, key in self.adapter.views if key)
        with self._lock:
            precompile(self.model, batch_sizes=(1,), views=(views,), num_steps=(self.num_steps,), progress=progress)
        actions = self.infer(self.example_request())["actions"]
        if not np.all(np.isfinite(actions)):
            raise RuntimeError("warm-up produced NaN/Inf actions: the checkpoint or the kernels are broken")
        return time.perf_counter() - t0

    @property
    def metadata(self) -> dict:
        """Sent to every client on connect (openpi's policy metadata)."""
        cfg = self.model.config
        return {
            "model": "pi05",
            "engine": "pi05_jax",
            "adapter": self.adapter.name,
            "action_dim": self.adapter.action_dim,
            "action_horizon": cfg.action_horizon,
            "num_steps": self.num_steps,
            "image_keys": [slot for slot, raw in self.adapter.views if raw],
            "request_keys": self.adapter.raw_keys,
        }


def policy_parts(checkpoint: str | pathlib.Path, *, config, adapter: str | RobotAdapter, norm_stats: str | None,
                 tokenizer: str | None) -> dict:
    """Adapter, norm stats and tokenizer checked against a model config (read before loading any weights, so a
    wrong argument fails in a second): the keyword arguments of `Policy` other than the model."""
    adapter = adapter if isinstance(adapter, RobotAdapter) else load_adapter(adapter)
    adapter.check_slots(config.image_keys)
    path = resolve_norm_stats_path(checkpoint, norm_stats)
    return {
        "adapter": adapter,
        "norm_stats": load_norm_stats(path),
        "norm_stats_path": str(path),
        "tokenizer": PromptTokenizer(tokenizer, config.max_token_len, vocab_size=config.vocab_size),
    }


def build_policy(model, *, checkpoint: str | pathlib.Path, adapter: str | RobotAdapter, norm_stats: str | None,
                 tokenizer: str | None, num_steps: int = 10, seed: int = 0) -> Policy:
    """A Policy for a loaded model: adapter by name or JSON path, norm stats by asset id (None: the only one)."""
    parts = policy_parts(checkpoint, config=model.config, adapter=adapter, norm_stats=norm_stats,
                         tokenizer=tokenizer)
    return Policy(model=model, num_steps=num_steps, seed=seed, **parts)

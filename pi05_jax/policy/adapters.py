"""Robot adapters: which raw keys hold the camera frames, the state and the prompt, and how many action dims the
robot takes back. `libero` and `droid` are openpi's `LiberoInputs/Outputs` and `DroidInputs/Outputs` for pi0.5;
any other robot is described by a JSON file (docs/ROBOTS.md), no code needed.

Inputs (openpi's order): frames parsed to uint8 [H, W, 3]; a model slot the robot has no camera for gets a black
frame shaped like the first camera's and mask False; the state is the concatenation of the state keys.
Outputs: the first `action_dim` dims of every action.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping

import numpy as np

from pi05_jax.config import IMAGE_KEYS
from pi05_jax.policy.errors import PolicyInputError
from pi05_jax.policy.images import parse_image


class AdapterError(ValueError):
    """A robot description that cannot work; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class RobotAdapter:
    name: str
    views: tuple[tuple[str, str | None], ...]  # (model camera slot, raw key or None = no such camera), slot order
    state_keys: tuple[str, ...]  # raw keys concatenated, in this order, into the state vector
    action_dim: int  # action dims the robot takes (the model's first action_dim dims)
    prompt_key: str = "prompt"
    default_prompt: str | None = None  # used when a request carries no prompt (openpi's InjectDefaultPrompt)

    def __post_init__(self):
        if not any(raw for _, raw in self.views):
            raise AdapterError(f"robot {self.name!r}: at least one camera view must map to a raw key")
        slots = [slot for slot, _ in self.views]
        if len(set(slots)) != len(slots):
            raise AdapterError(f"robot {self.name!r}: camera slot listed twice in {slots}")
        if not self.state_keys:
            raise AdapterError(f"robot {self.name!r}: 'state' must list at least one raw key")
        if self.action_dim < 1:
            raise AdapterError(f"robot {self.name!r}: action_dim must be >= 1, got {self.action_dim}")

    @property
    def raw_keys(self) -> list[str]:
        """Every raw key a request must carry (the prompt only when there is no default prompt)."""
        keys = [raw for _, raw in self.views if raw] + list(self.state_keys)
        return keys if self.default_prompt is not None else [*keys, self.prompt_key]

    def check_slots(self, model_slots: tuple[str, ...]) -> None:
        unknown = [slot for slot, _ in self.views if slot not in model_slots]
        if unknown:
            raise AdapterError(f"robot {self.name!r}: camera slot {unknown[0]!r} is not one of the model's "
                               f"{list(model_slots)}")

    def inputs(self, raw: Mapping[str, object], model_slots: tuple[str, ...] = IMAGE_KEYS) -> dict:
        """Raw observation -> {"state": float64 [S], "images": {slot: uint8 [H,W,3]}, "image_masks": {slot: bool},
        "prompt": str}, every model slot present."""
        missing = [k for k in self.raw_keys if k not in raw]
        if missing:
            raise PolicyInputError(f"robot {self.name!r}: missing key {missing[0]!r} (a request needs "
                                   f"{self.raw_keys}; got {sorted(raw)})")
        frames = {slot: parse_image(raw[key], key=key) for slot, key in self.views if key}
        first = next(iter(frames.values()))
        images, masks = {}, {}
        for slot in model_slots:
            if slot in frames:
                images[slot], masks[slot] = frames[slot], True
            else:
                images[slot], masks[slot] = np.zeros_like(first), False
        return {"state": self._state(raw), "images": images, "image_masks": masks, "prompt": self._prompt(raw)}

    def outputs(self, actions: np.ndarray) -> np.ndarray:
        return np.asarray(actions)[..., : self.action_dim]

    def _state(self, raw) -> np.ndarray:
        parts = []
        for key in self.state_keys:
            value = np.asarray(raw[key])
            if value.dtype.kind not in "fiub":
                raise PolicyInputError(f"key {key!r} has dtype {value.dtype}, expected a float vector")
            if value.ndim > 1:
                raise PolicyInputError(f"key {key!r} has shape {value.shape}, expected a 1-D vector")
            value = value.reshape(-1).astype(np.float64)
            if not np.all(np.isfinite(value)):
                raise PolicyInputError(f"key {key!r} holds NaN or Inf")
            parts.append(value)
        return np.concatenate(parts)

    def _prompt(self, raw) -> str:
        prompt = raw.get(self.prompt_key)
        if prompt is None:
            if self.default_prompt is None:
                raise PolicyInputError(f"missing key {self.prompt_key!r} (the task instruction)")
            return self.default_prompt
        if isinstance(prompt, np.ndarray) and prompt.ndim == 0 and prompt.dtype.kind in "US":
            prompt = prompt.item()
        if isinstance(prompt, bytes):
            try:
                prompt = prompt.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PolicyInputError(f"key {self.prompt_key!r} is not valid UTF-8") from e
        if not isinstance(prompt, str):
            raise PolicyInputError(f"key {self.prompt_key!r} has type {type(prompt).__name__}, expected a string")
        return prompt


LIBERO = RobotAdapter(
    name="libero",
    views=(("base_0_rgb", "observation/image"), ("left_wrist_0_rgb", "observation/wrist_image"),
           ("right_wrist_0_rgb", None)),
    state_keys=("observation/state",),
    action_dim=7,
)

DROID = RobotAdapter(
    name="droid",
    views=(("base_0_rgb", "observation/exterior_image_1_left"), ("left_wrist_0_rgb", "observation/wrist_image_left"),
           ("right_wrist_0_rgb", None)),
    state_keys=("observation/joint_position", "observation/gripper_position"),
    action_dim=8,
)

BUILTIN = {a.name: a for a in (LIBERO, DROID)}
JSON_FIELDS = {"name", "views", "state", "action_dim", "prompt_key", "default_prompt"}


def adapter_from_json(path: str | pathlib.Path) -> RobotAdapter:
    """A RobotAdapter from a robot description file (format: docs/ROBOTS.md)."""
    path = pathlib.Path(path).expanduser()
    where = str(path)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise AdapterError(f"robot description {where!r} does not exist") from e
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"robot description {where!r} is not readable JSON ({e})") from e
    if not isinstance(body, dict):
        raise AdapterError(f"{where!r}: expected a JSON object")
    unknown = sorted(set(body) - JSON_FIELDS)
    if unknown:
        raise AdapterError(f"{where!r}: unknown field {unknown[0]!r}; fields are {sorted(JSON_FIELDS)}")
    for field in ("views", "state", "action_dim"):
        if field not in body:
            raise AdapterError(f"{where!r}: missing field {field!r}")
    views = body["views"]
    if not isinstance(views, dict) or not all(isinstance(k, str) for k in views):
        raise AdapterError(f"{where!r}: 'views' must be an object {{model slot: raw key or null}}")
    unknown = [slot for slot in views if slot not in IMAGE_KEYS]
    if unknown:
        raise AdapterError(f"{where!r}: 'views' has slot {unknown[0]!r}; pi0.5's slots are {list(IMAGE_KEYS)}")
    for slot, raw in views.items():
        if raw is not None and not isinstance(raw, str):
            raise AdapterError(f"{where!r}: views[{slot!r}] must be a raw key (string) or null")
    state = body["state"]
    if isinstance(state, str):
        state = [state]
    if not isinstance(state, list) or not all(isinstance(s, str) for s in state):
        raise AdapterError(f"{where!r}: 'state' must be a raw key or a list of raw keys")
    action_dim = body["action_dim"]
    if not isinstance(action_dim, int) or isinstance(action_dim, bool):
        raise AdapterError(f"{where!r}: 'action_dim' must be an integer")
    for field in ("prompt_key", "default_prompt"):
        if body.get(field) is not None and not isinstance(body[field], str):
            raise AdapterError(f"{where!r}: {field!r} must be a string")
    try:
        return RobotAdapter(
            name=body.get("name") or path.stem,
            views=tuple((slot, views.get(slot)) for slot in IMAGE_KEYS),
            state_keys=tuple(state),
            action_dim=action_dim,
            prompt_key=body.get("prompt_key") or "prompt",
            default_prompt=body.get("default_prompt"),
        )
    except AdapterError as e:
        raise AdapterError(f"{where!r}: {e}") from e


def load_adapter(name_or_path: str) -> RobotAdapter:
    """A built-in adapter by name (libero, droid) or a robot description JSON file."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    if name_or_path.endswith(".json") or pathlib.Path(name_or_path).expanduser().is_file():
        return adapter_from_json(name_or_path)
    raise AdapterError(f"unknown adapter {name_or_path!r}: use one of {sorted(BUILTIN)} or a robot description "
                       f"JSON file (see docs/ROBOTS.md)")

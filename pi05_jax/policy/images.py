"""Camera frames as openpi's pi0.5 policy prepares them.

1. `parse_image`: float frames in [0, 1] become uint8 by `(255 * x).astype(uint8)`; channel-first [3, H, W]
   becomes [H, W, 3] (openpi's adapters do both).
2. `resize_with_pad`: keep the aspect ratio, resize with PIL bilinear so the longer side fits, paste centered on
   black (tf.image.resize_with_pad semantics, as openpi_client.image_tools computes them, including its integer
   truncation of the resized size and padding offsets). Frames already at the target size are left untouched.
3. `to_model_range`: uint8 [0, 255] -> float32 [-1, 1] as x / 255 * 2 - 1.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pi05_jax.policy.errors import PolicyInputError

MAX_SIDE = 8192  # a frame larger than this is a bug on the robot side, not a camera


def parse_image(image, *, key: str) -> np.ndarray:
    """A [H, W, 3] uint8 frame from what a robot sends (uint8 or float in [0, 1], HWC or CHW)."""
    img = np.asarray(image)
    if img.ndim != 3:
        raise PolicyInputError(f"key {key!r} has shape {img.shape}, expected one frame [H, W, 3] (or [3, H, W])")
    if img.dtype.kind == "f":
        if not np.all(np.isfinite(img)):
            raise PolicyInputError(f"key {key!r} holds NaN or Inf")
        if img.size and (img.min() < 0.0 or img.max() > 1.0):
            raise PolicyInputError(f"key {key!r} is a float image with values in [{img.min():g}, {img.max():g}]; "
                                   f"float frames must be in [0, 1] (or send uint8)")
        img = (255 * img).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise PolicyInputError(f"key {key!r} has dtype {img.dtype}, expected uint8 (or float in [0, 1])")
    if img.shape[0] == 3:
        img = np.transpose(img, (1, 2, 0))
    if img.shape[-1] != 3:
        raise PolicyInputError(f"key {key!r} has shape {np.asarray(image).shape}, expected 3 color channels "
                               f"[H, W, 3] or [3, H, W]")
    if min(img.shape[:2]) < 1 or max(img.shape[:2]) > MAX_SIDE:
        raise PolicyInputError(f"key {key!r} has frame size {img.shape[:2]}, expected sides in 1..{MAX_SIDE}")
    return np.ascontiguousarray(img)


def fitted_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, top, left) of the aspect-preserving fit; float math and int() truncation exactly as
    openpi_client does it, so odd sizes land on the same pixel."""
    ratio = max(width / target_w, height / target_h)
    new_h, new_w = int(height / ratio), int(width / ratio)
    top = max(0, int((target_h - new_h) / 2))
    left = max(0, int((target_w - new_w) / 2))
    return new_h, new_w, top, left


def _resize_one(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    new_h, new_w, top, left = fitted_size(h, w, height, width)
    resized = np.asarray(Image.fromarray(frame).resize((new_w, new_h), resample=Image.BILINEAR))
    out = np.zeros((height, width, *frame.shape[2:]), dtype=frame.dtype)
    # PIL's paste clips what falls outside the canvas; so does this slice.
    rows, cols = min(new_h, height - top), min(new_w, width - left)
    out[top:top + rows, left:left + cols] = resized[:rows, :cols]
    return out


def resize_with_pad(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 frames [..., H, W, C] to [..., height, width, C] keeping the aspect ratio, zero padding."""
    images = np.asarray(images)
    if images.shape[-3:-1] == (height, width):
        return images
    if images.dtype != np.uint8:
        raise ValueError(f"resize_with_pad takes uint8 frames, got {images.dtype}")
    flat = images.reshape(-1, *images.shape[-3:])
    out = np.stack([_resize_one(f, height, width) for f in flat])
    return out.reshape(*images.shape[:-3], *out.shape[-3:])


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"to_model_range takes uint8 frames, got {images.dtype}")
    return images.astype(np.float32) / 255.0 * 2.0 - 1.0

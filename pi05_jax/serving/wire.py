"""msgpack-numpy frames in openpi_client's format, written for a server that must not trust its input.

An array travels as the map {b"__ndarray__": True, b"data": raw bytes, b"dtype": numpy dtype str, b"shape": [...]}
and a numpy scalar as {b"__npgeneric__": True, b"data": python value, b"dtype": str}; everything else is plain
msgpack. Decoding accepts only bool, int, uint, float and str dtypes, checks the byte count against the shape,
and returns writable copies, so a hostile frame yields `FrameError` instead of an object array or a crash.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np

ALLOWED_KINDS = "biuf"  # bool, signed, unsigned, float; str ("U") is allowed on top, for prompts
MAX_NDIM = 8


class FrameError(ValueError):
    """A frame that is not valid msgpack-numpy; the message says what is wrong."""


def _encode(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in ALLOWED_KINDS + "U":
            raise TypeError(f"cannot send an array of dtype {obj.dtype}")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in ALLOWED_KINDS + "U":
            raise TypeError(f"cannot send a scalar of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send an object of type {type(obj).__name__}")


def pack(obj) -> bytes:
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def _dtype(raw) -> np.dtype:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str):
        raise FrameError(f"array dtype must be a string, got {type(raw).__name__}")
    try:
        dtype = np.dtype(raw)
    except Exception as e:  # numpy raises TypeError, ValueError or SyntaxError for junk
        raise FrameError(f"unknown array dtype {raw!r}") from e
    if dtype.kind not in ALLOWED_KINDS + "U" or dtype.hasobject or dtype.itemsize == 0:
        raise FrameError(f"array dtype {raw!r} is not allowed (use bool, int, uint, float or str)")
    return dtype


def _decode(obj: dict):
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        shape = obj.get(b"shape")
        data = obj.get(b"data")
        if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise FrameError(f"array shape {shape!r} is not a list of non-negative integers (at most {MAX_NDIM})")
        if not isinstance(data, bytes):
            raise FrameError("array data must be bytes")
        expected = math.prod(shape) * dtype.itemsize  # python ints: no overflow
        if len(data) != expected:
            raise FrameError(f"array of shape {tuple(shape)} and dtype {dtype.str} needs {expected} bytes, "
                             f"the frame has {len(data)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if b"__npgeneric__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        try:
            return dtype.type(obj.get(b"data"))
        except (TypeError, ValueError, OverflowError) as e:
            raise FrameError(f"scalar of dtype {dtype.str} cannot hold {obj.get(b'data')!r}") from e
    return obj


def unpack(frame: bytes):
    """Decode one frame; any malformation raises FrameError."""
    try:
        return msgpack.unpackb(frame, object_hook=_decode, raw=False, strict_map_key=False)
    except FrameError:
        raise
    except Exception as e:  # msgpack raises ValueError, TypeError, UnpackException subclasses, RecursionError
        raise FrameError(f"not a msgpack frame ({type(e).__name__}: {e})") from e


def flatten(tree: dict, *, prefix: str = "") -> dict:
    """Nested request maps -> flat '/'-joined keys (openpi's flatten_dict), so {"observation": {"image": x}} and
    {"observation/image": x} mean the same; keys must be strings."""
    flat = {}
    for key, value in tree.items():
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        if not isinstance(key, str):
            raise FrameError(f"request keys must be strings, got {key!r}")
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}/"))
        else:
            flat[name] = value
    return flat

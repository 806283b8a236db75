"""msgpack with numpy arrays, in the wire format of openpi's `openpi_client.msgpack_numpy`.

An array travels as the map {b"__ndarray__": True, b"data": raw bytes (C order), b"dtype": `dtype.str`
(e.g. "<f4", "|u1"), b"shape": [dims]}, a numpy scalar as {b"__npgeneric__": True, b"data": the Python value,
b"dtype": `dtype.str`}. The marker keys are msgpack bin (bytes), the other strings msgpack str. Object,
structured (void) and complex dtypes are refused both ways: only plain numbers, booleans and strings travel.
Decoded arrays are writable copies that own their memory.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

ARRAY_MARKER = b"__ndarray__"
SCALAR_MARKER = b"__npgeneric__"
# Kinds that have no portable byte layout (Python objects, records) or that openpi refuses (complex).
_REFUSED_KINDS = frozenset("OVc")


class DecodeError(ValueError):
    """The bytes are not a msgpack message, or an encoded array in it is inconsistent."""


def _encode(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in _REFUSED_KINDS:
        raise TypeError(f"cannot encode numpy dtype {value.dtype} (object, structured or complex)")
    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value)
        return {
            ARRAY_MARKER: True,
            b"data": value.tobytes(),
            b"dtype": value.dtype.str,
            b"shape": list(value.shape),
        }
    if isinstance(value, np.generic):
        return {SCALAR_MARKER: True, b"data": value.item(), b"dtype": value.dtype.str}
    raise TypeError(f"cannot encode {type(value).__name__} with msgpack")


def _dtype(text: Any) -> np.dtype:
    if not isinstance(text, str):
        raise DecodeError(f"encoded array dtype must be a string like '<f4', got {text!r}")
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError) as error:
        raise DecodeError(f"encoded array has an unknown dtype {text!r}: {error}") from None
    if dtype.kind in _REFUSED_KINDS:
        raise DecodeError(f"encoded array dtype {text!r} is not allowed (object, structured or complex)")
    return dtype


def _decode(obj: dict) -> Any:
    if ARRAY_MARKER in obj:
        dtype = _dtype(obj.get(b"dtype"))
        data, shape = obj.get(b"data"), obj.get(b"shape")
        if not isinstance(data, bytes):
            raise DecodeError("encoded array data must be msgpack bin")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise DecodeError(f"encoded array shape must be a list of non-negative ints, got {shape!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if len(data) != expected:
            raise DecodeError(
                f"encoded array of shape {shape}, dtype {dtype.str} needs {expected} bytes, got {len(data)}"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if SCALAR_MARKER in obj:
        return _dtype(obj.get(b"dtype")).type(obj.get(b"data"))
    return obj


def packb(value: Any) -> bytes:
    """msgpack bytes of `value` (dicts, lists, str, bytes, numbers, numpy arrays and scalars)."""
    return msgpack.packb(value, default=_encode, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """The value of msgpack bytes written by `packb` or by openpi's client; raises `DecodeError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected a binary msgpack message, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False)
    except DecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise DecodeError(f"not a valid msgpack message ({type(error).__name__}: {error})") from None

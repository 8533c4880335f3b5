"""The weights fingerprint: a sha256 over an ONNX file's initializers, recomputable by anyone.

The fingerprint a streamrnn spec carries is computed from the initializers stored in
the ONNX graph itself (not from the training framework's tensors), so any tool can
recompute it from the file, and :func:`streamrnn.load` does so and refuses a file whose
weights no longer match its spec. The definition, for each initializer in order of name::

    sha256.update(f"{name}\\0{data_type}\\0{','.join(map(str, dims))}\\0".encode())
    sha256.update(values as little-endian bytes, row-major)   # ONNX raw_data layout

With the ``onnx`` package: ``numpy_helper.to_array(t).astype(t.dtype.newbyteorder('<')).tobytes()``
gives the value bytes of initializer ``t``.

The file is read with a small protobuf wire-format reader (no ``onnx`` dependency at
run time); it also yields each initializer's shape for the spec-vs-graph check.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import ModelLoadError

# ONNX TensorProto.DataType -> numpy dtype, for values stored in typed (not raw) fields.
_TYPED_FIELD = {1: (4, "<f4", "fixed32"), 6: (5, "<i4", "varint"), 7: (7, "<i8", "varint"),
                11: (10, "<f8", "fixed64")}


@dataclass(frozen=True)
class Initializer:
    """One graph initializer: ONNX ``data_type`` code, ``dims``, values as little-endian bytes."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    data: bytes


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _Malformed("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: memoryview):
    """Yield ``(field_number, wire_type, value)``; value is an int or a memoryview slice."""
    i, n = 0, len(buf)
    while i < n:
        tag, i = _varint(buf, i)
        field, wt = tag >> 3, tag & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            size, i = _varint(buf, i)
            v, i = buf[i:i + size], i + size
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise _Malformed(f"wire type {wt}")
        if i > n:
            raise _Malformed("truncated field")
        yield field, wt, v


def _ints(wt: int, v) -> list[int]:
    if wt == 0:
        return [v]
    out, i = [], 0
    while i < len(v):
        x, i = _varint(v, i)
        out.append(x)
    return out


def _tensor(buf: memoryview) -> Initializer:
    name, dtype, dims, raw = "", 0, [], None
    typed: dict[int, list] = {}
    for f, wt, v in _fields(buf):
        if f == 1:
            dims += _ints(wt, v)
        elif f == 2:
            dtype = v
        elif f == 8:
            name = bytes(v).decode("utf-8")
        elif f == 9:
            raw = bytes(v)
        elif f == 14 and v == 1:
            raise _Malformed(f"initializer {name!r} keeps its data in an external file")
        elif f in (4, 5, 7, 10):
            typed.setdefault(f, []).append((wt, v))
    if raw is None:
        spec = _TYPED_FIELD.get(dtype)
        if spec is None:
            raise _Malformed(f"initializer {name!r}: data type {dtype} without raw_data")
        field, np_dtype, enc = spec
        parts = typed.get(field, [])
        if enc == "varint":
            vals = [x for wt, v in parts for x in _ints(wt, v)]
            arr = np.array([x - (1 << 64) if x >= 1 << 63 else x for x in vals], np.int64).astype(np_dtype)
        else:
            arr = np.frombuffer(b"".join(bytes(v) for _, v in parts), np_dtype)
        raw = arr.tobytes()
    if int(np.prod(dims, dtype=np.int64)) and raw and len(raw) % int(np.prod(dims, dtype=np.int64)):
        raise _Malformed(f"initializer {name!r}: {len(raw)} bytes do not fit dims {dims}")
    return Initializer(name, int(dtype), tuple(int(d) for d in dims), raw)


def read_initializers(blob: bytes, *, source: str = "model") -> dict[str, Initializer]:
    """The initializers of a serialized ONNX model, by name (ModelLoadError if unreadable)."""
    try:
        graph = None
        for f, wt, v in _fields(memoryview(blob)):
            if f == 7 and wt == 2:
                graph = v
        if graph is None:
            raise _Malformed("no graph")
        out: dict[str, Initializer] = {}
        for f, wt, v in _fields(graph):
            if f == 5 and wt == 2:
                t = _tensor(v)
                if t.name in out:
                    raise _Malformed(f"initializer {t.name!r} appears twice")
                out[t.name] = t
            elif f == 15:
                raise _Malformed("sparse initializers are not supported")
        return out
    except (_Malformed, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{source}: expected a valid ONNX model, got an unreadable one: {e}") from e


def fingerprint(initializers: dict[str, Initializer]) -> str:
    """sha256 over the initializers in name order (see the module docstring)."""
    h = hashlib.sha256()
    for name in sorted(initializers):
        t = initializers[name]
        h.update(f"{name}\0{t.data_type}\0{','.join(map(str, t.dims))}\0".encode())
        h.update(t.data)
    return h.hexdigest()

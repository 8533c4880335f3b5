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
run time); it also yields each initializer's shape for the spec-vs-graph check, and the
graph's nodes, inputs and outputs (:func:`read_graph`), from which :mod:`streamrnn.model.loaded`
checks the wiring the spec claims and computes the model fingerprint.

The **model fingerprint** (what ``load(path).spec.fingerprint`` is) covers what a model
computes and how its inputs and outputs read: the weights sha256 above, the graph's
structure and the spec's contract. It is the sha256 of the UTF-8 bytes of::

    json.dumps({"definition": "streamrnn-model/1", "weights": WEIGHTS_SHA256,
                "graph": {"opsets": [[domain, version], ...],                  # sorted
                          "inputs": [[name, elem_type, dims], ...],            # graph order
                          "outputs": [[name, elem_type, dims], ...],
                          "nodes": [[domain, op_type, inputs, outputs, {attr: value}], ...]},
                "spec": ModelSpec.contract()},
               sort_keys=True, separators=(",", ":"))

``dims`` holds an int (``dim_value``), a string (``dim_param``) or null per axis. Node names
and doc strings are left out (they change nothing); an attribute's value is its float, int,
list of floats or ints, its bytes as hex (``s``, and ``strings`` as a list of hex), or the
sha256 of the serialized sub-message (tensors, graphs). With the ``onnx`` package,
``helper.get_attribute_value`` gives the same values.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ModelLoadError

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


def _blob(v) -> bytes:
    """A length-delimited field's bytes (``bytes(int)`` of a corrupted varint would allocate that many)."""
    if not isinstance(v, memoryview):
        raise _Malformed(f"expected a length-delimited field, got a number {v}")
    return bytes(v)


def _str(v) -> str:
    return _blob(v).decode("utf-8")


def _num(v) -> int:
    if not isinstance(v, int):
        raise _Malformed("expected a varint field, got bytes")
    return v


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
            dtype = _num(v)
        elif f == 8:
            name = _str(v)
        elif f == 9:
            raw = _blob(v)
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
            arr = np.frombuffer(b"".join(_blob(v) for _, v in parts), np_dtype)
        raw = arr.tobytes()
    if int(np.prod(dims, dtype=np.int64)) and raw and len(raw) % int(np.prod(dims, dtype=np.int64)):
        raise _Malformed(f"initializer {name!r}: {len(raw)} bytes do not fit dims {dims}")
    return Initializer(name, int(dtype), tuple(int(d) for d in dims), raw)


def read_initializers(blob: bytes, *, source: str = "model") -> dict[str, Initializer]:
    """The initializers of a serialized ONNX model, by name (ModelLoadError if unreadable)."""
    return read_graph(blob, source=source).initializers


@dataclass(frozen=True)
class Node:
    """One graph node: ``op_type``, ``domain``, input and output value names, attributes (canonical values)."""

    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Graph:
    """What :func:`read_graph` reads from a serialized ONNX model."""

    initializers: dict[str, Initializer]
    nodes: tuple[Node, ...]
    inputs: tuple[tuple[str, int, tuple], ...]   # (name, elem_type, dims)
    outputs: tuple[tuple[str, int, tuple], ...]
    opsets: tuple[tuple[str, int], ...]

    def structure(self) -> dict[str, Any]:
        """The graph part of the model fingerprint (see the module docstring)."""
        return {"opsets": sorted([d, v] for d, v in self.opsets),
                "inputs": [[n, t, list(d)] for n, t, d in self.inputs],
                "outputs": [[n, t, list(d)] for n, t, d in self.outputs],
                "nodes": [[n.domain, n.op_type, list(n.inputs), list(n.outputs), n.attrs] for n in self.nodes]}


def _sha(v) -> str:
    return hashlib.sha256(_blob(v)).hexdigest()


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _floats(v) -> list[float]:
    """float32 values of a fixed32 field (one value, or a packed run)."""
    return [float(f) for f in np.frombuffer(_blob(v), "<f4")]


def _attribute(buf: memoryview) -> tuple[str, Any]:
    name, single, many = "", None, {}
    for f, wt, v in _fields(buf):
        if f == 1:
            name = _str(v)
        elif f == 2:
            single = _floats(v)[0]
        elif f == 3:
            single = _signed(_num(v))
        elif f == 4:
            single = _blob(v).hex()
        elif f in (5, 6, 22):  # t, g, sparse_tensor
            single = _sha(v)
        elif f == 7:
            many.setdefault(f, []).extend(_floats(v))
        elif f == 8:
            many.setdefault(f, []).extend(_signed(x) for x in _ints(wt, v))
        elif f == 9:
            many.setdefault(f, []).append(_blob(v).hex())
        elif f in (10, 11, 23):  # tensors, graphs, sparse_tensors
            many.setdefault(f, []).append(_sha(v))
    if single is None and len(many) == 1:
        single = next(iter(many.values()))
    return name, [] if single is None else single


def _node(buf: memoryview) -> Node:
    ins, outs, op, domain, attrs = [], [], "", "", {}
    for f, _, v in _fields(buf):
        if f == 1:
            ins.append(_str(v))
        elif f == 2:
            outs.append(_str(v))
        elif f == 4:
            op = _str(v)
        elif f == 7:
            domain = _str(v)
        elif f == 5:
            k, val = _attribute(v)
            attrs[k] = val
    return Node(op, domain, tuple(ins), tuple(outs), attrs)


def _dims(shape: memoryview) -> list:
    out: list = []
    for _, _, dim in _fields(shape):
        d: Any = None
        for df, _, dv in _fields(dim):
            if df == 1:
                d = _signed(_num(dv))
            elif df == 2:
                d = _str(dv)
        out.append(d)
    return out


def _value_info(buf: memoryview) -> tuple[str, int, tuple]:
    """``(name, elem_type, dims)``; a value that is not a tensor has elem_type -1 and its type's digest as dims."""
    name, elem, dims = "", 0, []
    for f, _, v in _fields(buf):
        if f == 1:
            name = _str(v)
        elif f == 2:
            for tf, _, tv in _fields(v):
                if tf != 1:
                    elem, dims = -1, [_sha(v)]
                    break
                for ef, _, ev in _fields(tv):
                    if ef == 1:
                        elem = _num(ev)
                    elif ef == 2:
                        dims = _dims(ev)
    return name, int(elem), tuple(dims)


def _model_graph(blob: bytes) -> tuple[memoryview, list[tuple[str, int]]]:
    graph, opsets = None, []
    for f, wt, v in _fields(memoryview(blob)):
        if f == 7 and wt == 2:
            graph = v
        elif f == 8 and wt == 2:
            domain, version = "", 0
            for of, _, ov in _fields(v):
                if of == 1:
                    domain = _str(ov)
                elif of == 2:
                    version = _num(ov)
            opsets.append((domain, int(version)))
    if graph is None:
        raise _Malformed("no graph")
    return graph, opsets


def read_graph(blob: bytes, *, source: str = "model") -> Graph:
    """The initializers, nodes, inputs, outputs and opsets of a serialized ONNX model (ModelLoadError if unreadable)."""
    try:
        graph, opsets = _model_graph(blob)
        inits: dict[str, Initializer] = {}
        nodes, inputs, outputs = [], [], []
        for f, wt, v in _fields(graph):
            if f == 5 and wt == 2:
                t = _tensor(v)
                if t.name in inits:
                    raise _Malformed(f"initializer {t.name!r} appears twice")
                inits[t.name] = t
            elif f == 15:
                raise _Malformed("sparse initializers are not supported")
            elif f == 1 and wt == 2:
                nodes.append(_node(v))
            elif f == 11 and wt == 2:
                inputs.append(_value_info(v))
            elif f == 12 and wt == 2:
                outputs.append(_value_info(v))
        return Graph(inits, tuple(nodes), tuple(inputs), tuple(outputs), tuple(opsets))
    except (_Malformed, UnicodeDecodeError, ValueError, TypeError, IndexError) as e:
        raise ModelLoadError(f"{source}: expected a valid ONNX model, got an unreadable one: {e}") from e


def model_fingerprint(weights_sha256: str, graph: Graph, contract: dict[str, Any]) -> str:
    """The model fingerprint: weights, graph structure and the spec's contract (see the module docstring)."""
    doc = {"definition": "streamrnn-model/1", "weights": weights_sha256, "graph": graph.structure(),
           "spec": contract}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(initializers: dict[str, Initializer]) -> str:
    """sha256 over the initializers in name order (see the module docstring)."""
    h = hashlib.sha256()
    for name in sorted(initializers):
        t = initializers[name]
        h.update(f"{name}\0{t.data_type}\0{','.join(map(str, t.dims))}\0".encode())
        h.update(t.data)
    return h.hexdigest()

"""A lazy GGUF reader: the header (metadata and tensor table) parsed in one pass, tensor data left in
the memory map until asked for.

``gguf.GGUFReader`` builds a numpy view per array element while it opens a file, which takes 10-20 s
for the 262,144-token vocabulary of Gemma 3 on our 2-core machines. Here numeric arrays are one
``np.frombuffer`` each and strings are decoded in a plain loop; nothing is converted until a field's
``contents()`` is called. The objects mimic the parts of ``GGUFReader`` this package uses
(``fields[key].contents()``, ``len(fields[key].data)``, ``tensors[i].name / tensor_type / data``),
so either reader can be passed to the functions of ``hcnr_jax.conversion.gguf``.

Format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian: magic ``GGUF``,
version (2 or 3), tensor count, metadata count; metadata ``(key, type, value)``; tensor infos
``(name, n_dims, dims[ne0 first], type, offset)``; padding to ``general.alignment`` (default 32);
tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hcnr_jax.errors import CheckpointError

# GGUF value type -> numpy dtype (the fixed-size ones); 7 bool, 8 string, 9 array.
_NUMERIC = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
            7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class Field:
    """One metadata value: a scalar, a string, a numeric array (numpy) or a list of strings."""

    name: str
    value: Any

    @property
    def data(self) -> Any:
        """Something with the value's length (the element count of an array), as GGUFReader's."""
        return self.value if isinstance(self.value, (list, np.ndarray)) else [self.value]

    def contents(self) -> Any:
        if isinstance(self.value, np.ndarray):
            return self.value.tolist()
        return self.value


@dataclass
class TensorInfo:
    """A tensor's header entry; ``data`` is its raw bytes as ``[rows, row_bytes]`` uint8, a view into
    the file's memory map (what ``gguf.quants.dequantize`` takes for every type)."""

    name: str
    dims: tuple[int, ...]  # GGUF order: ne0 (the contiguous one) first
    tensor_type: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute position in the file
    nbytes: int
    _buffer: Any

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy shape (reversed dims), the layout HF uses (``[out, in]`` for a linear)."""
        return tuple(reversed(self.dims))

    @property
    def data(self) -> np.ndarray:
        rows = int(np.prod(self.dims[1:], dtype=np.int64)) if len(self.dims) > 1 else 1
        raw = np.frombuffer(self._buffer, np.uint8, count=self.nbytes, offset=self.offset)
        return raw.reshape(rows, self.nbytes // rows)


class _Cursor:
    def __init__(self, buf: Any, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return out[0] if len(out) == 1 else out

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.buf[self.pos:self.pos + n]
        if len(raw) != n:
            raise struct.error("string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8")

    def array(self, kind: int, count: int) -> Any:
        if kind == _STRING:
            return [self.string() for _ in range(count)]
        if kind in _NUMERIC:
            dtype = np.dtype(_NUMERIC[kind]).newbyteorder("<")
            out = np.frombuffer(self.buf, dtype, count=count, offset=self.pos)
            self.pos += out.nbytes
            return out
        if kind == _ARRAY:  # arrays of arrays: no tokenizer or config field we read uses them
            return [self.value(_ARRAY) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {kind}")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            elem, count = self.unpack("<IQ")
            return self.array(elem, count)
        if kind not in _NUMERIC:
            raise ValueError(f"unknown GGUF value type {kind}")
        v = self.unpack("<" + np.dtype(_NUMERIC[kind]).char)
        return bool(v) if kind == 7 else v


class GGUFFile:
    """``GGUFFile(path)``: ``fields`` (key -> `Field`), ``tensors`` (list of `TensorInfo`)."""

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # an empty file cannot be mapped
                raise CheckpointError(f"{self.path}: cannot read GGUF file (empty file: {e})") from e
        cur = _Cursor(self._map, self.path)
        try:
            if bytes(self._map[:4]) != b"GGUF":
                raise ValueError(f"not a GGUF file (magic {bytes(self._map[:4])!r})")
            cur.pos = 4
            version, n_tensors, n_kv = cur.unpack("<IQQ")
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version} (big-endian or too old)")
            self.fields: dict[str, Field] = {}
            for _ in range(n_kv):
                key = cur.string()
                self.fields[key] = Field(key, cur.value(cur.unpack("<I")))
            infos = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.unpack("<I")
                dims = tuple(int(d) for d in struct.unpack_from(f"<{n_dims}Q", self._map, cur.pos))
                cur.pos += 8 * n_dims
                kind, offset = cur.unpack("<IQ")
                infos.append((name, dims, kind, offset))
        except (struct.error, ValueError, UnicodeDecodeError, IndexError) as e:
            raise CheckpointError(f"{self.path}: cannot read GGUF file header at byte {cur.pos} "
                                  f"({type(e).__name__}: {e})") from e
        align = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        start = -(-cur.pos // align) * align
        self.tensors: list[TensorInfo] = []
        for name, dims, kind, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(kind)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{self.path}: tensor {name} has unknown GGML type {kind}") from e
            n = int(np.prod(dims, dtype=np.int64))
            if dims[0] % block:
                raise CheckpointError(f"{self.path}: tensor {name}: {dims[0]} columns are not a multiple of "
                                      f"the {qtype.name} block ({block})")
            info = TensorInfo(name, dims, qtype, start + offset, n // block * type_size, self._map)
            if info.offset + info.nbytes > len(self._map):
                raise CheckpointError(f"{self.path}: tensor {name} ends at byte {info.offset + info.nbytes}, past "
                                      f"the end of the file ({len(self._map)} bytes): truncated file")
            self.tensors.append(info)

"""A GGUF file's metadata and tensors, read in one pass over the memory map.

gguf-py's `GGUFReader` builds a numpy view for every part of every metadata value: a
49,152-token vocabulary and its 48,900 merges become ~500,000 memmap slices, 4 s of CPU on a
2.25 GHz core, paid by every instance (and the front end's tokenizer) at every start and
reload. This reader decodes the same format (GGUF v2 and v3, either byte order) with
`struct` over the mapped bytes, and gives what the loaders need:

- `fields`: key -> value, decoded as gguf-py's `ReaderField.contents()` decodes it (ints,
  floats and bools as Python scalars, strings as str, arrays as lists; an array of arrays as
  nested lists, which gguf-py flattens; a value string that is not UTF-8 keeps its bytes as
  surrogates, where gguf-py raises when it is read);
- `tensors`: name, GGML type, dims (GGUF order, innermost first), element and byte counts,
  absolute data offset, and `data`: a read-only view of the map, typed and shaped as gguf-py's
  (float16/32/64 and int8-64 as elements, row-major; every block type as bytes per row).

The file is checked as it is read (magic, version, every length and offset inside the file,
arrays nested at most 8 deep, tensor data inside the file and aligned, no duplicate key or
tensor), so a truncated or hostile file fails with a ValueError naming what is wrong, before
anything reads past its end.
`tests/test_gguf_file.py` checks it against gguf-py on the default model and on written files.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# value type -> (struct code, numpy dtype) of the scalar types
_SCALARS: dict[int, tuple[str, str]] = {
    GGUFValueType.UINT8: ("B", "u1"), GGUFValueType.INT8: ("b", "i1"),
    GGUFValueType.UINT16: ("H", "u2"), GGUFValueType.INT16: ("h", "i2"),
    GGUFValueType.UINT32: ("I", "u4"), GGUFValueType.INT32: ("i", "i4"),
    GGUFValueType.FLOAT32: ("f", "f4"), GGUFValueType.UINT64: ("Q", "u8"),
    GGUFValueType.INT64: ("q", "i8"), GGUFValueType.FLOAT64: ("d", "f8"),
    GGUFValueType.BOOL: ("?", "?"),
}
# tensor types stored as elements (gguf-py's reader); every other type is bytes per row
_ELEMENTS = {GGMLQuantizationType.F16: "f2", GGMLQuantizationType.F32: "f4",
             GGMLQuantizationType.F64: "f8", GGMLQuantizationType.I8: "i1",
             GGMLQuantizationType.I16: "i2", GGMLQuantizationType.I32: "i4",
             GGMLQuantizationType.I64: "i8"}
_MAX_DIMS = 8
_MAX_NESTING = 8                    # arrays of arrays: deeper is a damaged (or hostile) file


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray               # dims, GGUF order (innermost first), uint64
    n_elements: int
    n_bytes: int
    data_offset: int                # from the start of the file
    data: np.ndarray                # read-only view of the memory map


class GGUFFile:
    """`GGUFFile(path)`: `.version`, `.fields`, `.tensors`, `.alignment`, `.data_offset`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._map = np.memmap(self.path, mode="r")
        self._buf = memoryview(self._map)
        self._size = len(self._buf)
        self._pos = 0
        if self._take(4) != MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (bad magic)")
        self._order = "<"
        version = self._scalar("I")
        if version & 0xFFFF == 0:                   # written on a host of the other byte order
            self._order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in VERSIONS:
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (only {VERSIONS})")
        self.version = version
        n_tensors, n_fields = self._scalar("Q"), self._scalar("Q")
        self.fields: dict[str, Any] = {}
        self.field_types: dict[str, GGUFValueType] = {}
        for _ in range(n_fields):
            key = self._string()
            if key in self.fields:
                raise ValueError(f"{self.path}: duplicate metadata key {key!r}")
            kind = self._value_type()
            self.field_types[key] = kind
            self.fields[key] = self._value(kind)
        infos = [self._tensor_info() for _ in range(n_tensors)]
        self.alignment = self._alignment()
        self.data_offset = -(-self._pos // self.alignment) * self.alignment
        self.tensors = self._tensors(infos)

    # --------------------------------------------------------------- primitives

    def _take(self, n: int) -> memoryview:
        end = self._pos + n
        if n < 0 or end > self._size:
            raise ValueError(f"{self.path}: truncated (needs {n} bytes at offset {self._pos} of {self._size})")
        out = self._buf[self._pos:end]
        self._pos = end
        return out

    def _scalar(self, code: str) -> Any:
        fmt = self._order + code
        size = struct.calcsize(fmt)
        if self._pos + size > self._size:
            raise ValueError(f"{self.path}: truncated at offset {self._pos}")
        value = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += size
        return value

    def _string(self, errors: str = "strict") -> str:
        """Keys and tensor names must be UTF-8; a value that is not keeps its bytes as
        surrogates (`errors="surrogateescape"`), so a field no loader reads cannot fail a load."""
        raw = self._take(self._scalar("Q"))
        try:
            return str(raw, "utf-8", errors)
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: a string before offset {self._pos} is not UTF-8") from e

    def _value_type(self) -> GGUFValueType:
        raw = self._scalar("I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise ValueError(f"{self.path}: unknown value type {raw} before offset {self._pos}") from None

    def _value(self, kind: GGUFValueType, depth: int = 0) -> Any:
        if kind == GGUFValueType.STRING:
            return self._string("surrogateescape")
        if kind in _SCALARS:
            return self._scalar(_SCALARS[kind][0])
        if kind == GGUFValueType.ARRAY:
            item = self._value_type()
            count = self._scalar("Q")
            if item in _SCALARS:                    # one numpy read for the whole array
                dtype = np.dtype(_SCALARS[item][1]).newbyteorder(self._order)
                raw = self._take(count * dtype.itemsize)
                return np.frombuffer(raw, dtype, count).tolist()
            if count > self._size - self._pos:      # every element takes at least a byte
                raise ValueError(f"{self.path}: array of {count} at offset {self._pos} exceeds the file")
            if item == GGUFValueType.STRING:
                return [self._string("surrogateescape") for _ in range(count)]
            if depth >= _MAX_NESTING:
                raise ValueError(f"{self.path}: arrays nested deeper than {_MAX_NESTING} at offset {self._pos}")
            return [self._value(item, depth + 1) for _ in range(count)]
        raise ValueError(f"{self.path}: unhandled value type {kind!r}")

    # --------------------------------------------------------------- tensors

    def _tensor_info(self) -> tuple[str, list[int], GGMLQuantizationType, int]:
        name = self._string()
        n_dims = self._scalar("I")
        if not 0 <= n_dims <= _MAX_DIMS:
            raise ValueError(f"{self.path}: tensor {name!r} has {n_dims} dims")
        dims = [self._scalar("Q") for _ in range(n_dims)]
        raw = self._scalar("I")
        try:
            kind = GGMLQuantizationType(raw)
        except ValueError:
            raise ValueError(f"{self.path}: tensor {name!r} has unknown type {raw}") from None
        return name, dims, kind, self._scalar("Q")

    def _alignment(self) -> int:
        if "general.alignment" not in self.fields:
            return DEFAULT_ALIGNMENT
        align = self.fields["general.alignment"]
        if self.field_types["general.alignment"] != GGUFValueType.UINT32 or align <= 0 or align & (align - 1):
            raise ValueError(f"{self.path}: general.alignment must be a power of two (uint32), got {align!r}")
        return align

    def _tensors(self, infos: list[tuple[str, list[int], GGMLQuantizationType, int]]) -> list[GGUFTensor]:
        out: list[GGUFTensor] = []
        seen: set[str] = set()
        for name, dims, kind, rel in infos:
            if name in seen:
                raise ValueError(f"{self.path}: duplicate tensor {name!r}")
            seen.add(name)
            block, type_size = GGML_QUANT_SIZES[kind]
            n_elems = int(np.prod(dims, dtype=object))
            if (dims[0] if dims else 1) % block:
                raise ValueError(f"{self.path}: tensor {name!r}'s rows ({dims[0] if dims else 1}) are not whole "
                                 f"{kind.name} blocks of {block}")
            n_bytes = n_elems // block * type_size
            start = self.data_offset + rel
            if rel % self.alignment or start + n_bytes > self._size:
                raise ValueError(f"{self.path}: tensor {name!r} ({n_bytes} bytes at {start}) is "
                                 f"misaligned or runs past the end of the file ({self._size} bytes)")
            shape = tuple(reversed(dims))
            if kind in _ELEMENTS:
                dtype = np.dtype(_ELEMENTS[kind]).newbyteorder(self._order)
                data = np.frombuffer(self._map, dtype, n_elems, start).reshape(shape)
            else:
                data = np.frombuffer(self._map, np.uint8, n_bytes, start).reshape(
                    quant_shape_to_byte_shape(shape, kind))
            out.append(GGUFTensor(name, kind, np.array(dims, np.uint64), n_elems, n_bytes, start, data))
        return out


def read_metadata(path: str | Path, prefix: str = "") -> dict[str, Any]:
    """The metadata values whose keys start with `prefix` (tensors are located, not read)."""
    return {k: v for k, v in GGUFFile(path).fields.items() if k.startswith(prefix)}

"""Read a GGUF file: key/value metadata as plain Python values, tensors as memory-mapped numpy views.

Why not `gguf.GGUFReader`: it builds a numpy view per array element, so the 49k-token vocabulary and
48k merges of a small model take ~3 s to index. Here string arrays are read with one `struct` call per
string (~0.05 s) and numeric arrays with one `np.frombuffer`. The `gguf` package still provides the
type table and the dequantization kernels.

File layout (little-endian): magic "GGUF", version u32, tensor count u64, kv count u64, then the kvs
(key string, value type u32, value), then the tensor infos (name, n_dims u32, dims u64 x n with the
innermost first, ggml type u32, offset u64 into the data section), then the data section, aligned to
`general.alignment` (default 32).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from tokenmill.errors import ModelLoadError

# GGUF value types -> (struct format, numpy dtype); 8 = string, 9 = array handled apart.
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    tensor_type: object
    """A `gguf.GGMLQuantizationType`."""
    shape: np.ndarray
    """Dimensions in GGML order (innermost first), like `gguf.ReaderTensor.shape`."""
    data: np.ndarray
    """A read-only view of the file: typed for F32/F16/BF16, uint8 rows of blocks for quantized types."""


class GGUFFile:
    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = str(path)
        try:
            self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from e
        self._pos = 0
        try:
            if bytes(self._buf[:4]) != b"GGUF":
                raise ValueError("bad magic bytes (expected 'GGUF')")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", self._buf, 4)
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version}")
            self._pos = 24
            self.metadata = {}
            for _ in range(n_kv):
                key = self._string()
                self.metadata[key] = self._value(self._u32())
            infos = [self._tensor_info() for _ in range(n_tensors)]
            align = int(self.metadata.get("general.alignment", 32))
            start = (self._pos + align - 1) // align * align
            self.tensors = [self._tensor(gguf, start, *info) for info in infos]
        except (ValueError, struct.error, IndexError, KeyError, OverflowError) as e:
            raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e

    # -- primitive readers over the memory map
    def _u32(self) -> int:
        (v,) = struct.unpack_from("<I", self._buf, self._pos)
        self._pos += 4
        return v

    def _u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self._buf, self._pos)
        self._pos += 8
        return v

    def _string(self) -> str:
        n = self._u64()
        if self._pos + n > len(self._buf):
            raise ValueError("string runs past the end of the file (truncated?)")
        s = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type, count = self._u32(), self._u64()
            if item_type == _STRING:
                return self._string_array(count)
            if item_type not in _SCALARS:
                return [self._value(item_type) for _ in range(count)]
            dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
            end = self._pos + count * dtype.itemsize
            if end > len(self._buf):
                raise ValueError("array runs past the end of the file (truncated?)")
            arr = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
            self._pos = end
            return arr.tolist()
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        fmt = _SCALARS[vtype][0]
        (v,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _string_array(self, count: int) -> list[str]:
        raw = memoryview(self._buf)
        out, pos, size = [], self._pos, len(self._buf)
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (n,) = unpack(raw, pos)
            pos += 8
            if pos + n > size:
                raise ValueError("string array runs past the end of the file (truncated?)")
            out.append(bytes(raw[pos:pos + n]).decode("utf-8", errors="replace"))
            pos += n
        self._pos = pos
        return out

    def _tensor_info(self):
        name = self._string()
        dims = [self._u64() for _ in range(self._u32())]
        return name, dims, self._u32(), self._u64()

    def _tensor(self, gguf, data_start: int, name: str, dims: list[int], ggml_type: int, offset: int) -> GGUFTensor:
        qtype = gguf.GGMLQuantizationType(ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        inner = dims[0] if dims else 1
        rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        if inner % block:
            raise ValueError(f"tensor {name}: row of {inner} is not a multiple of the {qtype.name} block {block}")
        row_bytes = inner // block * type_size
        begin = data_start + offset
        if begin + rows * row_bytes > len(self._buf):
            raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
        flat = self._buf[begin:begin + rows * row_bytes]
        shape = tuple(reversed(dims)) or (1,)
        typed = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I32": np.int32}.get(qtype.name)
        if typed is not None:
            data = flat.view(typed).reshape(shape)
        else:  # quantized (BF16 included): rows of raw blocks, what gguf.quants.dequantize expects
            data = flat.reshape(*shape[:-1], row_bytes)
        return GGUFTensor(name, qtype, np.array(dims, dtype=np.uint64), data)


def open_reader(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file; a truncated or corrupt file raises ModelLoadError."""
    return GGUFFile(path)


def read_metadata(reader: GGUFFile) -> dict:
    """All key/value fields as a plain dict (values are str, int, float, bool or lists of them)."""
    return reader.metadata

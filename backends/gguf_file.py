"""A validating, memory-mapped GGUF reader.

Our own rather than `gguf.GGUFReader`, measurably better for this job: GGUFReader builds
numpy views for every item of every metadata array, which takes 2.3 s for SmolLM2's 49k-token
vocabulary (llama.cpp loads the whole model in 0.3 s); this reads it in tens of milliseconds.
It also checks every count, length, offset and size against the file before trusting it, so
a hostile or truncated file gives a CheckpointError instead of a huge allocation or a read
outside the file; it decodes strings and arrays only once the whole header has checked out;
and it lets the caller drop a tensor's pages once repacked. The format:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. Constants come from `gguf`.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import CheckpointError
from .numbers import find_multiple

MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
MAX_KEY_BYTES = 65535  # the spec's limits on a metadata key and on a tensor name
MAX_NAME_BYTES = 64

_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {t: np.dtype(f) for t, f in _SCALARS.items()}


def shown(name: str, limit: int = 60) -> str:
    """A name read from a file, quoted for a one-line message: a corrupt length makes "names" of
    megabytes of tensor bytes, control characters included."""
    cut = name[:limit]
    text = cut if cut.isprintable() else ascii(cut)[1:-1]
    return f"'{text}…'" if len(name) > limit else f"'{text}'"


@dataclass(frozen=True)
class _Later:
    """A string or array value, located and bounds-checked, to be decoded once the whole header
    has checked out: a corrupt length or count could otherwise turn megabytes of tensor data into
    Python strings and numbers before the file is found corrupt."""

    item_type: GGUFValueType  # STRING for a string, else the type of an array's items
    start: int
    count: int  # bytes of a string, items of an array
    array: bool


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType | int  # an int when the type id is unknown to `gguf`
    shape: tuple[int, ...]  # GGML order: innermost dimension first
    offset: int  # from the start of the file
    nbytes: int


class Metadata(Mapping):
    """GGUF metadata, key -> value. Strings and arrays, checked against the file while parsing,
    are decoded on first use: a 49k-token vocabulary is 0.06 s of Python that a load with a
    cached tokenizer never needs."""

    def __init__(self, raw: dict, decode):
        self._raw, self._decode = raw, decode

    def __getitem__(self, key: str):
        value = self._raw[key]
        if isinstance(value, _Later):
            value = self._raw[key] = self._decode(value)
        return value

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


def _decode(raw: bytes) -> str:
    # llama.cpp vocabularies may hold byte tokens that are not valid UTF-8 alone.
    return raw.decode("utf-8", errors="surrogateescape")


def advise_huge_pages(mapped: mmap.mmap) -> None:
    """Ask Linux to read the file into the page cache in 2 MiB folios and to map them whole.

    A decoded token streams every weight once; from 4 KiB pages each core stalls on TLB misses:
    the 3B Q4_K_M matmuls stream 19.8 GB/s from a mapping of 4 KiB folios and 24.2 GB/s from one
    of 2 MiB folios (2 threads, Intel Xeon). Linux maps cached 2 MiB folios whole on its own; the
    advice makes readahead allocate them on the kernels and filesystems that otherwise read a
    mapped file in small ones. Pages already cached keep their size.
    """
    if hasattr(mmap, "MADV_HUGEPAGE") and len(mapped):
        try:
            mapped.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages
            pass


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.name
        try:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # mmap of an empty file
            raise CheckpointError(f"{self.name}: empty file, not a GGUF") from None
        self.size = len(self._mmap)
        advise_huge_pages(self._mmap)
        self._pos = 0
        self.metadata: Mapping = {}  # a Metadata once parsed
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    # --- primitive reads, each bounds-checked ---

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.name}: corrupt or truncated GGUF ({what} at byte {self._pos})")

    def _take(self, n: int) -> int:
        start = self._pos
        if n < 0 or start + n > self.size:
            raise self._fail(f"{n} bytes needed past the end of the file")
        self._pos = start + n
        return start

    def _scalar(self, value_type: GGUFValueType):
        fmt = _SCALARS[value_type]
        return struct.unpack_from(fmt, self._mmap, self._take(struct.calcsize(fmt)))[0]

    def _u32(self) -> int:
        return self._scalar(GGUFValueType.UINT32)

    def _u64(self) -> int:
        return self._scalar(GGUFValueType.UINT64)

    def _string(self, limit: int, what: str) -> str:
        n = self._u64()
        if n > limit:
            raise self._fail(f"a {what} of {n} bytes (at most {limit})")
        start = self._take(n)
        return _decode(self._mmap[start : start + n])

    def _string_items(self, count: int) -> int:
        """Step over `count` strings (checking each length against the file); where they start."""
        # The vocabulary is 49k-128k strings: one tight loop, not a method call per string.
        buf, start, size = self._mmap, self._pos, self.size
        length = struct.Struct("<Q").unpack_from
        pos = start
        for i in range(count):
            end = pos + 8 + length(buf, pos)[0] if pos + 8 <= size else size + 1
            if end > size:
                self._pos = pos
                raise self._fail(f"string {i} of {count} runs past the end of the file")
            pos = end
        self._pos = pos
        return start

    def _decoded(self, value: _Later):
        buf, start = self._mmap, value.start
        if not value.array:
            return _decode(buf[start : start + value.count])
        if value.item_type != GGUFValueType.STRING:
            return np.frombuffer(buf, _NUMPY[value.item_type], value.count, start).tolist()
        out, length = [], struct.Struct("<Q").unpack_from
        for _ in range(value.count):
            end = start + 8 + length(buf, start)[0]
            out.append(_decode(buf[start + 8 : end]))
            start = end
        return out

    def _value_type(self) -> GGUFValueType:
        raw = self._u32()
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self._fail(f"unknown metadata value type {raw}") from None

    def _value(self, value_type: GGUFValueType):
        if value_type == GGUFValueType.STRING:
            n = self._u64()
            return _Later(value_type, self._take(n), n, array=False)
        if value_type != GGUFValueType.ARRAY:
            return self._scalar(value_type)
        item_type = self._value_type()
        count = self._u64()
        if item_type in _NUMPY:  # numbers: one bounds check, one copy
            return _Later(item_type, self._take(count * _NUMPY[item_type].itemsize), count, array=True)
        if item_type == GGUFValueType.STRING:
            if count * 8 > self.size - self._pos:  # each string takes at least its 8-byte length
                raise self._fail(f"string array of {count} items cannot fit")
            return _Later(item_type, self._string_items(count), count, array=True)
        raise self._fail("nested metadata arrays")

    # --- structure ---

    def _parse(self) -> None:
        if self.size < 24 or self._mmap[:4] != b"GGUF":
            raise CheckpointError(f"{self.name}: not a GGUF file (it starts with {self._mmap[:4]!r}, not b'GGUF')")
        self._pos = 4
        version = self._u32()
        if version not in (2, 3):
            raise CheckpointError(f"{self.name}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = self._u64(), self._u64()
        # Every entry takes bytes: counts beyond what the file could hold are corrupt, not big.
        if n_tensors > self.size // 24 or n_kv > self.size // 12:
            raise self._fail(f"header claims {n_tensors} tensors and {n_kv} metadata keys")
        for _ in range(n_kv):
            key = self._string(MAX_KEY_BYTES, "metadata key")
            self.metadata[key] = self._value(self._value_type())
        infos = []
        for _ in range(n_tensors):
            name = self._string(MAX_NAME_BYTES, "tensor name")
            n_dims = self._u32()
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._fail(f"tensor {shown(name)} has {n_dims} dimensions")
            shape = tuple(self._u64() for _ in range(n_dims))
            type_id = self._u32()
            infos.append((name, shape, type_id, self._u64()))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            shown_alignment = alignment if isinstance(alignment, int) else "(not a number)"
            raise self._fail(f"general.alignment {shown_alignment} is not a power of two")
        data_start = find_multiple(self._pos, alignment)
        for name, shape, type_id, offset in infos:
            self.tensors[name] = self._tensor_info(name, shape, type_id, offset, data_start, alignment)
        self.data_start = data_start
        # As llama.cpp requires: the tensors' data follow one another in the order listed, each
        # padded to the alignment, so a corrupt offset cannot pass off other bytes as a tensor.
        end = 0
        for info in self.tensors.values():
            if info.offset - data_start != end:
                raise CheckpointError(
                    f"{self.name}: tensor {shown(info.name)} is at offset {info.offset - data_start}, where the "
                    f"tensor before it ends at {end}: corrupt"
                )
            if not isinstance(info.ggml_type, GGMLQuantizationType):
                break  # its size is unknown (a backend names the type it cannot use)
            end += find_multiple(info.nbytes, alignment)
        self.metadata = Metadata(self.metadata, self._decoded)

    def header_digest(self) -> str:
        """A digest of the header (metadata and tensor table): names what was built from it."""
        return hashlib.blake2b(self._mmap[: self.data_start], digest_size=16).hexdigest()

    def _tensor_info(self, name, shape, type_id, offset, data_start, alignment) -> TensorInfo:
        if name in self.tensors:
            raise self._fail(f"tensor {shown(name)} listed twice")
        try:
            ggml_type: GGMLQuantizationType | int = GGMLQuantizationType(type_id)
            block_elems, block_bytes = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            # Unknown type: its size cannot be checked, and no backend can use it (they say so).
            return TensorInfo(name, type_id, shape, data_start + offset, 0)
        count = 1
        for d in shape:
            count *= d
        if shape[0] % block_elems:
            raise CheckpointError(f"{self.name}: tensor {shown(name)} row length {shape[0]} is not whole {ggml_type.name} blocks")
        nbytes = count // block_elems * block_bytes
        begin = data_start + offset
        if offset % alignment:
            raise CheckpointError(f"{self.name}: tensor {shown(name)} offset {offset} is not a multiple of {alignment}: corrupt")
        if begin + nbytes > self.size:
            raise CheckpointError(
                f"{self.name}: tensor {shown(name)} ({nbytes} bytes at offset {offset}) lies outside the file "
                f"({self.size} bytes): truncated or corrupt"
            )
        return TensorInfo(name, ggml_type, shape, begin, nbytes)

    # --- data ---

    def tensor_bytes(self, info: TensorInfo) -> np.ndarray:
        """uint8 [rows, row_bytes] over the mapped file (read-only, no copy)."""
        rows = 1
        for d in info.shape[1:]:
            rows *= d
        data = np.frombuffer(self._mmap, np.uint8, info.nbytes, info.offset)
        return data.reshape(rows, -1) if info.nbytes else data.reshape(rows, 0)

    def maps(self, address: int) -> bool:
        """Whether `address` lies in this file's mapping (a weight that is a view of the file)."""
        base = np.frombuffer(self._mmap, np.uint8, 1).ctypes.data if self.size else 0
        return base <= address < base + self.size

    def release(self, info: TensorInfo) -> None:
        """Drop the tensor's pages from this process's resident memory once it has been copied
        (the file stays mapped; touching the bytes again reads them back)."""
        page = mmap.PAGESIZE
        start = info.offset // page * page
        end = min(find_multiple(info.offset + info.nbytes, page), self.size)
        if hasattr(self._mmap, "madvise") and end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

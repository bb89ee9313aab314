"""Our GGUF reader: the same metadata and tensors as gguf-py's GGUFReader, and typed errors
(never a crash, a hang or a huge allocation) on truncated, bit-flipped and hostile files."""

import struct
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backends
from backends.checkpoint import open_checkpoint
from backends.errors import CheckpointError, SmolLMError
from backends.gguf_file import GGUFFile
from conftest import GGUF_TYPES, tiny_gguf


def reader_metadata(reader: GGUFReader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            value = field.contents()
            out[key] = value.tolist() if isinstance(value, np.ndarray) else value
    return out


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_same_as_gguf_py_on_fixtures(qtype):
    ours, theirs = GGUFFile(tiny_gguf(qtype)), GGUFReader(tiny_gguf(qtype))
    assert ours.metadata == reader_metadata(theirs)
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == t.tensor_type and info.shape == tuple(int(d) for d in t.shape)
        assert np.array_equal(ours.tensor_bytes(info).reshape(-1), t.data.view(np.uint8).reshape(-1))


def mapping_flags(address: int) -> list[str]:
    """The VmFlags /proc/self/smaps gives the mapping that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(), reason="no transparent huge pages here")
def test_the_mapping_asks_for_huge_pages(smollm2_gguf):
    # the weights are read into the page cache in 2 MiB folios: decode streams them through fewer TLB entries
    f = GGUFFile(smollm2_gguf)
    info = next(iter(f.tensors.values()))
    assert "hg" in mapping_flags(f.tensor_bytes(info).ctypes.data)


def test_same_as_gguf_py_on_smollm2_and_fast(smollm2_gguf):
    start = time.perf_counter()
    ours = GGUFFile(smollm2_gguf)
    elapsed = time.perf_counter() - start
    theirs = reader_metadata(GGUFReader(smollm2_gguf))
    assert ours.metadata == theirs
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert elapsed < 0.5  # GGUFReader takes about 2.3 s here


def _header(n_tensors=0, n_kv=0, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


HOSTILE = {
    "empty": b"",
    "wrong magic": b"GGML" + bytes(40),
    "version 1": _header(version=1) + bytes(16),
    "billions of tensors": _header(n_tensors=2**40) + bytes(64),
    "billions of keys": _header(n_kv=2**40) + bytes(64),
    "string longer than the file": _header(n_kv=1) + struct.pack("<Q", 2**62) + b"abc",
    "unknown value type": _header(n_kv=1) + _string(b"k") + struct.pack("<I", 99) + bytes(16),
    "array of 2^60 strings": _header(n_kv=1) + _string(b"k") + struct.pack("<IIQ", 9, 8, 2**60) + bytes(32),
    "array of 2^60 floats": _header(n_kv=1) + _string(b"k") + struct.pack("<IIQ", 9, 6, 2**60) + bytes(32),
    "nested arrays": _header(n_kv=1) + _string(b"k") + struct.pack("<IIQ", 9, 9, 1) + bytes(32),
    "tensor with 9 dims": _header(n_tensors=1) + _string(b"t") + struct.pack("<I", 9) + bytes(80),
    "tensor past the end": _header(n_tensors=1) + _string(b"t") + struct.pack("<IQIQ", 1, 2**40, 0, 0) + bytes(32),
    "huge offset": _header(n_tensors=1) + _string(b"t") + struct.pack("<IQIQ", 1, 32, 0, 2**62) + bytes(32),
    "misaligned offset": _header(n_tensors=1) + _string(b"t") + struct.pack("<IQIQ", 1, 4, 0, 3) + bytes(64),
    "bad alignment": _header(n_kv=1) + _string(b"general.alignment") + struct.pack("<II", 4, 3) + bytes(16),
    "tensor name of 65 bytes": _header(n_tensors=1) + _string(b"t" * 65) + struct.pack("<IQIQ", 1, 32, 0, 0) + bytes(64),
    "overlapping tensors": _header(n_tensors=2) + _string(b"a") + struct.pack("<IQIQ", 1, 8, 0, 0)
    + _string(b"b") + struct.pack("<IQIQ", 1, 8, 0, 0) + bytes(6 + 64),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_give_a_checkpoint_error(case, tmp_path):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(HOSTILE[case])
    with pytest.raises(CheckpointError):
        GGUFFile(path)


def _load_everything(path):
    """What backends.load reads before building a model: checkpoint, tokenizer, template."""
    ckpt = open_checkpoint(path)
    tokenizer = backends.load_tokenizer(ckpt)
    backends.load_chat_template(ckpt, tokenizer)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_and_bit_flipped_files_fail_cleanly(data, tmp_path):
    original = tiny_gguf(data.draw(st.sampled_from(["Q4_0", "Q4_K_M"]))).read_bytes()
    header_end = GGUFFile(tiny_gguf("Q4_0")).data_start
    blob = bytearray(original)
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:  # flips in the header, where they matter most
        for _ in range(data.draw(st.integers(1, 8))):
            at = data.draw(st.integers(0, min(header_end, len(blob)) - 1))
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(bytes(blob))
    start = time.perf_counter()
    try:
        _load_everything(path)
    except SmolLMError:
        pass
    assert time.perf_counter() - start < 5

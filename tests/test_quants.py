"""backends/quants.py against gguf-py's numpy dequantization (the reference), on random
blocks, on round-tripped data and on every tensor of the tiny fixture GGUFs."""

import warnings

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from backends.errors import CheckpointError, UnsupportedTensorType
from backends.quants import GGML_FORMATS, dequantize, ggml_format
from conftest import GGUF_TYPES, tiny_gguf

SUPPORTED = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
IQ_TYPES = [T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_NL, T.IQ4_XS]  # dequantized by gguf-py
SUPPORTED += IQ_TYPES
FLOAT_TYPES = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.float32}
# Byte offsets of the f16 scale fields (d, dmin, m) in each block (llama.cpp's block_* structs).
# Random bytes there would give inf/NaN; everything else may be random.
F16_FIELDS = {
    T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    **{t: (0,) for t in IQ_TYPES}, T.IQ1_M: (54,),  # IQ1_M's d: the top nibbles of its last four u16
}  # fmt: skip
# Relative RMS error of gguf-py's quantize -> dequantize on Gaussian data, with headroom.
ROUND_TRIP_ERROR = {T.F32: 0.0, T.F16: 5e-4, T.BF16: 4e-3, T.Q8_0: 0.01, T.Q5_0: 0.06, T.Q5_1: 0.06, T.Q4_0: 0.12, T.Q4_1: 0.12}


def to_torch(raw: np.ndarray) -> torch.Tensor:
    """A uint8 tensor sharing memory with `raw`, read-only arrays (mmapped GGUFs) included."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(raw.view(np.uint8))


def random_rows(ggml_type: T, rows: int, blocks: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, blocks * block_bytes]: random bytes with finite, moderate f16 scales."""
    if ggml_type in FLOAT_TYPES:
        values = rng.standard_normal((rows, blocks)).astype(np.float32)
        if ggml_type == T.BF16:  # the top halves of f32 values
            return np.ascontiguousarray(values.view(np.uint16)[:, 1::2]).view(np.uint8)
        return values.astype(FLOAT_TYPES[ggml_type]).view(np.uint8)
    fmt = GGML_FORMATS[ggml_type]
    raw = rng.integers(0, 256, (rows, blocks, fmt.block_bytes), dtype=np.uint8)
    for at in F16_FIELDS[ggml_type]:
        raw[..., at : at + 2] = rng.uniform(-2, 2, (rows, blocks, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, ggml_type: T) -> np.ndarray:
    if ggml_type in (T.F32, T.F16):  # gguf-py takes these as typed arrays
        raw = raw.view(np.float32 if ggml_type == T.F32 else np.float16)
    return gguf.quants.dequantize(raw, ggml_type)


def assert_matches_reference(got: torch.Tensor, raw: np.ndarray, ggml_type: T) -> None:
    want = reference(raw, ggml_type)
    assert np.isfinite(want).all()
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    # Bit-equal on CPU today (same operations in the same order); the tolerance leaves room for
    # a device that fuses a multiply-add.
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-6, atol=1e-6)


def test_table_covers_the_supported_types_with_ggml_block_sizes():
    assert list(GGML_FORMATS) == SUPPORTED
    for ggml_type, fmt in GGML_FORMATS.items():
        assert fmt.ggml_type == ggml_type
        assert (fmt.block_elems, fmt.block_bytes) == GGML_QUANT_SIZES[ggml_type]


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 2)], ids=lambda s: f"{s[0]}rows{s[1]}blocks")
@pytest.mark.parametrize("ggml_type", SUPPORTED, ids=lambda t: t.name)
def test_random_blocks_match_gguf(ggml_type, shape):
    raw = random_rows(ggml_type, *shape, np.random.default_rng(shape[0] * 100 + ggml_type.value))
    fmt = GGML_FORMATS[ggml_type]
    got = fmt.dequantize(to_torch(raw))
    assert got.shape == (shape[0], shape[1] * fmt.block_elems)
    assert_matches_reference(got, raw, ggml_type)
    assert_matches_reference(dequantize(to_torch(raw), ggml_type), raw, ggml_type)


@pytest.mark.parametrize("ggml_type", list(ROUND_TRIP_ERROR), ids=lambda t: t.name)
def test_round_trip_through_gguf_quantize(ggml_type):
    weights = (np.random.default_rng(7).standard_normal((6, 512)) * 0.02).astype(np.float32)
    raw = gguf.quants.quantize(weights, ggml_type).view(np.uint8)
    got = dequantize(to_torch(raw), ggml_type)
    assert_matches_reference(got, raw, ggml_type)
    error = np.sqrt(np.mean((got.numpy() - weights) ** 2) / np.mean(weights**2))
    assert error <= ROUND_TRIP_ERROR[ggml_type]


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_every_fixture_tensor_matches_gguf(qtype):
    reader = gguf.GGUFReader(tiny_gguf(qtype))
    seen = set()
    for tensor in reader.tensors:
        raw = tensor.data.view(np.uint8)  # read-only, memory-mapped
        got = dequantize(to_torch(raw), tensor.tensor_type)
        assert tuple(got.shape) == tuple(int(n) for n in reversed(tensor.shape)), tensor.name
        assert_matches_reference(got, tensor.data, tensor.tensor_type)
        seen.add(tensor.tensor_type.name)
    assert seen >= {"F32", "Q6_K", "Q4_K"} if qtype == "Q4_K_M" else seen >= {"F32", qtype}


def test_out_dtype():
    raw = random_rows(T.Q4_K, 4, 2, np.random.default_rng(0))
    full = dequantize(to_torch(raw), T.Q4_K)
    half = dequantize(to_torch(raw), T.Q4_K, out_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, full.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("ggml_type", "name"), [(T.TQ2_0, "TQ2_0"), (int(T.TQ1_0), "TQ1_0"), (9999, "9999")], ids=["enum", "int", "unknown"]
)
def test_unsupported_types_name_the_tensor_and_type(ggml_type, name):
    with pytest.raises(UnsupportedTensorType) as raised:
        ggml_format(ggml_type, "blk.3.ffn_down.weight")
    message = str(raised.value)
    assert f"tensor 'blk.3.ffn_down.weight' has GGML type {name}," in message
    assert "supported: F32, F16, BF16, Q8_0," in message and "IQ4_XS)" in message
    with pytest.raises(UnsupportedTensorType):
        dequantize(torch.zeros(1, 66, dtype=torch.uint8), ggml_type)


def test_type_given_as_int():
    assert ggml_format(int(T.Q4_K), "x") is GGML_FORMATS[T.Q4_K]


def test_partial_block_row_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="Q4_0 rows of 20 bytes"):
        dequantize(torch.zeros(2, 20, dtype=torch.uint8), T.Q4_0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("ggml_type", SUPPORTED, ids=lambda t: t.name)
def test_cuda_matches_gguf(ggml_type):
    raw = random_rows(ggml_type, 8, 3, np.random.default_rng(ggml_type.value))
    got = dequantize(to_torch(raw).cuda(), ggml_type)
    assert got.device.type == "cuda"
    assert_matches_reference(got, raw, ggml_type)


@pytest.mark.parametrize("qtype", [t for t, f in GGML_FORMATS.items() if f.affine is not None], ids=lambda t: t.name)
def test_affine_rows_is_the_same_weights(qtype):
    """The per-group (q, scale, zero, offset) form that kernels repack equals the dequantized rows."""
    from backends.quants import affine_rows

    raw = to_torch(random_rows(qtype, 3, 2, np.random.default_rng(qtype.value)))
    a = affine_rows(raw, qtype, "t")
    assert a.q.shape[0] == raw.shape[0] and a.scale.shape[:2] == a.q.shape[:2]
    torch.testing.assert_close(a.dequantize(), dequantize(raw, qtype), rtol=0, atol=0)


def test_rows_per_slice_holds_about_slice_elems_in_whole_blocks():
    from backends.quants import SLICE_ELEMS, rows_per_slice

    assert rows_per_slice(576) == SLICE_ELEMS // 576
    assert rows_per_slice(2 * SLICE_ELEMS) == 1  # a row wider than a slice: one at a time
    assert rows_per_slice(2048, multiple=64) == SLICE_ELEMS // 2048 // 64 * 64
    assert rows_per_slice(SLICE_ELEMS, multiple=64) == 64

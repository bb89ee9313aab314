"""Checkpoint reading: names, shapes, the Q/K un-permutation, safetensors validation, configs."""

import json
import shutil
import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from backends.checkpoint import hf_name_from_gguf, open_checkpoint, read_safetensors, unpermute_qk_rows
from backends.config import config_from_hf, smollm3_rope_layers
from backends.errors import CheckpointError, SmolLMError
from backends.quants import dequantize
from conftest import SMOLLM3_META, TINY_HF, tiny_gguf


def test_safetensors_bytes_equal_the_safetensors_library():
    ours = read_safetensors(TINY_HF / "model.safetensors")
    theirs = load_file(TINY_HF / "model.safetensors")
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        raw = ours[name]
        assert raw.ggml_type == GGMLQuantizationType.BF16 and raw.shape == tuple(tensor.shape)
        got = dequantize(torch.from_numpy(np.array(raw.data)), raw.ggml_type).reshape(raw.shape)
        assert torch.equal(got, tensor.float())


def test_gguf_and_hf_checkpoints_agree():
    """The F16 GGUF, un-permuted, holds the HF checkpoint's weights (rounded to f16)."""
    hf, gguf = open_checkpoint(TINY_HF), open_checkpoint(tiny_gguf("F16"))
    assert hf.config.rope_layers == gguf.config.rope_layers
    assert set(gguf.tensors) == {n for n in hf.tensors}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        a, b = (dequantize(torch.from_numpy(np.array(c.tensors[name].data)), c.tensors[name].ggml_type) for c in (hf, gguf))
        torch.testing.assert_close(a.half().float(), b, rtol=0, atol=0)


def test_unpermute_inverts_llamacpp_permutation():
    heads, head_dim, cols = 3, 8, 5
    w = np.arange(heads * head_dim * cols).reshape(heads * head_dim, cols)
    llamacpp = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(unpermute_qk_rows(llamacpp, heads), w)
    with pytest.raises(CheckpointError):
        unpermute_qk_rows(np.zeros((7, 4)), 2)


def test_gguf_qk_rows_are_read_where_they_lie():
    """A GGUF's Q/K rows in HF order, as views of the file (a copy costs a 3B model's load ~0.3 s)."""
    ckpt = open_checkpoint(tiny_gguf("Q8_0"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        raw = ckpt.tensors[name]
        assert raw.qk_heads and ckpt.maps(raw.stored.ctypes.data)
        runs = raw.row_runs()
        assert all(np.shares_memory(run, raw.stored) for run in runs)
        assert np.array_equal(np.concatenate(runs), raw.data)
        assert not np.array_equal(raw.data, raw.stored)  # the file's order is not HF's
    v = ckpt.tensors["model.layers.0.self_attn.v_proj.weight"]
    assert not v.qk_heads and v.row_runs() == [v.stored] and v.data is v.stored


def test_gguf_names():
    assert hf_name_from_gguf("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name_from_gguf("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name_from_gguf("output.weight") == "lm_head.weight"
    assert hf_name_from_gguf("rope_freqs.weight") is None


def test_smollm3_config_nope_layers_and_rope():
    cfg = json.loads((SMOLLM3_META / "config.json").read_text())
    config = config_from_hf(cfg)
    assert config.rope_layers == smollm3_rope_layers(36)
    assert [i for i, r in enumerate(config.rope_layers) if not r] == list(range(3, 36, 4))
    assert config.rope_theta == 5e6 and config.num_kv_heads == 4 and config.head_dim == 128
    # transformers 5 moves rope_theta into rope_parameters; no_rope_layers may be absent.
    del cfg["rope_theta"], cfg["no_rope_layers"]
    cfg["rope_parameters"] = {"rope_theta": 1234.0, "rope_type": "yarn", "factor": 2.0,
                              "original_max_position_embeddings": 65536}
    config = config_from_hf(cfg)
    assert config.rope_theta == 1234.0 and config.rope_scaling["rope_type"] == "yarn"
    assert config.rope_layers == smollm3_rope_layers(36)


def test_llama_config_uses_rope_everywhere():
    cfg = json.loads((TINY_HF / "config.json").read_text())
    cfg["model_type"] = "llama"
    assert all(config_from_hf(cfg).rope_layers)


def _copy_hf(tmp_path):
    target = tmp_path / "hf"
    shutil.copytree(TINY_HF, target)
    return target


def test_hf_dir_errors(tmp_path):
    d = _copy_hf(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        open_checkpoint(d)
    d2 = _copy_hf(tmp_path / "b")
    (d2 / "model.safetensors").unlink()
    (d2 / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(d2)
    cfg = json.loads((TINY_HF / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        open_checkpoint(d)


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


HOSTILE_SAFETENSORS = {
    "header longer than file": struct.pack("<Q", 2**40) + b"{}",
    "not json": struct.pack("<Q", 4) + b"\xff\xfe{}",
    "offsets past the end": _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
    "size mismatch": _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8)),
    "negative shape": _safetensors({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 0]}}),
    "int dtype": _safetensors({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)),
    "huge shape": _safetensors({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, bytes(8)),
    "missing fields": _safetensors({"w": {"dtype": "F32"}}),
    "truncated": b"\x01\x02",
    "a list as dtype": _safetensors({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "float offsets": _safetensors({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, bytes(4)),
    "gap between tensors": _safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                         "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12)),
    "overlapping tensors": _safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                         "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "bytes after the last tensor": _safetensors({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8)),
    "nested 100000 deep": struct.pack("<Q", 200_007) + b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SAFETENSORS))
def test_hostile_safetensors_give_a_typed_error(case, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(HOSTILE_SAFETENSORS[case])
    with pytest.raises(SmolLMError):
        read_safetensors(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_safetensors_dirs_fail_cleanly(data, tmp_path_factory):
    d = _copy_hf(tmp_path_factory.mktemp("fuzz"))
    blob = bytearray((d / "model.safetensors").read_bytes())
    header_end = 8 + int.from_bytes(blob[:8], "little")
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 6))):
            at = data.draw(st.integers(0, header_end - 1))
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
    (d / "model.safetensors").write_bytes(bytes(blob))
    try:
        open_checkpoint(d)
    except SmolLMError:
        pass

"""Reading checkpoints (GGUF files, Hugging Face safetensors directories) into one form.

Every tensor comes out as a `RawTensor`: its bytes, memory-mapped and untouched, plus the
GGML type that says how to read them (F32/F16/BF16 for safetensors). Both backends build
their weights from that, so quantized tensors stay quantized until a backend decides
otherwise. Names are the Hugging Face ones (`model.layers.0.self_attn.q_proj.weight`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from .gguf_file import GGUFFile, shown

from .config import ModelConfig, config_from_gguf, config_from_hf
from .errors import CheckpointError, UnsupportedTensorType


# How an MLX-quantized checkpoint's packed codes (safetensors U32 words, beside .scales and
# .biases) are carried: as bytes under a type no GGUF weight of ours uses.
MLX_PACKED = GGMLQuantizationType.I32


@dataclass(frozen=True)
class RawTensor:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # row-major logical shape
    stored: np.ndarray  # uint8 [rows, row_bytes] as the file holds them: rows = prod(shape[:-1]), each row whole blocks
    qk_heads: int = 0  # a Q/K weight whose rows are in llama.cpp's order for this many heads (see unpermute_qk_rows)

    @cached_property
    def data(self) -> np.ndarray:
        """uint8 [rows, row_bytes] in Hugging Face's row order: `stored`, or for a llama.cpp-ordered
        Q/K weight a copy with its rows moved, made on first use."""
        return unpermute_qk_rows(self.stored, self.qk_heads) if self.qk_heads else self.stored

    def row_runs(self) -> list[np.ndarray]:
        """The rows in Hugging Face's order as views of `stored`, nothing copied: `stored` itself,
        or for a llama.cpp-ordered Q/K weight two runs a head, each row of a run two rows apart.
        (The copy `data` makes costs a 3B model's load 0.2-0.4 s of first-touched memory.)"""
        if not self.qk_heads:
            return [self.stored]
        half = self.stored.shape[0] // self.qk_heads // 2
        by_pair = self.stored.reshape(self.qk_heads, half, 2, -1)  # (head, i, j, bytes): row h*2*half + 2i + j
        return [by_pair[h, :, j] for h in range(self.qk_heads) for j in range(2)]

    @property
    def is_mlx_packed(self) -> bool:
        """Codes of an MLX-quantized checkpoint: shape [out, in * bits / 32], read by the MLX backend only."""
        return self.ggml_type == MLX_PACKED


@dataclass
class Checkpoint:
    path: Path
    format: str  # "gguf" | "safetensors"
    config: ModelConfig
    tensors: dict[str, RawTensor]
    gguf_metadata: Mapping | None = None  # GGUF key -> value (tokenizer and chat template live here)
    hf_dir: Path | None = None
    gguf_file: GGUFFile | None = None

    def release(self, name: str) -> None:
        """A backend copied tensor `name` into its own form: drop the file's pages from memory."""
        if self.gguf_file is not None and name in self._gguf_names:
            self.gguf_file.release(self.gguf_file.tensors[self._gguf_names[name]])

    def maps(self, address: int) -> bool:
        """Whether memory at `address` is the checkpoint file itself (so must not be released)."""
        return self.gguf_file is not None and self.gguf_file.maps(address)

    @cached_property
    def _gguf_names(self) -> dict[str, str]:
        return {hf_name_from_gguf(n): n for n in self.gguf_file.tensors} if self.gguf_file else {}

    @property
    def is_mlx_quantized(self) -> bool:
        """Quantized by mlx-lm (packed codes beside scales and biases): only the MLX backend runs it."""
        return any(t.is_mlx_packed for t in self.tensors.values())

    @property
    def weight_type(self) -> str:
        """What the weights are stored as, e.g. "Q4_K" (the most common type of the 2-D weights)."""
        kinds = [t.ggml_type.name for t in self.tensors.values() if len(t.shape) == 2]
        return max(set(kinds), key=kinds.count) if kinds else "?"


_GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def concat_rows(raws: list[RawTensor]) -> RawTensor:
    """Weights of one input stacked by rows (e.g. q, k, v) as one tensor; a single one as is."""
    if len(raws) == 1:
        return raws[0]
    first = raws[0]
    rows = sum(r.shape[0] for r in raws)
    name = "+".join(r.name for r in raws)
    return RawTensor(name, first.ggml_type, (rows, *first.shape[1:]), np.concatenate([r.data for r in raws]))


def hf_name_from_gguf(name: str) -> str | None:
    if m := _GGUF_BLOCK.match(name):
        layer, part, kind = m.groups()
        mapped = _GGUF_TO_HF.get(part)
        return f"model.layers.{layer}.{mapped}.{kind}" if mapped else None
    base, _, kind = name.rpartition(".")
    mapped = _GGUF_TO_HF.get(base)
    return f"{mapped}.{kind}" if mapped else None


def check_qk_rows(data: np.ndarray, n_head: int) -> None:
    rows = data.shape[0]
    if rows == 0 or rows % (2 * n_head):
        raise CheckpointError(f"a Q/K weight has {rows} rows, not a whole number of {n_head} heads")


def unpermute_qk_rows(data: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's converter, which reorders Q/K rows so RoPE rotates adjacent pairs.

    Row r of head h in llama.cpp order is (h, i, j) with i < d/2, j < 2; HF order is (h, j, i).
    Whole rows move, so this works on raw quantized rows as well as on float rows.
    """
    check_qk_rows(data, n_head)
    rows = data.shape[0]
    half = rows // n_head // 2
    return np.ascontiguousarray(data.reshape(n_head, half, 2, -1).swapaxes(1, 2).reshape(rows, -1))


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such file or directory: {path}")
    if path.is_dir():
        return _open_hf_dir(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise CheckpointError(
            f"{path.name}: pickle checkpoints are never loaded (they can run code); use a safetensors or GGUF file"
        )
    if path.suffix == ".safetensors" or path.name == "model.safetensors.index.json":
        return _open_hf_dir(path.parent)
    return _open_gguf(path)


# --- GGUF ---


def _open_gguf(path: Path) -> Checkpoint:
    gguf = GGUFFile(path)
    metadata = gguf.metadata
    config = config_from_gguf(metadata, has_output_tensor="output.weight" in gguf.tensors)

    tensors: dict[str, RawTensor] = {}
    for info in gguf.tensors.values():
        hf_name = hf_name_from_gguf(info.name)
        if hf_name is None:
            continue  # e.g. rope_freqs: llama.cpp extras we compute ourselves
        if not isinstance(info.ggml_type, GGMLQuantizationType):
            raise UnsupportedTensorType(f"tensor {shown(info.name)} has unknown GGML type id {info.ggml_type}")
        shape = tuple(reversed(info.shape))  # GGML lists dims innermost first
        data = gguf.tensor_bytes(info)
        qk_heads = {"attn_q.weight": config.num_heads, "attn_k.weight": config.num_kv_heads}.get(info.name.split(".", 2)[-1], 0)
        if qk_heads:
            check_qk_rows(data, qk_heads)
        tensors[hf_name] = RawTensor(hf_name, info.ggml_type, shape, data, qk_heads)
    _check_complete(path, config, tensors)
    return Checkpoint(path, "gguf", config, tensors, gguf_metadata=metadata, gguf_file=gguf)


# --- safetensors ---

# Own reader for the safetensors layout (8-byte header size, JSON header, raw data): numpy
# has no bfloat16, and the backends want the raw bytes memory-mapped, which the
# `safetensors` package only gives as framework tensors.
_ST_DTYPES = {
    "F32": GGMLQuantizationType.F32,
    "F16": GGMLQuantizationType.F16,
    "BF16": GGMLQuantizationType.BF16,
    "U32": MLX_PACKED,
}
_ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}


def _is_ints(value, n: int | None = None) -> bool:
    return isinstance(value, list) and (n is None or len(value) == n) and all(type(v) is int for v in value)


def read_safetensors(path: Path) -> dict[str, RawTensor]:
    """Checked as the safetensors library checks: a JSON object of entries whose data, one after
    another, fill the rest of the file exactly (https://github.com/huggingface/safetensors)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: truncated safetensors file")
        header_len = int.from_bytes(head, "little")
        if header_len > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path.name}: corrupt safetensors header (length {header_len})")
        # The header is "{...}" padded with spaces: check its ends before reading (and decoding)
        # what a corrupt length may make megabytes of tensor bytes.
        first = f.read(1)
        f.seek(8 + max(header_len - 8, 0))
        if first != b"{" or not f.read(min(header_len, 8)).rstrip(b" ").endswith(b"}"):
            raise CheckpointError(f"{path.name}: corrupt safetensors header (not a JSON object)")
        f.seek(8)
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, numbers of 4300+ digits, deep nesting
            raise CheckpointError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    blob = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and _is_ints(info.get("shape"))
                and _is_ints(info.get("data_offsets"), 2)):
            raise CheckpointError(f"{path.name}: corrupt safetensors entry for {shown(name)}")
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise UnsupportedTensorType(
                f"tensor {shown(name)} in {path.name} has dtype {shown(dtype)} (supported: {', '.join(_ST_DTYPES)})"
            )
        nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]  # Python ints: a hostile shape cannot wrap around
        if not (0 <= begin <= end <= size - data_start) or end - begin != nbytes or any(d < 0 for d in shape):
            raise CheckpointError(f"{path.name}: tensor {shown(name)} lies outside the file or has the wrong size")
        raw = blob[data_start + begin : data_start + end]
        rows = math.prod(shape[:-1])
        tensors[name] = RawTensor(name, _ST_DTYPES[dtype], shape, raw.reshape(rows, -1) if nbytes else raw.reshape(rows, 0))
    # In offset order, each tensor's data starts where the last one's ends, and the last ends at the
    # end of the file: a shifted header length or offset cannot pass for other tensors' bytes.
    position = 0
    for begin, end in sorted(info["data_offsets"] for info in header.values()):
        if begin != position:
            raise CheckpointError(f"{path.name}: corrupt safetensors header (tensor data overlaps or leaves a gap at byte {position})")
        position = end
    if position != size - data_start:
        raise CheckpointError(f"{path.name}: corrupt safetensors header ({size - data_start - position} bytes after the last tensor)")
    return tensors


def _open_hf_dir(path: Path) -> Checkpoint:
    config_path = path / "config.json"
    if not config_path.exists():
        if any(path.glob("*.gguf")):
            raise CheckpointError(f"{path} holds GGUF files: pass one of them with --model-path")
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        cfg = json.loads(config_path.read_text())
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{config_path}: not a JSON object")
    config = config_from_hf(cfg)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise CheckpointError(f"{index}: not a valid safetensors index") from None
    else:
        shards = [p.name for p in sorted(path.glob("*.safetensors"))]
    if not shards:
        if any(path.glob("*.bin")):
            raise CheckpointError(f"{path}: only pickle (.bin) weights, which are never loaded; use safetensors")
        raise CheckpointError(f"{path}: no *.safetensors weights")
    tensors: dict[str, RawTensor] = {}
    for shard in shards:
        shard_path = path / shard
        if not shard_path.exists():
            raise CheckpointError(f"{path}: shard {shard} named in the index is missing")
        tensors.update(read_safetensors(shard_path))
    _check_complete(path, config, tensors)
    return Checkpoint(path, "safetensors", config, tensors, hf_dir=path)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (q, c.hidden_size),
            p + "self_attn.k_proj.weight": (kv, c.hidden_size),
            p + "self_attn.v_proj.weight": (kv, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, q),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        }
    return shapes


def _check_complete(path: Path, config: ModelConfig, tensors: dict[str, RawTensor]) -> None:
    for name, shape in expected_shapes(config).items():
        if name not in tensors:
            raise CheckpointError(f"{path.name}: tensor '{name}' is missing")
        if tensors[name].is_mlx_packed:
            continue  # the MLX backend checks these shapes
        if tensors[name].shape != shape:
            raise CheckpointError(f"{path.name}: tensor '{name}' has shape {tensors[name].shape}, expected {shape}")

"""The torch weight handlers against the exact dequantized weights."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from backends.checkpoint import RawTensor
from backends.quants import dequantize
from backends.torch.weights import (
    GroupedLinear,
    Int4Linear,
    _pack_cpu_blocked,
    cpu_int4_layout_is_blocked,
    grouped_gemv,
    int4_works,
)
from test_quants import random_rows, to_torch

CPU = torch.device("cpu")


def raw_tensor(qtype, rows=128, blocks=4, seed=0):
    data = random_rows(qtype, rows, blocks, np.random.default_rng(seed))
    cols = data.shape[1] // {T.Q8_0: 34, T.Q4_0: 18, T.Q4_1: 20, T.Q5_0: 22, T.Q5_1: 24}.get(qtype, 1) * 32
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K, T.Q3_K):
        cols = blocks * 256
    return RawTensor("w", qtype, (rows, cols), data)


def exact(raw):
    return dequantize(to_torch(raw.data), raw.ggml_type)


def test_cpu_layout_is_the_one_we_write():
    assert cpu_int4_layout_is_blocked() and int4_works("cpu")
    q = torch.randint(0, 16, (192, 96), dtype=torch.uint8)
    assert torch.equal(_pack_cpu_blocked(q), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K, T.Q8_0, T.Q5_0, T.Q5_1, T.Q5_K], ids=lambda t: t.name)
def test_int4_planes_hold_the_weights(qtype):
    """Rows read back and products agree with the exact weights up to bf16 scales and activations."""
    raw = raw_tensor(qtype)
    w = exact(raw)
    layer = Int4Linear(raw, CPU)
    assert layer.planes == (1 if qtype in (T.Q4_0, T.Q4_1, T.Q4_K) else 2)
    ids = torch.tensor([0, 5, 63, 64, 127])
    scale = float(w.abs().max())
    torch.testing.assert_close(layer.rows(ids, torch.float32), w[ids], atol=0.01 * scale, rtol=0)
    x = torch.randn(3, w.shape[1])
    want = x @ w.t()
    torch.testing.assert_close(layer(x), want, atol=0.02 * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q3_K, T.Q2_K, T.Q8_0], ids=lambda t: t.name)
def test_grouped_int8_is_exact(qtype):
    raw = raw_tensor(qtype, rows=16, blocks=2)
    w = exact(raw)
    layer = GroupedLinear(raw, CPU)
    torch.testing.assert_close(layer.rows(torch.arange(16), torch.float32), w, atol=0, rtol=0)
    x = torch.randn(1, w.shape[1])
    torch.testing.assert_close(grouped_gemv(x, layer.q, layer.scale, layer.offset), x @ w.t(), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(layer(torch.cat([x, x])), torch.cat([x, x]) @ w.t(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.IQ3_S, T.IQ1_M, T.IQ4_XS], ids=lambda t: t.name)
def test_iq_types_load_and_run_exactly(qtype):
    from backends.torch.weights import GGMLLinear, linear

    data = random_rows(qtype, 16, 2, np.random.default_rng(int(qtype)))
    raw = RawTensor("blk.0.ffn_up.weight", qtype, (16, 512), data)
    module = linear([raw], torch.float32, CPU, keep_blocks=True)
    # IQ4_XS runs on the C kernels where they are built; the codebook types dequantize per matmul
    assert qtype == T.IQ4_XS or isinstance(module, GGMLLinear)
    x = torch.randn(3, 512)
    want = x.double() @ exact(raw).double().t()
    atol = (0.02 if qtype == T.IQ4_XS and not isinstance(module, GGMLLinear) else 1e-4) * float(want.abs().max())
    torch.testing.assert_close(module(x).double(), want, rtol=0, atol=atol)

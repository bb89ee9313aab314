"""backends/native/model.py: a GGUF on our C kernels without torch gives the torch backend's CPU
logits bit for bit (the same kernels in the same order), whatever the file's types, NoPE layers
and Q/K row order; a prompt's logits do not depend on how it is split; the cache grows keeping
what it holds; and a file it cannot run whole is refused with the reason."""

import numpy as np
import pytest

from backends.checkpoint import open_checkpoint
from backends.native import library
from backends.native.model import NativeModel, NotNative
from conftest import TINY_HF, tiny_gguf

pytestmark = pytest.mark.skipif(library.library() is None, reason="no C compiler with OpenMP")


def native(path) -> NativeModel:
    return NativeModel(open_checkpoint(path), library.library(), threads=2)


def torch_logits(path, ids: list[int]) -> np.ndarray:
    import torch

    from backends.torch.loader import load_model

    model = load_model(open_checkpoint(path), torch.float32, torch.device("cpu"))
    return model(torch.tensor(ids), 0).numpy()


IDS = [1, 17, 256, 3, 99, 42, 7, 311, 5, 64, 128, 2, 33, 250, 9, 11, 300, 4, 77]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K_M"])
def test_logits_are_the_torch_backends_bit_for_bit(qtype):
    path = tiny_gguf(qtype)
    np.testing.assert_array_equal(native(path).forward(IDS, 0), torch_logits(path, IDS))


def test_the_real_smollm2_gives_the_torch_backends_logits(smollm2_gguf):
    ids = IDS[:9]
    np.testing.assert_array_equal(native(smollm2_gguf).forward(ids, 0, last_only=True), torch_logits(smollm2_gguf, ids)[-1:])


@pytest.mark.parametrize("chunks", [[19], [1] * 19, [5, 1, 13], [16, 3]])
def test_a_prompt_split_anyhow_gives_the_same_logits(chunks):
    whole = native(tiny_gguf("Q4_K_M")).forward(IDS, 0)
    model, pos, rows = native(tiny_gguf("Q4_K_M")), 0, []
    for n in chunks:
        rows.append(model.forward(IDS[pos : pos + n], pos))
        pos += n
    np.testing.assert_array_equal(np.concatenate(rows), whole)


def test_the_cache_grows_keeping_what_it_holds():
    ids = [(i * 37) % 300 + 1 for i in range(70)]
    model = native(tiny_gguf("Q8_0"))
    model.ensure_capacity(64, exact=True)
    first = model.forward(ids[:64], 0)
    assert model.capacity == 64
    last = model.forward(ids[64:], 64)  # past the capacity: the cache grows, the past stays
    assert model.capacity > 64
    np.testing.assert_array_equal(np.concatenate([first, last]), native(tiny_gguf("Q8_0")).forward(ids, 0))


def test_a_file_with_weights_the_kernels_do_not_multiply_is_refused_with_its_name():
    with pytest.raises(NotNative, match=r"model\.layers\.0\.self_attn\.q_proj\.weight is F16"):
        native(tiny_gguf("F16"))


def test_a_safetensors_directory_is_refused():
    with pytest.raises(NotNative, match="runs GGUF files"):
        native(TINY_HF)

"""The peers, as adapters for app.bench's measuring loop: llama.cpp and transformers.

Run as `python bench/engines.py SPEC.json OUT.json` in a fresh process (PYTHONPATH holding
the checkout and, for llama.cpp, bench/.deps): one prompt length, one engine, one model.
Every engine gets the same token ids and makes exactly n tokens greedily (EOS ignored).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.bench import Spec, measure  # noqa: E402
from backends.numbers import find_multiple  # noqa: E402


class LlamaCppAdapter:
    """llama-cpp-python's Llama, fed token ids through `eval`; greedy is an argmax over the last
    logits (no sampler chain), so llama.cpp pays no Python sampling overhead: as llama-bench."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.llm = None
        self.tokens: list[int] = []
        self.n_ctx = find_multiple(len(spec.prompt_ids) + spec.n_gen + 16, 256)

    def load(self) -> None:
        import llama_cpp

        t = self.spec.threads or 2
        self.llm = llama_cpp.Llama(self.spec.model_path, n_ctx=self.n_ctx, n_threads=t, n_threads_batch=t,
                                   logits_all=False, verbose=False)

    def _argmax_last(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(logits.argmax())

    def generate(self, ids: list[int], n: int) -> tuple[float, float, int]:
        llm = self.llm
        llm.reset()  # n_tokens = 0: eval drops the cached keys and values from there
        t0 = time.perf_counter()
        llm.eval(ids)
        tokens = [self._argmax_last()]
        t1 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval(tokens[-1:])
            tokens.append(self._argmax_last())
        self.tokens = tokens
        return t1 - t0, time.perf_counter() - t1, n - 1

    def describe(self) -> dict:
        import llama_cpp

        return {"engine": "llamacpp", "version": llama_cpp.__version__, "n_ctx": self.n_ctx,
                "threads": self.spec.threads or 2, "system_info": llama_cpp.llama_print_system_info().decode()}


class TransformersAdapter:
    """transformers as users run a GGUF: `from_pretrained(dir, gguf_file=...)` (dequantizes on load),
    the tokenizer too (llama.cpp and ours load theirs), `generate` with a streamer that timestamps."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.model = None
        self.tokens: list[int] = []

    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(self.spec.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        self.model.eval()

    def generate(self, ids: list[int], n: int) -> tuple[float, float, int]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):
            def __init__(self):
                self.times = []

            def put(self, value):  # first call: the prompt; then one call per new token
                self.times.append(time.perf_counter())

            def end(self):
                pass

        stamps = Stamps()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None, top_p=None,
                                top_k=None, streamer=stamps, pad_token_id=self.tokenizer.eos_token_id)
        self.tokens = out[0, len(ids) :].tolist()
        first, last = stamps.times[1], stamps.times[-1]
        return first - t0, last - first, len(stamps.times) - 2

    def describe(self) -> dict:
        import torch
        import transformers

        return {"engine": "transformers", "version": transformers.__version__, "torch": torch.__version__,
                "dtype": str(self.model.dtype), "threads": torch.get_num_threads()}


ADAPTERS = {"llamacpp": LlamaCppAdapter, "transformers": TransformersAdapter}


def main(spec_path: str, out_path: str) -> int:
    spec = Spec(**json.loads(Path(spec_path).read_text()))
    t0 = time.perf_counter()
    if spec.engine == "llamacpp":
        import llama_cpp  # noqa: F401
    else:
        import torch
        import transformers  # noqa: F401

        if spec.threads:
            torch.set_num_threads(spec.threads)
    import_s = time.perf_counter() - t0
    sample = measure(ADAPTERS[spec.engine](spec), spec, import_s)
    Path(out_path).write_text(json.dumps(asdict(sample)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))

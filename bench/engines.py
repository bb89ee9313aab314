"""transformers as a peer, an adapter for app.bench's measuring loop (llama.cpp's adapter lives
in app/bench_measure.py, where `smollm3 bench --compare llama.cpp` uses it too).

Run as `python bench/engines.py SPEC.json OUT.json` in a fresh process (PYTHONPATH holding
the checkout and, for llama.cpp, bench/.deps): one prompt length, one engine, one model.
Every engine gets the same token ids and makes exactly n tokens greedily (EOS ignored).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.bench import Spec  # noqa: E402
from app.bench_measure import ADAPTERS, run_worker  # noqa: E402


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


if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1], sys.argv[2], {**ADAPTERS, "transformers": TransformersAdapter}))

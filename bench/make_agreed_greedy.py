"""Make tests/fixtures/smollm2-135m-agreed.json: greedy tokens of the exact reference (every
weight dequantized per matmul, f32: SMOLLM3_KERNELS=reference) and of llama.cpp on chat prompts
for the real SmolLM2-135M Q4_1, with each prompt's smallest lead of the chosen token over the
runner-up in the reference's logits: where that lead is large, int8 activations (ours and
llama.cpp's) cannot flip a token, so every kernel path must give the reference's tokens.

    python bench/make_agreed_greedy.py   (llama-cpp-python from bench/.deps, see deps.py)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "scripts"))
from fetch_smollm2 import smollm2_gguf_path  # noqa: E402

OUT = BENCH.parent / "tests" / "fixtures" / "smollm2-135m-agreed.json"
EARLIER = OUT.with_name("smollm2-135m-greedy.json")  # llama.cpp's tokens from a build that ran
N = 16
PROMPTS = [
    "What is the capital of France?",
    "List three colours of the rainbow.",
    "Translate 'good morning' into Spanish.",
    "Name a famous physicist and one of their discoveries.",
    "Give me a short haiku about autumn leaves.",
    "Write a Python function that returns the factorial of n.",
    "Explain in two sentences why the sky is blue.",
    "What is photosynthesis?",
    "How many days are there in a leap year?",
    "Write a short poem about the sea.",
    "What are the three primary colors?",
    "Give me three tips for staying healthy.",
    "What does a CPU do in a computer?",
    "Describe a cat in one sentence.",
    "What is the boiling point of water at sea level?",
]

LLAMA = """
import json, sys
import numpy as np, llama_cpp
path, cases, n = sys.argv[1], json.loads(sys.stdin.read()), int(sys.argv[2])
llm = llama_cpp.Llama(path, n_ctx=512, n_threads=2, n_threads_batch=2, logits_all=False, verbose=False)
out = []
for ids in cases:
    llm.reset()
    llm.eval(ids)
    tokens = []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        tokens.append(int(logits.argmax()))
        llm.eval(tokens[-1:])
    out.append(tokens)
print(json.dumps(out))
"""


def reference_checked(fast, exact, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """The exact reference's greedy continuation and each step's lead, from one forward pass:
    our default kernels propose the tokens, one reference forward over prompt + proposal checks
    each is the reference's argmax, and the proposal is cut at the first one that is not (the
    reference's own choice taken there). Greedy is a function of the prefix, so this is the
    reference's continuation, at one reference forward instead of n."""
    import numpy as np

    from backends.sampling import GREEDY

    proposal = list(fast.generate(prompt_ids, n, GREEDY))
    logits = exact.logits(prompt_ids + proposal)[len(prompt_ids) - 1 :]
    tokens, leads = [], []
    for step, row in enumerate(logits[:n]):
        top2 = np.argsort(row)[-2:]
        tokens.append(int(top2[1]))
        leads.append(round(float(row[top2[1]] - row[top2[0]]), 3))
        if step >= len(proposal) or tokens[-1] != proposal[step]:
            break
    return tokens, leads


def main() -> None:
    sys.path.insert(0, str(BENCH.parent))
    import backends
    from deps import env_with

    path = smollm2_gguf_path()
    engine = backends.load(path, backend="torch")
    os.environ["SMOLLM3_KERNELS"] = "reference"  # read when a model is built
    exact = backends.load(path, backend="torch")
    os.environ.pop("SMOLLM3_KERNELS")
    prompt_ids = [
        engine.tokenizer.encode(engine.chat_template.render([{"role": "user", "content": p}], add_generation_prompt=True))
        for p in PROMPTS
    ]
    llama = subprocess.run([sys.executable, "-c", LLAMA, str(path), str(N)], input=json.dumps(prompt_ids),
                           capture_output=True, text=True, env=env_with("llamacpp"), timeout=600)
    if llama.returncode:  # a build that crashes on this CPU (seen: AMX_INT8 builds, SIGSEGV in decode)
        print(f"llama.cpp failed ({llama.returncode}): its column comes from {EARLIER.name} where it has the prompt", file=sys.stderr)
    earlier = {c["prompt"]: c["llamacpp"][:N] for c in json.loads(EARLIER.read_text())}
    llamacpp = json.loads(llama.stdout) if llama.returncode == 0 else [earlier.get(p) for p in PROMPTS]
    cases = []
    for prompt, ids, theirs in zip(PROMPTS, prompt_ids, llamacpp):
        tokens, leads = reference_checked(engine, exact, ids, N)
        cases.append({
            "prompt": prompt, "prompt_ids": ids, "reference": tokens, "reference_leads": leads, "llamacpp": theirs,
            "agree": None if theirs is None else tokens == theirs[: len(tokens)], "text": engine.tokenizer.decode(tokens),
        })
        print(prompt, cases[-1]["agree"], min(leads), repr(cases[-1]["text"]), flush=True)
        OUT.write_text(json.dumps(cases, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Prompt-lookup speculation (backends/speculative.py) against plain decoding and against
llama.cpp's plain decoding, on the tasks where it matters: summarize a pasted text, edit a
pasted code file, answer about a pasted document.

    python bench/speculative.py                      # SmolLM2-135M Q4_1, ours plain and speculative, 3 runs
    python bench/speculative.py --model-path F.gguf --runs 5 --tokens 200

bench/run.py runs the same measurement in fresh processes (`--worker`), ours and then
llama.cpp on the token ids ours rendered. Each task is one greedy generation of a fixed
number of tokens (EOS ignored) from a fresh cache; ours alternates speculation off and on,
so load on the machine falls on both alike. Decode tokens/s counts the tokens after the
first. The pasted texts are excerpts of this repository's own files, kept in
bench/speculative_tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Excerpts of this repository's README and backends/speculative.py as they were on 2026-12-02,
# frozen so that the tasks stay the same tasks when those files change.
TASK_TEXTS = Path(__file__).resolve().parent / "speculative_tasks"
sys.path.insert(0, str(ROOT))

from app.bench_measure import ADAPTERS, Spec, import_engine  # noqa: E402


def pasted(name: str) -> str:
    return (TASK_TEXTS / name).read_text()


TASKS = {
    "summarize": lambda: "Summarize this text in a few sentences, reusing its wording:\n\n" + pasted("summarize.md"),
    "edit code": lambda: "Rename `enabled` to `speculation_enabled` in this file and give back the whole file:\n\n```python\n"
    + pasted("edit_code.py.txt") + "\n```",
    "document QA": lambda: pasted("document_qa.md") + "\n\nAccording to the document above, how do you run a one-shot prompt? Quote the command.",
}


def task_prompts(engine) -> dict[str, list[int]]:
    """Each task as a user turn in the model's chat template, as token ids."""
    render = engine.chat_template.render
    return {name: engine.tokenizer.encode(render([{"role": "user", "content": make()}], add_generation_prompt=True))
            for name, make in TASKS.items()}


def run_tasks(spec: Spec, prompts: dict[str, list[int]] | None, runs: int, progress=print) -> dict:
    """One engine: each task `runs` times (ours: plain then speculative, alternating).

    prompts: the token ids per task (None: ours renders them). Returns per task and mode the
    median decode tok/s, all runs, the tokens, and for ours the drafted and accepted counts."""
    import_engine(spec)
    adapter = ADAPTERS[spec.engine](spec)
    adapter.load()
    prompts = prompts or task_prompts(adapter.engine)
    first = next(iter(prompts.values()))
    adapter.generate(first[:32], 2)  # warm-up: one-time costs of the first forwards
    modes = ("plain", "speculative") if spec.engine == "ours" else ("plain",)
    out = {}
    for name, ids in prompts.items():
        speeds: dict[str, list[float]] = {m: [] for m in modes}
        task = {"ids": ids, "prompt_len": len(ids)}
        for _ in range(runs):
            for mode in modes:
                os.environ["SMOLLM3_SPECULATE"] = "1" if mode == "speculative" else "0"
                _, decode_s, tokens_after_first = adapter.generate(ids, spec.n_gen)
                speeds[mode].append(tokens_after_first / decode_s)
                entry = task.setdefault(mode, {"tokens": list(adapter.tokens)})
                if entry["tokens"] != adapter.tokens:
                    raise RuntimeError(f"{name}: two greedy runs of {spec.engine} {mode} made different tokens")
                if spec.engine == "ours":
                    stats = adapter.engine.stats
                    entry.update(drafted=stats.drafted_tokens, accepted=stats.accepted_tokens,
                                 forwards=stats.decode_steps)
                progress(f"{name}, {mode}: {speeds[mode][-1]:.2f} tok/s")
        for mode in modes:
            task[mode].update(decode_tok_s=statistics.median(speeds[mode]), decode_all=speeds[mode])
        if spec.engine == "ours":
            task["identical"] = task["plain"]["tokens"] == task["speculative"]["tokens"]
        out[name] = task
    return {"engine_info": adapter.describe(), "tasks": out}


def worker(spec_path: str, out_path: str) -> int:
    from app.bench_measure import report_progress

    job = json.loads(Path(spec_path).read_text())
    spec = Spec(**job["spec"])
    result = run_tasks(spec, job["prompts"], job["runs"], progress=report_progress)
    Path(out_path).write_text(json.dumps(result))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    spec = Spec("ours", args.model_path, [], 0, 0, args.tokens, args.runs, args.threads)
    result = run_tasks(spec, None, args.runs)
    print("| task | prompt | plain tok/s | speculative tok/s | ratio | accepted / drafted | forwards | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for name, t in result["tasks"].items():
        plain, spec_ = t["plain"], t["speculative"]
        print(f"| {name} | {t['prompt_len']} | {plain['decode_tok_s']:.1f} | {spec_['decode_tok_s']:.1f} | "
              f"{spec_['decode_tok_s'] / plain['decode_tok_s']:.2f}x | {spec_['accepted']} / {spec_['drafted']} | "
              f"{spec_['forwards']} | {'yes' if t['identical'] else 'NO'} |")
    if not all(t["identical"] for t in result["tasks"].values()):
        sys.exit("speculation changed the output")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2], sys.argv[3]))
    main()

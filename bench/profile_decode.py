"""Where one decode step of our torch engine spends its time: torch.profiler's op table.

    python bench/profile_decode.py bench/models/smollm3-3b-random-Q4_K_M.gguf [-p 32] [--steps 4]

Loads the model, prefills a prompt of the harness's text, warms up the decode path, then
profiles a few single-token forward passes and prints ops by self CPU time, plus the share
of the step spent outside torch ops (Python, the engine loop).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("-p", "--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    import backends
    from app.bench import prompt_ids_for

    torch.set_num_threads(args.threads)
    engine = backends.load(args.model, backend="torch")
    ids = prompt_ids_for(args.model, args.prompt_len)
    engine.forward(ids, 0, last_only=True)
    pos = len(ids)
    token = ids[-1]
    for _ in range(3):  # warm-up: compiled kernels, KV cache growth
        engine.forward([token], pos, last_only=True)
        pos += 1
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            logits = engine.forward([token], pos, last_only=True)
            token = int(logits[-1].argmax())
            pos += 1
        wall = (time.perf_counter() - t0) / args.steps
    averages = prof.key_averages(group_by_input_shape=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    ops_s = sum(e.self_cpu_time_total for e in averages) / 1e6 / args.steps
    print(f"decode step: {wall * 1e3:.1f} ms wall (profiled), {ops_s * 1e3:.1f} ms in torch ops "
          f"({ops_s / wall:.0%}); weight type {engine.info.weight_type}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

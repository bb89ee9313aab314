"""One-shot mode (`smollm3 --prompt`): the answer streamed to stdout, statistics to stderr."""

from __future__ import annotations

import argparse
import signal
import sys

import backends
from backends import SamplingParams, SmolLMError

from .session import ChatSession, ThinkingSplitter

DIM, RESET = "\x1b[2m", "\x1b[0m"


class InterruptedAnswer(KeyboardInterrupt):
    """Ctrl-C after the answer had begun: its output is ended and its statistics printed."""


def print_stats(stats: backends.GenerationStats) -> None:
    """Like llama-cli: prompt and generation speed, on stderr (after Ctrl-C too)."""
    if stats.prompt_tokens:
        rate = stats.prompt_tokens / stats.prefill_s if stats.prefill_s else 0
        print(f"{stats.prompt_tokens:4} prompt tokens processed: {rate:.2f} token/s", file=sys.stderr)
    # A remote server that reports no usage: its pieces counted here, the network in the times.
    counted = " (counted here)" if getattr(stats, "counted_by", "") == "client" else ""
    print(f"{stats.generated_tokens:4} tokens generated: {stats.decode_tok_s:.2f} token/s{counted}", file=sys.stderr)


def run_prompt(args: argparse.Namespace, prompt: str, engine: backends.Engine, use_template: bool,
               sampling: SamplingParams) -> int:
    session = ChatSession(engine, thinking=args.thinking, use_template=use_template, system_prompt=args.system)
    if args.thinking and not session.supports_thinking:
        print(f"smollm3: note: {engine.info.checkpoint} has no thinking mode; --thinking does nothing",
              file=sys.stderr)
        session.thinking = False
    tty = sys.stdout.isatty()
    splitter = ThinkingSplitter()
    out = sys.stdout

    shown = False

    def show(text: str):
        nonlocal shown
        shown = True
        if not tty:
            out.write(text)
        else:
            for kind, piece in splitter.feed(text):
                out.write(f"{DIM}{piece}{RESET}" if kind == "think" else piece)
        out.flush()

    try:
        for text in session.reply(prompt, args.sample_len, sampling, split_prompt=args.split_prompt):
            show(text)
    except SmolLMError:
        if shown:  # a stream cut mid-answer: the partial answer keeps its line, the error gets its own
            end_output(tty, splitter)
        raise
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the statistics
        end_output(tty, splitter)
        print_stats(engine.stats)
        raise InterruptedAnswer from None
    end_output(tty, splitter)
    s = engine.stats
    print_stats(s)
    if s.stop_reason == "context":
        print("smollm3: stopped: the context is full", file=sys.stderr)
    if s.generated_tokens == 0 and s.stop_reason == "eos":
        hint = " (without the chat template an instruct model often does)" if not use_template else ""
        print(f"smollm3: the model ended its answer at once: its first token was end-of-text{hint}", file=sys.stderr)
    return 0


def end_output(tty: bool, splitter: ThinkingSplitter) -> None:
    out = sys.stdout
    if tty:
        for kind, piece in splitter.flush():
            out.write(f"{DIM}{piece}{RESET}" if kind == "think" else piece)
        out.write(RESET)  # Ctrl-C can land inside a dimmed write: never leave the terminal dim
    out.write("\n")
    out.flush()

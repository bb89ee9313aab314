"""`smollm3 serve`: an OpenAI-compatible HTTP server (chat completions with SmolLM3's thinking
and tool calls, raw completions, models, health) on one engine."""

from .main import serve_main

__all__ = ["serve_main"]

"""The status line: context use, the answer's progress and speeds, the model, the device and
the sampling settings, fitted to the width by priority (a part is shortened or left out,
never cut)."""

from __future__ import annotations

import re

from textual.reactive import reactive
from textual.widgets import Static

from backends import Engine, GenerationStats

from .worker import Settings

SEP = " · "
# Parts from the first to go (or shorten) to the last, when the line does not fit.
GIVE_UP_ORDER = ("settings", "stats", "settings", "device", "stats", "model", "stats")


def device_name(engine: Engine) -> str:
    """`torch cpu`, `torch cuda:0`, `mlx gpu` (MLX writes its devices as `Device(gpu, 0)`); for a
    remote engine its host and the server's kind: `gpu-box:8000 vllm`."""
    i = engine.info
    if "dialect" in i.extra:
        return f"{i.device} {i.extra['dialect']}"
    device = re.sub(r"Device\((\w+), \d+\)", r"\1", i.device)
    return f"{i.backend} {device}"


def model_name(engine: Engine) -> str:
    i = engine.info
    name = i.checkpoint.removesuffix(".gguf")
    return name if i.weight_type.lower() in name.lower() else f"{name} {i.weight_type}"


def model_record(engine: Engine) -> str:
    """What the history records as the chat's model: a remote one with the endpoint that served it."""
    i = engine.info
    endpoint = i.extra.get("endpoint")
    return f"{i.checkpoint} at {endpoint}" if endpoint else i.checkpoint


def settings_text(settings: Settings) -> list[str]:
    s = settings.sampling
    long = [f"temp {s.temperature:g}"]
    short = [f"T{s.temperature:g}"]
    if s.top_p is not None:
        long.append(f"top-p {s.top_p:g}")
        short.append(f"p{s.top_p:g}")
    if s.top_k is not None:
        long.append(f"top-k {s.top_k}")
        short.append(f"k{s.top_k}")
    long.append(f"max {settings.max_new_tokens}")
    short.append(f"n{settings.max_new_tokens}")
    return [", ".join(long), " ".join(short), ""]


def stats_text(stats: GenerationStats | None, live: str) -> list[str]:
    if live:
        return [live, live, live, ""]
    if stats is None or not stats.prompt_tokens:
        return [""]
    return [
        f"prefilled {stats.prefilled_tokens} of {stats.prompt_tokens} tok, {stats.prefill_tok_s:.0f} tok/s"
        f"{SEP}generated {stats.generated_tokens}, {stats.decode_tok_s:.1f} tok/s",
        f"prefill {stats.prefilled_tokens}/{stats.prompt_tokens} {stats.prefill_tok_s:.0f} tok/s"
        f"{SEP}{stats.generated_tokens} tok {stats.decode_tok_s:.1f} tok/s",
        f"{stats.generated_tokens} tok {stats.decode_tok_s:.1f} tok/s",
        "",
    ]


def status_parts(
    engine: Engine | None,
    context_used: int | None,
    stats: GenerationStats | None,
    settings: Settings | None = None,
    live: str = "",
) -> dict[str, list[str]]:
    """Each part's forms, the fullest first ("" leaves it out)."""
    if engine is None:
        return {"loading": ["loading the model…"]}
    used = "?" if context_used is None else str(context_used)
    config = getattr(engine, "config", None)  # a remote server does not say its context size
    return {
        "ctx": [f"ctx {used}/{config.context_length}" if config else f"ctx {used}"],
        "stats": stats_text(stats, live),
        "model": [model_name(engine), ""],
        "device": [device_name(engine), ""],
        "settings": settings_text(settings) if settings else [""],
    }


def fit(parts: dict[str, list[str]], width: int | None = None) -> str:
    """The parts joined, shortened in GIVE_UP_ORDER until the line is at most `width` long."""
    level = {name: 0 for name in parts}

    def line() -> str:
        return SEP.join(t for name, forms in parts.items() if (t := forms[level[name]]))

    for name in GIVE_UP_ORDER:
        if width is None or len(line()) <= width:
            break
        if name in parts and level[name] + 1 < len(parts[name]):
            level[name] += 1
    return line()


def status_text(engine, context_used, stats, settings=None, live="", width=None) -> str:
    return fit(status_parts(engine, context_used, stats, settings, live), width)


class StatusLine(Static):
    """Bound to the chat screen's state (data_bind): it renders again when any of it changes,
    and fits the line to its width each time."""

    engine: reactive[Engine | None] = reactive(None)
    load_failed = reactive(False)
    context_used: reactive[int | None] = reactive(0)
    stats: reactive[GenerationStats | None] = reactive(None)
    settings: reactive[Settings | None] = reactive(None)
    live = reactive("")

    def render(self) -> str:
        if self.load_failed:
            return "the model did not load"
        return status_text(self.engine, self.context_used, self.stats, self.settings, self.live, self.content_size.width)

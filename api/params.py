"""The settings both OpenAI endpoints share: token caps, sampling, stop strings, streaming, `n`,
reasoning (`reasoning_effort`, `chat_template_kwargs.enable_thinking`), and the fields we do not
implement. Each is validated on its own, and anything wrong or
unsupported is a 400 that names its field (never silently ignored)."""

from __future__ import annotations

from typing import Any

from api.errors import ApiError
from queueing.options import Options
from replica.wire.messages import CheckpointDefaults, Decoding, SamplingParams

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed")
MAX_STOPS = 4
MAX_SEED = 2**63 - 1
MAX_N = 128  # OpenAI's bound on `n`; a replica refuses more than it can decode at once
# OpenAI's reasoning_effort as thinking budgets (most thought tokens; README, Reasoning models):
# none closes the think block at once; each step up allows about four times the thought.
EFFORT_BUDGETS: dict[str, int] = {
    "none": 0,
    "minimal": 256,
    "low": 1024,
    "medium": 4096,
    "high": 16384,
}
# Fields we do not implement, with the values that mean "off" (accepted as if absent).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (False,),
    "suffix": ("",),
    "best_of": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
}


def parse_options(body: dict[str, Any], greedy_unless_set: bool) -> Options:
    """`greedy_unless_set`: a body with no sampling field decodes greedily (the course's path
    on /v1/completions); otherwise OpenAI's default temperature, 1, applies."""
    refuse_unsupported(body)
    n = _integer(body, "n", 1, MAX_N) or 1  # null means the default, 1
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = _integer(body, name, 1)
    stream = _flag(body, "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object.", "stream_options")
    usage = stream and _flag(stream_options, "include_usage", "stream_options")
    decoding = Decoding(
        parse_sampling(body, greedy_unless_set),
        parse_stop(body),
        checkpoint_defaults(body, greedy_unless_set),
    )
    return Options(max_tokens, decoding, stream, usage, n, *parse_reasoning(body))


def parse_reasoning(body: dict[str, Any]) -> tuple[bool | None, int | None]:
    """(enable_thinking, thinking budget): chat_template_kwargs' `enable_thinking` (vLLM's; its
    other keys are not read) and the budget `reasoning_effort` names (OpenAI's); None where
    absent. A model that cannot think ignores both (the replica's business)."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ApiError(400, "'chat_template_kwargs' must be an object.", "chat_template_kwargs")
    enabled = kwargs.get("enable_thinking")
    if enabled is not None and not isinstance(enabled, bool):
        message = "'chat_template_kwargs.enable_thinking' must be true or false."
        raise ApiError(400, message, "chat_template_kwargs")
    effort = body.get("reasoning_effort")
    if effort is not None and (not isinstance(effort, str) or effort not in EFFORT_BUDGETS):
        efforts = ", ".join(EFFORT_BUDGETS)
        raise ApiError(400, f"'reasoning_effort' must be one of {efforts}.", "reasoning_effort")
    return enabled, None if effort is None else EFFORT_BUDGETS[effort]


def refuse_unsupported(body: dict[str, Any]) -> None:
    for name, off in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == neutral for neutral in off):
            raise ApiError(400, f"'{name}' is not supported by this server.", name)


def checkpoint_defaults(body: dict[str, Any], greedy_unless_set: bool) -> CheckpointDefaults:
    """Whether the checkpoint's generation_config may replace the request's sampling: never
    once it sets temperature, top_p or top_k (vLLM applies the checkpoint's values only where
    the request is silent); on the course path (greedy unless set) only for a model that
    thinks (its cards warn that greedy decoding loops); elsewhere always."""
    if any(body.get(name) is not None for name in ("temperature", "top_p", "top_k")):
        return "never"
    return "thinking" if greedy_unless_set else "always"


def parse_sampling(body: dict[str, Any], greedy_unless_set: bool) -> SamplingParams | None:
    """None (greedy) at temperature 0."""
    unset = not any(body.get(name) is not None for name in SAMPLING_FIELDS)
    default_temperature = 0.0 if greedy_unless_set and unset else 1.0
    temperature = _number(body, "temperature", 0.0, 2.0, default_temperature)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "'top_p' must be in (0, 1].", "top_p")
    top_k = _integer(body, "top_k", -1) or 0
    seed = _integer(body, "seed", 0, MAX_SEED)
    if temperature == 0.0:
        return None
    return SamplingParams(temperature, top_p, max(top_k, 0), seed)


def parse_stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ApiError(
            400,
            f"'stop' must be a string or a list of up to {MAX_STOPS} non-empty strings.",
            "stop",
        )
    return tuple(stops)


def _number(body: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number from {low:g} to {high:g}.", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"at least {low}" if high is None else f"from {low} to {high}"
        raise ApiError(400, f"'{name}' must be an integer {bound}.", name)
    return value


def _flag(body: dict[str, Any], name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false.", param or name)
    return bool(value)

"""The OpenAI contract at the HTTP edge: request parsing and validation (a 400 naming the
field for anything wrong or unsupported) and the response bodies. Error plumbing is
http_errors'.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from api.errors import ApiError
from api.params import parse_options
from queueing.options import Options
from replica.wire.messages import Chat, Usage
from shortcuts import Reply

CHAT_ROLES = ("system", "user", "assistant")
THOUGHT_FIELDS = ("reasoning", "reasoning_content")  # a past turn's thought: read, then dropped


@dataclass(frozen=True)
class CompletionRequest:
    """What we honour of a completions request: its prompts and options."""

    prompts: list[str]
    options: Options = field(default_factory=Options)


@dataclass(frozen=True)
class ChatRequest:
    """What we honour of a chat completions request: its messages, as given, and options."""

    messages: Chat
    options: Options = field(default_factory=Options)


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """Validate a request body; every way it can be wrong is a 400 naming the field. Without
    sampling fields it decodes greedily (the course's path)."""
    body = _json_object(raw)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings.", "prompt")
    if not all(isinstance(item, str) for item in prompts):
        raise ApiError(
            400,
            "'prompt' must contain only strings (token-id prompts are not supported).",
            "prompt",
        )
    return CompletionRequest(prompts, parse_options(body, greedy_unless_set=True))


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Validate a chat body: text messages from system, user or assistant (a content list
    may hold text parts only); OpenAI's default temperature, 1."""
    body = _json_object(raw)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list.", "messages")
    chat = [_chat_message(message) for message in messages]
    return ChatRequest(chat, parse_options(body, greedy_unless_set=False))


def _chat_message(message: Any) -> dict[str, str]:
    """The turn the template renders: role and text. An assistant turn's past thought
    (`reasoning` or `reasoning_content`) must be text and is dropped (Qwen3's templates drop
    past thoughts anyway)."""
    if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
        raise ApiError(
            400, f"Each message needs a 'role' among {', '.join(CHAT_ROLES)}.", "messages"
        )
    for name in THOUGHT_FIELDS:
        if not isinstance(message.get(name, ""), str | None):
            raise ApiError(400, f"A message's '{name}' must be text.", "messages")
    content = message.get("content")
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ApiError(400, "Each message's 'content' must be text.", "messages")
    return {"role": message["role"], "content": content}


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ApiError(400, f"The request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def completion_body(model: str, prompts: list[str], replies: list[Reply]) -> dict[str, Any]:
    """A `text_completion` object: n replies per prompt, choice i * n + j being prompt i's
    sample j. Each choice also carries the prompt it answers, verbatim, as the course's
    example output does (its graders match answers to prompts; OpenAI clients ignore the extra
    field)."""
    n = len(replies) // len(prompts)
    return {
        **envelope("cmpl", "text_completion", model),
        "choices": [
            {
                "index": i,
                "prompt": prompts[i // n],
                "text": reply.text,
                "logprobs": None,
                "finish_reason": reply.finish_reason,
            }
            for i, reply in enumerate(replies)
        ],
        "usage": usage_body(sum((reply.usage for reply in replies), Usage())),
    }


def envelope(id_prefix: str, kind: str, model: str) -> dict[str, Any]:
    """The fields every response object starts with."""
    return {
        "id": f"{id_prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
    }


def usage_body(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage; `completion_tokens_details.reasoning_tokens` counts the thought tokens
    (also in completion_tokens), 0 when the model did not think."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def chat_body(model: str, replies: list[Reply]) -> dict[str, Any]:
    """A `chat.completion` object with the assistant's messages, one choice per sample; a
    message whose model thought carries the thought as `reasoning` and `reasoning_content`
    (vLLM's names, new and old)."""
    return {
        **envelope("chatcmpl", "chat.completion", model),
        "choices": [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": reply.text,
                    **({} if reply.reasoning is None else thought(reply.reasoning)),
                },
                "logprobs": None,
                "finish_reason": reply.finish_reason,
            }
            for i, reply in enumerate(replies)
        ],
        "usage": usage_body(sum((reply.usage for reply in replies), Usage())),
    }


def thought(text: str) -> dict[str, str]:
    """A thought in a message or delta, under both names clients read (vLLM's `reasoning` and
    its earlier `reasoning_content`, DeepSeek's)."""
    return {"reasoning": text, "reasoning_content": text}


class Chunks:
    """The objects of one streamed response: `text_completion` pieces, or for chat
    `chat.completion.chunk` deltas (the first delta of a choice names its role), all under one
    id, then a usage chunk whose choices are empty."""

    def __init__(self, model: str, chat: bool) -> None:
        self.chat = chat
        kind = ("chatcmpl", "chat.completion.chunk") if chat else ("cmpl", "text_completion")
        self.base = envelope(*kind, model)
        self.started: set[int] = set()

    def piece(
        self, index: int, text: str, finish_reason: str | None, reasoning: bool = False
    ) -> dict[str, Any]:
        """One chunk of choice `index`: for chat, thought text (`reasoning`) goes as
        `reasoning` and `reasoning_content`, answer text as `content`."""
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            delta = thought(text) if reasoning else {"content": text}
            if index not in self.started:
                delta = {"role": "assistant", **delta}
            choice["delta"] = delta
            self.started.add(index)
        else:
            choice["text"] = text
        return {**self.base, "choices": [choice]}

    def usage(self, usage: Usage) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": usage_body(usage)}


def models_body(model: str) -> dict[str, Any]:
    """`/v1/models`: the one model this server serves."""
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": 0, "owned_by": "qwen3-server"}],
    }

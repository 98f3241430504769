"""Turns chat messages into token ids and generated ids back into text, for one replica."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from transformers import AutoTokenizer

ReasoningKind = Literal["none", "hybrid", "always"]
ASSISTANT = "<|im_start|>assistant\n"
THINK_OPEN, THINK_END = "<think>\n", "</think>"
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"  # a hybrid template's generation prompt, thinking off
# What the engine forces once a thought has used its budget (the Qwen3 technical report's
# stop-thinking text after a paragraph break, without the stray period it prints after
# </think>); budget 0 forces SHORT_CLOSING, an empty thought.
CLOSING = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the "
    "thinking directly now.\n</think>\n\n"
)
SHORT_CLOSING = "</think>\n\n"
USER = {"role": "user", "content": "Hello"}  # the turn a template is classified by


class UnsupportedTemplate(ValueError):
    """A chat template that is neither thinking-free, hybrid nor always-thinking."""


def reasoning_kind(render: Callable[[bool], str]) -> ReasoningKind:
    """Classify a template by its generation prompt (what follows the assistant header of a
    rendered user turn) with thinking on and off: empty both ways (thinking-free, e.g.
    Instruct-2507), an empty think block with thinking off (hybrid, e.g. Qwen3-4B), or a
    think block opened both ways (always-thinking, e.g. Thinking-2507)."""
    on, off = (render(think).rpartition(ASSISTANT)[2] for think in (True, False))
    if on == off == "":
        return "none"
    if on in ("", THINK_OPEN) and off == EMPTY_THOUGHT:
        return "hybrid"
    if on == off == THINK_OPEN:
        return "always"
    raise UnsupportedTemplate(
        "the chat template's generation prompt is neither thinking-free, hybrid nor "
        f"always-thinking (thinking on: {on!r}, off: {off!r})"
    )


class PromptCodec:
    """The model's own chat template, thinking on or off, plus the token ids the engine needs.
    `reasoning` is the template's kind: "none", "hybrid" or "always"."""

    def __init__(self, tokenizer_dir: Path, chat_template: str | None = None) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        self.eos_ids = tuple(
            self.tokenizer.convert_tokens_to_ids(token)
            for token in ("<|im_end|>", "<|endoftext|>")
            if token in self.tokenizer.get_vocab()
        )
        self.reasoning = reasoning_kind(lambda think: self._template([USER], think))
        self.think_end_id = self.tokenizer.convert_tokens_to_ids(THINK_END)
        self._closings = tuple(tuple(self.encode(text)) for text in (SHORT_CLOSING, CLOSING))

    def closing_ids(self, budget: int) -> tuple[int, ...]:
        """What the engine forces to end a thought at its budget (just `</think>` for 0)."""
        return self._closings[budget > 0]

    def thinks(self, enabled: bool | None) -> bool:
        """Whether a generation thinks: always for an always-thinking template, when the client
        enabled it for a hybrid one, never for a thinking-free one."""
        return self.reasoning == "always" or (self.reasoning == "hybrid" and bool(enabled))

    def _template(self, messages: list[dict[str, str]], think: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=think
        )

    def render(self, messages: list[dict[str, str]], prefix: str = "", think: bool = False) -> str:
        """The prompt text the model sees: template, generation prompt, then `prefix`. Thinking
        on, it ends with an open think block; off, a model that can think gets an empty one."""
        text = self._template(messages, think and self.reasoning != "none")
        if think and self.reasoning != "none" and not text.endswith(THINK_OPEN):
            text += THINK_OPEN
        if not think and self.reasoning == "always":
            text += f"\n{SHORT_CLOSING}"  # closed at once, as a hybrid template's thinking off
        return text + prefix

    def encode_chat(
        self, messages: list[dict[str, str]], prefix: str = "", think: bool = False
    ) -> list[int]:
        return self.encode(self.render(messages, prefix, think))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def choice_ids(self, choices: list[str]) -> list[int]:
        """One token id per option label, as it is tokenized right after `(`."""
        ids = []
        for choice in choices:
            tokens = self.encode(choice)
            if len(tokens) != 1:
                raise ValueError(f"choice {choice!r} is not a single token")
            ids.append(tokens[0])
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

"""Turns chat messages into token ids and generated ids back into text, for one replica."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer


class PromptCodec:
    """The model's own chat template, thinking off, plus the token ids the engine needs."""

    def __init__(self, tokenizer_dir: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.eos_ids = tuple(
            self.tokenizer.convert_tokens_to_ids(token)
            for token in ("<|im_end|>", "<|endoftext|>")
            if token in self.tokenizer.get_vocab()
        )

    def render(self, messages: list[dict[str, str]], prefix: str = "") -> str:
        """The prompt text the model sees: template, generation prompt, then `prefix`."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        return text + prefix

    def encode_chat(self, messages: list[dict[str, str]], prefix: str = "") -> list[int]:
        return self.tokenizer.encode(self.render(messages, prefix), add_special_tokens=False)

    def choice_ids(self, choices: list[str]) -> list[int]:
        """One token id per option label, as it is tokenized right after `(`."""
        ids = []
        for choice in choices:
            tokens = self.tokenizer.encode(choice, add_special_tokens=False)
            if len(tokens) != 1:
                raise ValueError(f"choice {choice!r} is not a single token")
            ids.append(tokens[0])
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

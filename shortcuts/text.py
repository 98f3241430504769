"""Recover the task text from whatever wrapper the client put around it.

Routing and prompt shaping work on content, so chat-template markup and the course's
InfoBench wrapper are peeled off here, once, for every caller.
"""

from __future__ import annotations

import re

_USER_TURN = re.compile(
    r"<\|im_start\|>user[^\S\n]*\n?(.*?)(?:<\|im_end\|>|<\|im_start\|>|\Z)", re.S
)
_SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>")
_INFOBENCH = re.compile(r"\A\s*Instruction:\s*(.*?)\n\s*Question:(.*?)\n?\s*Generation:\s*\Z", re.S)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S)


def task_text(prompt: str) -> str:
    """The user's text: the last user turn of a chat-templated prompt, newlines normalised."""
    text = prompt.replace("\r\n", "\n").replace("\r", "\n")
    turns = _USER_TURN.findall(text)
    if turns:
        text = turns[-1]
    return _SPECIAL_TOKEN.sub("", text).strip()


def split_infobench(text: str) -> tuple[str, str] | None:
    """(instruction, input) of an `Instruction: …\\nQuestion: …\\nGeneration:` prompt, else None."""
    match = _INFOBENCH.match(text)
    if match is None:
        return None
    return match.group(1).strip(), match.group(2).strip()


def strip_think(text: str) -> str:
    """Drop reasoning blocks; a dangling `</think>` means everything before it was reasoning."""
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.replace("<think>", "").strip()

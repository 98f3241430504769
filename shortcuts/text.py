"""Recover the task text from whatever wrapper the client put around it.

Routing and prompt shaping work on content, so chat-template markup and the course's
InfoBench wrapper are peeled off here, once, for every caller. Everything here runs in time
linear in the text: the wrappers are found with `str.find` scans, not with regexes whose
backtracking a crafted prompt could make quadratic or cubic.
"""

from __future__ import annotations

import re

USER_TURN = "<|im_start|>user"
TURN_ENDS = ("<|im_end|>", "<|im_start|>")
# Linear: each attempt starts at "<|" and scans one run of [a-z_], which holds no "<|".
_SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>")
INSTRUCTION, QUESTION, GENERATION = "Instruction:", "Question:", "Generation:"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def task_text(prompt: str) -> str:
    """The user's text: the last user turn of a chat-templated prompt, newlines normalised."""
    text = prompt.replace("\r\n", "\n").replace("\r", "\n")
    start = text.rfind(USER_TURN)
    if start >= 0:
        start += len(USER_TURN)
        ends = [end for end in (text.find(mark, start) for mark in TURN_ENDS) if end >= 0]
        text = text[start : min(ends, default=len(text))]
    return _SPECIAL_TOKEN.sub("", text).strip()


def split_infobench(text: str) -> tuple[str, str] | None:
    """(instruction, input) of an `Instruction: …\\nQuestion: …\\nGeneration:` prompt, else None.

    The instruction runs to the first `Question:` that starts a line (after optional blanks);
    the input runs from there to the closing `Generation:`.
    """
    body = text.strip()
    if not (body.startswith(INSTRUCTION) and body.endswith(GENERATION)):
        return None
    end = len(body) - len(GENERATION)
    question = _first_question_line(body, len(INSTRUCTION), end)
    if question is None:
        return None
    instruction = body[len(INSTRUCTION) : question]
    return instruction.strip(), body[question + len(QUESTION) : end].strip()


def _first_question_line(body: str, start: int, end: int) -> int | None:
    """Where the first `Question:` in body[start:end] sits after whitespace holding a newline.

    Each candidate looks back over the whitespace just before it; those runs are disjoint, so
    the scan stays linear however many `Question:` the text holds.
    """
    at = body.find(QUESTION, start, end)
    while at >= 0:
        back = at
        while back > start and body[back - 1].isspace():
            back -= 1
            if body[back] == "\n":
                return at
        at = body.find(QUESTION, at + 1, end)
    return None


def strip_think(text: str) -> str:
    """Drop reasoning blocks; a dangling `</think>` means everything before it was reasoning."""
    kept, at = [], 0
    while (opened := text.find(THINK_OPEN, at)) >= 0:
        closed = text.find(THINK_CLOSE, opened + len(THINK_OPEN))
        if closed < 0:
            break
        kept.append(text[at:opened])
        at = closed + len(THINK_CLOSE)
    text = "".join(kept) + text[at:]
    if THINK_CLOSE in text:
        text = text.rsplit(THINK_CLOSE, 1)[1]
    return text.replace(THINK_OPEN, "").strip()

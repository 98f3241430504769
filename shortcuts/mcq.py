"""Multiple-choice questions: find the offered letters, and read or write the answer line."""

from __future__ import annotations

import re

from shortcuts.grading import ANSWER_RE

_LETTERS = "ABCDEFGHIJ"
_LINE_MARK = re.compile(r"^[^\S\n]*(?:\(([A-J])\)|([A-J])[.):])", re.M)
_INLINE_MARK = re.compile(r"(?:^|(?<=\s))(?:\(([A-J])\)|([A-J])[.)])\s")
_CUE = re.compile(
    r"multiple[\s-]*choice|\b(?:choices|options)\s*:|\banswer\s*(?:is\b|:)|\bquestion\s*:", re.I
)
_AUTHORING = re.compile(
    r"\b(?:write|create|generate|make|compose|draft|design|prepare|turn|convert)\b[^.\n]{0,60}?"
    r"\b(?:multiple[\s-]*choice|quiz)",
    re.I,
)
_TRAILING_ANSWER = re.compile(r"\n\s*Answer\s*:\s*\Z", re.I)


def option_letters(text: str) -> list[str]:
    """Letters of the last A, B, C… run of option markers (line starts first, then inline)."""
    for mark in (_LINE_MARK, _INLINE_MARK):
        letters = _last_run([a or b for a, b in mark.findall(text)])
        if len(letters) >= 2:
            return letters
    return []


def _last_run(marks: list[str]) -> list[str]:
    """The last run that starts at A and continues in order (other markers are option text)."""
    for start in range(len(marks) - 1, -1, -1):
        if marks[start] != "A":
            continue
        length = 1
        for mark in marks[start + 1 :]:
            if length < len(_LETTERS) and mark == _LETTERS[length]:
                length += 1
        if length >= 2:
            return list(_LETTERS[:length])
    return []


def looks_like_mcq(text: str) -> bool:
    """Options A, B, … plus a question cue, and not a request to write a quiz."""
    return (
        _CUE.search(text) is not None
        and _AUTHORING.search(text) is None
        and len(option_letters(text)) >= 2
    )


def question_text(text: str) -> str:
    """The question without its dangling `Answer:` (the prompt shaping supplies the answer)."""
    return _TRAILING_ANSWER.sub("", text).rstrip()


def answer_line(letter: str) -> str:
    """The exact text every MCQ response ends as."""
    return f"The answer is ({letter})."


def chosen_letter(text: str, letters: list[str]) -> str | None:
    """The last grader-parsable answer naming an offered letter, or None."""
    found = [m.group(1) for m in ANSWER_RE.finditer(text.replace("**", ""))]
    return next((letter for letter in reversed(found) if letter in letters), None)

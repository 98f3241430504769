"""Multiple-choice questions: find the offered letters, and read or write the answer line."""

from __future__ import annotations

import re

from shortcuts.grading import ANSWER_RE

_LETTERS = "ABCDEFGHIJ"
_LINE_MARK = re.compile(r"^[^\S\n]*(?:\(([A-J])\)|([A-J])[.):])", re.M)
_INLINE_MARK = re.compile(r"(?:^|(?<=\s))(?:\(([A-J])\)|([A-J])[.)])\s")
_TRAILING_ANSWER = re.compile(r"\n\s*Answer\s*:\s*\Z", re.I)
# A cue that only an MCQ carries: the course's header, an answer-format instruction, a
# "Choices:"/"Options:" label right before option A (or a dangling "Answer:", checked apart).
_STRONG_CUE = re.compile(
    r"\bmultiple[\s-]*choice\b|\banswer\s+is\s*\(\s*[A-Z]\s*\)"
    r"|\b(?:choices|options)\s*:\s*\(?A[.):]\s",
    re.I,
)
# "Question:" alone also heads open questions ("What are the pros and cons…? A. Pros B. Cons"):
# it counts only with wording that asks to pick one.
_QUESTION_CUE = re.compile(r"\bquestion\s*:", re.I)
_PICK_ONE = re.compile(
    r"\bwhich\b|\b(?:choose|select|pick)\b|\b(?:most|least)\s+likely\b|(?-i:\bEXCEPT\b)"
    r"|\b(?:correct|best|true|false)\s+(?:answer|option|choice|statement)",
    re.I,
)
# Asking for a quiz is an open instruction, even with sample options in it.
_AUTHORING = re.compile(
    r"\b(?:write|create|generate|make|compose|draft|design|prepare|turn|convert|give|provide"
    r"|come\s+up\s+with|list|produce|suggest|develop|formulate|construct|craft|build|devise"
    r"|invent|need|want)\b[^.\n]{0,60}?\b(?:multiple[\s-]*choice|quiz|mcqs?\b)",
    re.I,
)


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
    """Options A, B, … plus an MCQ cue, and not a request to write a quiz."""
    cued = any(r.search(text) for r in (_STRONG_CUE, _TRAILING_ANSWER)) or all(
        r.search(text) for r in (_QUESTION_CUE, _PICK_ONE)
    )
    return cued and _AUTHORING.search(text) is None and len(option_letters(text)) >= 2


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

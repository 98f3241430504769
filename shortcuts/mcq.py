"""Multiple-choice questions: find the offered letters, and read or write the answer line."""

from __future__ import annotations

import re

from shortcuts.grading import ANSWER_RE

_LETTERS = "ABCDEFGHIJ"
_ANSWER_WORD = "answer"
_LINE_MARK = re.compile(r"^[^\S\n]*(?:\(([A-J])\)|([A-J])[.):])", re.M)
_INLINE_MARK = re.compile(r"(?:^|(?<=\s))(?:\(([A-J])\)|([A-J])[.)])\s")
# A cue that only an MCQ carries: the course's header, an answer-format instruction, a
# "Choices:"/"Options:" label right before option A (or a dangling "Answer:", checked apart).
# Every pattern here is linear: each attempt starts at a literal word, and no two adjacent
# quantifiers can match the same characters (tests/test_linear_parsing.py holds them to it).
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
    """The last run that starts at A and continues in order (other markers are option text).

    That is the last A with a B anywhere after it, found in one backward pass (trying every A
    in turn would be quadratic in a prompt of a thousand A's).
    """
    seen_b = False
    for start in range(len(marks) - 1, -1, -1):
        if marks[start] == "B":
            seen_b = True
        elif marks[start] == "A" and seen_b:
            length = 1
            for mark in marks[start + 1 :]:
                if length < len(_LETTERS) and mark == _LETTERS[length]:
                    length += 1
            return list(_LETTERS[:length])
    return []


def offered_letters(text: str) -> list[str]:
    """The option letters of an MCQ (options A, B, … plus an MCQ cue, and not a request to
    write a quiz); [] for any other text."""
    cued = (
        _STRONG_CUE.search(text) is not None
        or _dangling_answer(text) is not None
        or all(r.search(text) for r in (_QUESTION_CUE, _PICK_ONE))
    )
    if not cued or _AUTHORING.search(text) is not None:
        return []
    return option_letters(text)


def question_text(text: str) -> str:
    """The question without its dangling `Answer:` (the prompt shaping supplies the answer)."""
    start = _dangling_answer(text)
    return (text if start is None else text[:start]).rstrip()


def _dangling_answer(text: str) -> int | None:
    """Where a final `Answer:` begins when it opens a line and only whitespace surrounds it.

    Scanned backwards from the end with `rstrip`: a regex like `\\n\\s*Answer\\s*:\\s*\\Z`
    would rescan a long whitespace run from each of its newlines (quadratic).
    """
    end = len(text.rstrip())
    if not text.endswith(":", 0, end):
        return None
    start = len(text[: end - 1].rstrip()) - len(_ANSWER_WORD)
    if start < 0 or text[start : start + len(_ANSWER_WORD)].lower() != _ANSWER_WORD:
        return None
    before = text[:start]
    return start if "\n" in before[len(before.rstrip()) :] else None


def answer_line(letter: str) -> str:
    """The exact text every MCQ response ends as."""
    return f"The answer is ({letter})."


def chosen_letter(text: str, letters: list[str]) -> str | None:
    """The last grader-parsable answer naming an offered letter, or None."""
    found = [m.group(1) for m in ANSWER_RE.finditer(text.replace("**", ""))]
    return next((letter for letter in reversed(found) if letter in letters), None)

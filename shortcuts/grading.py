"""Score answers exactly like the course grader, so offline checks and the load tester agree.

graph: matched (path, weight) pairs / P, from the first `submit_paths(paths=…, weights=…)`;
mmlu_med: the first match of the grader's regex against the gold letter; infobench: None
(an LLM judge scores it, which we cannot run offline).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

ANSWER_RE = re.compile(r"The answer is\s*\(?([A-Z])\)?")
_SUBMIT = re.compile(
    r"submit_paths\s*\(\s*paths\s*=\s*(\[.*?\])\s*,\s*weights\s*=\s*(\[.*?\])\s*\)", re.S
)

PathSet = set[tuple[tuple[int, ...], int]]


def grade(task: str, text: str, gold_answer: Any) -> float | None:
    """Score one answer; task is graph, mmlu_med or infobench (as in the dev files)."""
    if task == "graph":
        gold = _gold_paths(gold_answer)
        return len(gold & parse_submission(text)) / len(gold) if gold else 0.0
    if task == "mmlu_med":
        match = ANSWER_RE.search(text)
        return float(match is not None and match.group(1) == _gold_letter(gold_answer))
    if task == "infobench":
        return None
    raise ValueError(f"unknown task {task!r}")


def parse_submission(text: str) -> PathSet:
    """(path, weight) pairs of the first well-formed submit_paths call; empty when none."""
    match = _SUBMIT.search(text)
    if match is None:
        return set()
    try:
        paths, weights = ast.literal_eval(match.group(1)), ast.literal_eval(match.group(2))
        return {(tuple(int(n) for n in p), int(w)) for p, w in zip(paths, weights, strict=False)}
    except (ValueError, TypeError, SyntaxError):
        return set()


def _gold_paths(gold: Any) -> PathSet:
    """Gold as {"paths": [{"path", "weight"}]}, its list, or either as a JSON string."""
    if isinstance(gold, str):
        gold = json.loads(gold)
    if isinstance(gold, Mapping):
        gold = gold["paths"]
    return {_pair(entry) for entry in gold}


def _pair(entry: Mapping[str, Any] | Iterable[Any]) -> tuple[tuple[int, ...], int]:
    if isinstance(entry, Mapping):
        return tuple(entry["path"]), int(entry["weight"])
    path, weight = entry
    return tuple(path), int(weight)


def _gold_letter(gold: str | int) -> str:
    """Gold as a letter ("B") or an answer index (1)."""
    return chr(ord("A") + gold) if isinstance(gold, int) else gold.strip().upper()

"""Accuracy of the answers a run got, against a gold file in dev_requests_gold.jsonl format.

Graph and MCQ answers are scored by the project's copy of the course grader
(`shortcuts.grading.grade`); InfoBench only by the LLM judge, when one is given. Each distinct
gold prompt is scored once, on its first answer: a closed loop repeats prompts, and the server
is deterministic, so repeats add cost (judge calls) but no information.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from loadtest.client import BatchResult
from loadtest.workload import TASKS
from shortcuts.grading import grade
from shortcuts.text import split_infobench, task_text

NOT_JUDGED = "not judged"

Judge = Callable[[str, dict[str, Any]], Awaitable[float | None]]


@dataclass(frozen=True)
class GoldItem:
    task: str
    answer: Any
    meta: dict[str, Any]


def load_gold(path: Path) -> dict[str, GoldItem]:
    """Gold answers keyed by prompt text: schedules and pools share the gold's prompt strings."""
    gold: dict[str, GoldItem] = {}
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                row = orjson.loads(line)
                gold[row["prompt"]] = GoldItem(
                    row["task"], row["gold_answer"], row.get("meta") or {}
                )
    return gold


def infobench_input(prompt: str) -> str:
    """The task input InfoBench's judge is shown, which the gold's meta lacks: the wrapper's
    `Question:` part, or in the raw format ("instruction\\n\\ninput") what follows the first
    blank line; "" when there is none."""
    text = task_text(prompt)
    parts = split_infobench(text)
    if parts is not None:
        return parts[1]
    return text.split("\n\n", 1)[1].strip() if "\n\n" in text else ""


def first_answers(results: list[BatchResult]) -> dict[str, str]:
    """The first successful answer to each distinct prompt sent, in send order.

    A prompt that was never answered maps to "" and scores 0, as an error line does for the
    course grader.
    """
    ordered = sorted(results, key=lambda r: r.sent_s)
    answers: dict[str, str] = {}
    for result in ordered:
        if result.texts is not None:
            for prompt, text in zip(result.prompts, result.texts, strict=True):
                answers.setdefault(prompt.text, text)
    for result in ordered:
        for prompt in result.prompts:
            answers.setdefault(prompt.text, "")
    return answers


async def score_answers(
    answers: dict[str, str], gold: dict[str, GoldItem], judge: Judge | None
) -> dict[str, dict[str, Any]]:
    """Per task: how many answers were scored and their mean, or "not judged" for InfoBench."""
    scores: dict[str, list[float]] = {task: [] for task in TASKS}
    judged: list[Awaitable[float | None]] = []
    for prompt, text in answers.items():
        item = gold.get(prompt)
        if item is None:
            continue
        if item.task == "infobench":
            if judge is not None:
                meta = {"input": infobench_input(prompt), **item.meta}  # a gold "input" wins
                judged.append(judge(text, meta))
            continue
        score = grade(item.task, text, item.answer)
        if score is not None:
            scores[item.task].append(score)
    scores["infobench"] = [s for s in await asyncio.gather(*judged) if s is not None]
    summary: dict[str, dict[str, Any]] = {}
    for task, values in scores.items():
        if task == "infobench" and judge is None:
            summary[task] = {"scored": 0, "score": NOT_JUDGED}
        else:
            summary[task] = {
                "scored": len(values),
                "score": sum(values) / len(values) if values else None,
            }
    return summary

"""The grading module scores like the course grader on known answers."""

from __future__ import annotations

import json

import pytest

from shortcuts.grading import grade
from tests.shortcuts_dev_data import rows_of

GOLD = {"paths": [{"path": [0, 2, 4], "weight": 10}, {"path": [0, 4], "weight": 12}]}


def submission(paths, weights) -> str:
    return f"submit_paths(paths={paths}, weights={weights})"


@pytest.mark.parametrize(
    ("text", "score"),
    [
        (submission([[0, 2, 4], [0, 4]], [10, 12]), 1.0),
        (submission([[0, 4], [0, 2, 4]], [12, 10]), 1.0),  # order does not matter
        (submission([[0, 2, 4]], [10]), 0.5),
        (submission([[0, 2, 4], [0, 4]], [10, 13]), 0.5),  # a wrong weight loses its pair
        (submission([[0, 2, 4], [0, 2, 4]], [10, 10]), 0.5),  # duplicates count once
        ("I think the answer is " + submission([[0, 4]], [12]) + " done", 0.5),
        (submission([[0, 1, 4]], [10]), 0.0),
        (submission([], []), 0.0),
        ("paths: [[0, 2, 4]]", 0.0),
        ("submit_paths(paths=[[0, 2, 4]], weights=[oops])", 0.0),
    ],
)
def test_graph_scores_matched_pairs_over_p(text, score):
    assert grade("graph", text, GOLD) == score


def test_graph_gold_formats():
    text = submission([[0, 2, 4]], [10])
    assert grade("graph", text, json.dumps(GOLD)) == 0.5
    assert grade("graph", text, GOLD["paths"]) == 0.5
    assert grade("graph", text, [[[0, 2, 4], 10], [[0, 4], 12]]) == 0.5


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("The answer is (B).", 1.0),
        ("The answer is B", 1.0),
        ("Reasoning first.\nThe answer is  (B)", 1.0),
        ("The answer is (C).", 0.0),
        ("The answer is (C). Actually The answer is (B).", 0.0),  # the first match counts
        ("the answer is (B)", 0.0),  # the grader's regex is case-sensitive
        ("B", 0.0),
        ("", 0.0),
    ],
)
def test_mcq_uses_the_graders_regex(text, score):
    assert grade("mmlu_med", text, "B") == score


def test_mcq_gold_as_answer_index():
    assert grade("mmlu_med", "The answer is (B).", 1) == 1.0


def test_dev_golds_grade_themselves():
    for row in rows_of("mmlu_med"):
        assert grade("mmlu_med", f"The answer is ({row['gold_answer']}).", row["gold_answer"]) == 1
        wrong = "A" if row["gold_answer"] != "A" else "B"
        assert grade("mmlu_med", f"The answer is ({wrong}).", row["gold_answer"]) == 0
    for row in rows_of("graph"):
        paths = row["gold_answer"]["paths"]
        full = submission([p["path"] for p in paths], [p["weight"] for p in paths])
        assert grade("graph", full, row["gold_answer"]) == 1.0
        first = submission([paths[0]["path"]], [paths[0]["weight"]])
        assert grade("graph", first, row["gold_answer"]) == 1 / len(paths)


def test_infobench_is_not_judged_and_unknown_tasks_fail():
    assert grade("infobench", "anything", None) is None
    with pytest.raises(ValueError):
        grade("poetry", "text", None)

"""Prompt parsing runs in time linear in the prompt: no crafted prompt can stall the event loop.

Prompts are built as prefix + pump * k + suffix from the words and characters the parsers look
for (the shape of every regex-backtracking attack), then planned at 16 KiB and 64 KiB. The bar,
from the issue: under 50 ms per 16 KiB at every length. The hand-written scanners are also
checked against the regexes they replaced, on short inputs where those are still fast.
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shortcuts
from shortcuts import graph, mcq, text

KIB = 1024
BAR_S_PER_16_KIB = 0.050
LENGTHS = (16 * KIB, 64 * KIB)

CHARACTERS = (" ", "\n", "\t", "\r", "\r\n", "-", ".", ",", ":", "=", "(", ")", "*", "x", "0", "A")
TOKENS = (
    *CHARACTERS,
    *("  ", "\n\n", "7", "12", "345", "-3", "2.5", "->", " -> ", "weight", "weight:", "Weight="),
    *(
        "with",
        "directed",
        "graph",
        "directed graph",
        "nodes",
        "graph with 5 nodes",
        "numbered",
        "node",
    ),
    *("numbered 0 to 4", "from", "to", "top", "top-", "the", "shortest", "cheapest", "path"),
    *("paths", "path(s)", "Find the top 3 shortest paths from node 0 to node 4", "0 -> 1, "),
    *("0 -> 1, weight: 5\n", "Instruction:", "Question:", "Generation:", "<|im_start|>", "<|"),
    *("<|im_start|>user", "<|im_start|>user\n", "<|im_end|>", "|>", "<|a_b|>", "<think>"),
    *("</think>", "user", "A", "B", "C", "J", "(A)", "(B)", "A.", "B)", "C:", "\nA. x", "\nB. y"),
    *("Answer", "Answer:", "answer is", "The answer is (", "multiple", "choice", "Choices:"),
    *("multiple-choice", "Options:", "question", "which", "choose", "most likely", "EXCEPT"),
    *("correct answer", "best option", "write", "quiz", "mcq", "mcqs", "come up with"),
)
words = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=6).map("".join)
pumps = (  # runs of one character class are what backtracking chokes on: draw them often
    st.lists(st.sampled_from(CHARACTERS), min_size=1, max_size=3)
    | st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4)
).map("".join)


def pumped(prefix: str, pump: str, suffix: str, length: int) -> str:
    """prefix + pump repeated + suffix, `length` characters or just over."""
    repeats = max(1, -(-(length - len(prefix) - len(suffix)) // len(pump)))
    return prefix + pump * repeats + suffix


def cpu_seconds(work: Callable[[], object]) -> float:
    """Best of two runs, in this thread's CPU time: other load on the box does not count, nor
    does a collection of the whole test session's heap (timeit's way: no GC while timed)."""
    best = float("inf")
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(2):
            started = time.thread_time()
            work()
            best = min(best, time.thread_time() - started)
    finally:
        if enabled:
            gc.enable()
    return best


def assert_linear(parse: Callable[[str], object], prefix: str, pump: str, suffix: str) -> None:
    """Under the bar at each length, and 4x the length costs about 4x, not 16x or 64x."""
    costs = []
    for length in LENGTHS:
        prompt = pumped(prefix, pump, suffix, length)
        seconds = cpu_seconds(lambda p=prompt: parse(p))
        bar = BAR_S_PER_16_KIB * len(prompt) / (16 * KIB)
        assert seconds < bar, f"{len(prompt)} chars took {seconds * 1e3:.1f} ms (bar {bar:.3f} s)"
        costs.append(seconds)
    short, long = costs
    assert long < 8 * short + 0.005, f"superlinear: {short * 1e3:.2f} ms then {long * 1e3:.2f} ms"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=words, pump=pumps, suffix=words, profile=st.sampled_from(sorted(shortcuts.PROFILES)))
def test_planning_is_linear_in_the_prompt_length(prefix, pump, suffix, profile):
    assert_linear(lambda prompt: shortcuts.plan(prompt, profile), prefix, pump, suffix)


ATTACKS = {  # the shapes that were quadratic or cubic before, and their neighbours
    "infobench questions": ("Instruction:", "\n Question:", ""),
    "infobench blank lines": ("Instruction: x", "\n \n", "Question: y"),
    "edge then whitespace": ("You are given a directed graph 0 -> 1", " ", "x"),
    "weight then whitespace": ("directed graph 0 -> 1 weight", "\t", "x"),
    "newlines before answer": ("Question: which?", "\n", "x Answer:"),
    "option A over and over": ("Choices:", "\nA. x", ""),
    "unclosed think": ("", "<think>", ""),
    "unclosed user turns": ("", "<|im_start|>user", ""),
    "special-token lookalike": ("", "<|abc", ""),
    "quiz request words": ("write", " multiple -", "quiz"),
}


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
def test_known_attack_shapes_plan_in_linear_time(attack):
    assert_linear(lambda prompt: shortcuts.plan(prompt, "accuracy"), *attack)


def test_reasoning_output_is_cleaned_in_linear_time():
    """Model output passes through strip_think on the event loop too."""
    assert_linear(text.strip_think, "", "<think>", "")
    assert_linear(text.strip_think, "", "</think><think>x", "")


# The regexes the scanners replaced, as reference oracles (fast enough on short inputs).
# The user-turn reference looks ahead at the turn's end instead of consuming it, so that a
# user turn right after another is still found (the old pattern skipped it).
OLD_USER_TURN = re.compile(
    r"<\|im_start\|>user[^\S\n]*\n?(.*?)(?=<\|im_end\|>|<\|im_start\|>|\Z)", re.S
)
OLD_INFOBENCH = re.compile(
    r"\A\s*Instruction:\s*(.*?)\n\s*Question:(.*?)\n?\s*Generation:\s*\Z", re.S
)
OLD_THINK = re.compile(r"<think>.*?</think>", re.S)
OLD_TRAILING_ANSWER = re.compile(r"\n\s*Answer\s*:\s*\Z", re.I)
OLD_EDGE = re.compile(
    r"(?<![\d.-])(\d+)\s*->\s*(\d+)\s*,?\s*weight\s*[:=]?\s*(-?\d+(?:\.\d+)?)", re.I
)
short_texts = st.lists(st.sampled_from(TOKENS), max_size=25).map("".join)


def old_task_text(prompt: str) -> str:
    normalised = prompt.replace("\r\n", "\n").replace("\r", "\n")
    turns = OLD_USER_TURN.findall(normalised)
    return re.sub(r"<\|[a-z_]+\|>", "", turns[-1] if turns else normalised).strip()


def old_split_infobench(body: str) -> tuple[str, str] | None:
    match = OLD_INFOBENCH.match(body)
    return None if match is None else (match.group(1).strip(), match.group(2).strip())


def old_strip_think(output: str) -> str:
    output = OLD_THINK.sub("", output)
    if "</think>" in output:
        output = output.rsplit("</think>", 1)[1]
    return output.replace("<think>", "").strip()


def old_last_run(marks: list[str]) -> list[str]:
    for start in range(len(marks) - 1, -1, -1):
        if marks[start] != "A":
            continue
        length = 1
        for mark in marks[start + 1 :]:
            if length < 10 and mark == "ABCDEFGHIJ"[length]:
                length += 1
        if length >= 2:
            return list("ABCDEFGHIJ"[:length])
    return []


@settings(max_examples=400)
@given(short_texts)
def test_scanners_agree_with_the_regexes_they_replaced(sample):
    assert text.task_text(sample) == old_task_text(sample)
    assert text.split_infobench(sample) == old_split_infobench(sample)
    assert text.strip_think(sample) == old_strip_think(sample)
    assert mcq.question_text(sample) == OLD_TRAILING_ANSWER.sub("", sample).rstrip()
    assert graph._EDGE.findall(sample) == OLD_EDGE.findall(sample)


@given(st.lists(st.sampled_from("ABCDEFGHIJ"), max_size=30))
def test_option_runs_agree_with_the_quadratic_search(marks):
    assert mcq._last_run(marks) == old_last_run(marks)


def test_a_user_turn_right_after_another_is_the_one_answered():
    prompt = "<|im_start|>user\nfirst<|im_start|>user\nsecond<|im_end|>"
    assert text.task_text(prompt) == "second"

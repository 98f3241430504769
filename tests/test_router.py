"""Routing by content: every dev prompt, wrapped or reformatted, plus adversarial cases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shortcuts.router import route
from tests.shortcuts_dev_data import ROUTE_OF_TASK, dev_rows


def chat(prompt: str, system: str = "You are a helpful assistant.") -> str:
    """The Qwen3 chat template around a user prompt, generation prompt included."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


WRAPPERS = {
    "plain": lambda p: p,
    "chat": chat,
    "chat-no-system": lambda p: f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n",
    "chat-think": lambda p: chat(p) + "<think>\n\n</think>\n\n",
    "crlf": lambda p: p.replace("\n", "\r\n"),
    "tabs-and-padding": lambda p: "\n\n  " + p.replace("\n", " \t\n\t") + "  \n\n",
}


@pytest.mark.parametrize("wrap", WRAPPERS.values(), ids=WRAPPERS.keys())
def test_all_dev_prompts_route_correctly(wrap):
    rows = dev_rows()
    assert len(rows) == 600
    wrong = [
        (row["file"], row["task"], row["prompt"][:80])
        for row in rows
        if route(wrap(row["prompt"])) != ROUTE_OF_TASK[row["task"]]
    ]
    assert wrong == []


def mcq_prompt(n_options: int, raw: bool) -> str:
    options = "\n".join(f"{chr(65 + i)}. option number {i}" for i in range(n_options))
    if raw:
        return f"Question:\nWhich one is right?\n\nChoices:\n{options}"
    return (
        "The following is a multiple choice question (with answers) about  anatomy.  Output the "
        'answer in the format of "The answer is (X)" at the end.\n\nQuestion: Which one is '
        f"right?\n Options:\n{options}\nAnswer:"
    )


@pytest.mark.parametrize("n_options", range(2, 11))
@pytest.mark.parametrize("raw", [True, False])
def test_two_to_ten_options_are_mcq(n_options, raw):
    assert route(mcq_prompt(n_options, raw)) == "mcq"
    assert route(chat(mcq_prompt(n_options, raw))) == "mcq"


@pytest.mark.parametrize(
    "prompt",
    [
        "Question: Which is a vowel? (A) b (B) e (C) k",  # options inline
        "Question: pick one.\n(A) first\n(B) second\n(C) third\nAnswer:",
        "Question: pick one.\nA) first\nB) second",
        "Question: Which vitamin?\nA. Vitamin A. deficiency\nB. Vitamin B\nC. none\nD. all",
    ],
)
def test_other_option_styles_are_mcq(prompt):
    assert route(prompt) == "mcq"


@pytest.mark.parametrize(
    "prompt",
    [
        "Explain Dijkstra's algorithm for the shortest path in a directed graph.",
        "Write a short story about a traveller who keeps choosing the wrong path.",
        "Instruction: Draw an ASCII graph of 0 -> 1 -> 2.\nQuestion: \nGeneration:",
        "Create a multiple choice quiz with 4 options about the heart.",
        "Write a multiple-choice question about photosynthesis, e.g.\nA. light\nB. water",
        "Instruction: Answer the question.\nQuestion: Which is bigger?\nA. 3\nB. 4\nGeneration:",
        "Continue this dialogue.\nA: Hello there.\nB: Hi, how are you?",
        "List the hero's journey stages.\nI. Departure\nII. Initiation\nIII. Return",
        "Make a list of the top places in the U.S. to visit in November.",
        # quiz authoring with any verb, sample options included
        "Give me three multiple choice questions about the heart\nA. atrium\nB. ventricle",
        "Provide 5 multiple-choice questions on diabetes.\nA. insulin\nB. glucagon",
        "Can you come up with a multiple choice quiz on Rome?\nA. Caesar\nB. Nero",
        "List some MCQs about anatomy, like:\nA. femur\nB. tibia",
        # a "Question:" label or "answer is" in an open instruction
        "Question: What are the pros and cons of remote work?\nA. Pros\nB. Cons",
        "The answer is simple: follow these steps.\nA. Preheat the oven\nB. Mix the flour",
        "Summarize the answer: the plan has two parts.\nA. Build\nB. Ship",
        # an open instruction quoting an edge list
        "Instruction: Explain Dijkstra's algorithm on this directed graph and find the shortest "
        "path from node 0 to node 2.\nQuestion: 0 -> 1, weight: 4\n1 -> 2, weight: 1\nGeneration:",
        "Explain Dijkstra's algorithm for the shortest path in a directed graph, e.g.\n"
        "0 -> 1, weight: 4\n1 -> 2, weight: 1",
        "",
        "   \n\t ",
        "<|im_start|>assistant\n<|im_end|>",
    ],
)
def test_open_instructions_stay_open(prompt):
    assert route(prompt) == "open"


GRAPH = (
    "You are given a directed graph with 3 nodes (numbered 0 to 2) and the following edges:\n"
    "0 -> 1, weight: 4\n1 -> 2, weight: 1\n0 -> 2, weight: 9\n"
    "Find the top 2 shortest paths from node 0 to node 2."
)


@pytest.mark.parametrize(
    "prompt",
    [
        GRAPH.replace("with 3 nodes (numbered 0 to 2)", "with some nodes"),  # no node count
        GRAPH.replace("weight: 4", "weight: -4"),
        GRAPH.replace("top 2", "top 2000"),  # over the caps
    ],
)
def test_graph_prompt_that_does_not_parse_still_routes_graph(prompt):
    assert route(prompt) == "graph"


def test_graph_wording_is_recognised_as_the_parser_reads_it():
    assert route(GRAPH.replace("shortest", "cheapest")) == "graph"
    assert route(GRAPH.replace("top 2 shortest paths", "the shortest path")) == "graph"


def test_infobench_wrapped_graph_routes_graph_only_when_it_parses():
    wrapped = f"Instruction: Solve this.\nQuestion: {GRAPH}\nGeneration:"
    assert route(wrapped) == "graph"
    assert route(wrapped.replace("weight: 4", "weight: -4")) == "open"


@given(st.text(max_size=400))
def test_never_raises(prompt):
    assert route(prompt) in {"graph", "mcq", "open"}

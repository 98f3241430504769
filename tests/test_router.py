"""Routing by content: every dev prompt, wrapped or reformatted, plus adversarial cases."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shortcuts import PROFILES, Answer, Generate, Score, plan, router
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


# Prompts of every route, cut into at random places by the pieces the router and the parsers
# look for (or by arbitrary text), then wrapped as a client might: hypothesis reaches each
# route, and the near misses between them.
BASES = [
    GRAPH,
    f"Instruction: Solve this.\nQuestion: {GRAPH}\nGeneration:",
    mcq_prompt(4, raw=False),
    mcq_prompt(10, raw=True),
    "Instruction: Answer the question.\nQuestion: Which is bigger?\nA. 3\nB. 4\nGeneration:",
    "Write a haiku about the sea.",
    "",
]
FRAGMENTS = [
    "<|im_start|>user\n",
    "<|im_start|>assistant\n",
    "<|im_end|>",
    "<think>",
    "</think>",
    "Instruction: ",
    "\nQuestion: ",
    "\nGeneration:",
    "Which one is right?\n",
    "Choices:\n",
    "\nA. ",
    "\nB. ",
    " (C) ",
    "\nAnswer:",
    "The answer is (",
    "Write a multiple choice quiz.",
    "directed graph with 3 nodes",
    "1 -> 2, weight: -1\n",
    "0 -> 2, weight: 1.5\n",
    "2 -> 0, weight: " + "9" * 12 + "\n",
    "Find the top 2 shortest paths from node 0 to node 2.",
    "\r\n",
    "\r",
    " \t",
    "\x00",
]


def cut_into(base: str, cuts: list[tuple[int, str]], wrap) -> str:
    for at, piece in cuts:
        at %= len(base) + 1
        base = base[:at] + piece + base[at:]
    return wrap(base)


odd_prompts = st.builds(
    cut_into,
    st.sampled_from(BASES),
    st.lists(
        st.tuples(st.integers(0), st.sampled_from(FRAGMENTS) | st.text(max_size=12)), max_size=4
    ),
    st.sampled_from(list(WRAPPERS.values())),
)


# caplog spans every example of a run: any router failure logged in any of them fails the test.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(odd_prompts, st.sampled_from(sorted(PROFILES)))
@example(GRAPH, "throughput")  # solved on the CPU
@example(GRAPH.replace("weight: 4", "weight: -4"), "balanced")  # graph-shaped, unparsable
@example(chat(mcq_prompt(4, raw=False)), "throughput")  # letter scoring
@example(mcq_prompt(10, raw=True), "accuracy")  # reasoning, scoring as the fallback
def test_odd_prompts_get_a_plan_of_their_route_without_the_routers_safety_net(
    caplog, prompt, profile
):
    """The router's catch-all is for bugs: no prompt may need it. Each route gets its plan."""
    task = route(prompt)
    shaped = plan(prompt, profile)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert shaped.task == task
    if task == "graph":  # solved, or the model answers the unparsable prompt
        assert isinstance(shaped, Answer | Generate)
        if isinstance(shaped, Answer):
            assert shaped.text.startswith("submit_paths(paths=[")
    elif task == "mcq":  # scored over the offered letters, directly or after reasoning
        score = shaped if isinstance(shaped, Score) else shaped.fallback
        assert isinstance(score, Score)
        offered = "ABCDEFGHIJ"[: len(score.choices)]
        assert len(score.choices) >= 2 and score.choices == list(offered)
        assert isinstance(shaped, Score) == (PROFILES[profile].mcq_reasoning_cap is None)
    else:
        assert isinstance(shaped, Generate) and shaped.fallback is None
        assert shaped.messages[-1]["role"] == "user"


@pytest.mark.parametrize(
    "prompt", [GRAPH, f"Instruction: Solve this.\nQuestion: {GRAPH}\nGeneration:"]
)
def test_a_router_bug_costs_the_shortcut_not_the_request(monkeypatch, caplog, prompt):
    """An exception inside the graph recogniser or parser: logged, and the prompt goes to the
    model as an open instruction instead of failing its request."""

    def broken(text: str) -> None:
        raise RuntimeError("parser bug")

    assert route(prompt) == "graph"
    monkeypatch.setattr(router, "looks_like_graph", broken)
    monkeypatch.setattr(router, "parse_graph", broken)
    assert route(prompt) == "open"
    shaped = plan(prompt, "throughput")
    assert isinstance(shaped, Generate) and shaped.task == "open"
    assert "0 -> 1, weight: 4" in shaped.messages[-1]["content"]
    failures = [r for r in caplog.records if r.name == router.__name__]
    assert failures and all(r.levelno == logging.ERROR and r.exc_info for r in failures)

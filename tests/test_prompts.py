"""Prompt shaping per task and profile, and turning model output into grader-proof text."""

from __future__ import annotations

import asyncio
from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replica.wire import messages as wire
from shortcuts import (
    PROFILES,
    Answer,
    Generate,
    Plan,
    Reply,
    Score,
    UnsolvedGraph,
    get_profile,
    plan,
    plan_unshaped,
)
from shortcuts.grading import grade
from tests.shortcuts_dev_data import DATA, rows_of

TOKENIZER = DATA.parent / "qwen3-tokenizer"


class FakeModel:
    """Answers a Generate with `text` (3 tokens) and a Score with option `choice`; keeps the
    jobs it was given."""

    def __init__(self, text: str = "", choice: int | None = None) -> None:
        self.text, self.choice = text, choice
        self.jobs: list[wire.Job] = []

    async def __call__(self, job: wire.Job) -> wire.Result:
        self.jobs.append(job)
        if isinstance(job, wire.ScoreJob):
            return wire.Result(len(self.jobs), "", "stop", wire.Usage(10, 1), self.choice)
        return wire.Result(len(self.jobs), self.text, "length", wire.Usage(20, 3))


def reply(shaped: Plan, text: str = "", choice: int | None = None) -> tuple[Reply, FakeModel]:
    model = FakeModel(text, choice)
    return asyncio.run(shaped.replies(model))[0], model


@cache
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.mark.parametrize("profile", PROFILES)
def test_graph_prompts_are_answered_immediately(profile):
    for row in rows_of("graph"):
        shaped = plan(row["prompt"], profile)
        assert isinstance(shaped, Answer) and shaped.task == "graph"
        assert grade("graph", shaped.text, row["gold_answer"]) == 1.0
        answered, model = reply(shaped)
        assert answered == Reply("graph", shaped.text) and not model.jobs  # no model call


@pytest.mark.parametrize("profile", ["throughput", "balanced"])
def test_mcq_is_letter_scoring(profile):
    for row in rows_of("mmlu_med"):
        shaped = plan(row["prompt"], profile)
        assert isinstance(shaped, Score) and shaped.task == "mcq"
        assert shaped.prefix.endswith("The answer is (")
        assert shaped.choices == ["A", "B", "C", "D"]
        assert [m["role"] for m in shaped.messages] == ["system", "user"]
        user = shaped.messages[-1]["content"]
        assert row["meta"]["raw_choices"][-1] in user and not user.endswith("Answer:")
        gold = shaped.choices.index(row["gold_answer"])
        answered, model = reply(shaped, choice=gold)
        assert grade("mmlu_med", answered.text, row["gold_answer"]) == 1.0
        [job] = model.jobs  # the letters travel; the index comes back
        assert job == wire.ScoreJob(shaped.messages, shaped.prefix, ("A", "B", "C", "D"))
        assert answered.usage == wire.Usage(10, 1) and answered.finish_reason == "stop"


def test_mcq_choices_follow_the_offered_letters():
    options = "\n".join(f"{chr(65 + i)}. choice {i}" for i in range(7))
    shaped = plan(f"Question: which?\nChoices:\n{options}", "throughput")
    assert shaped.choices == list("ABCDEFG")
    assert reply(shaped, choice=6)[0].text == "The answer is (G)."
    for out_of_range in (7, -1, None):
        with pytest.raises(ValueError):
            reply(shaped, choice=out_of_range)


def test_accuracy_mcq_reasons_then_answers_with_scoring_fallback():
    row = rows_of("mmlu_med")[0]
    shaped = plan(row["prompt"], "accuracy")
    assert isinstance(shaped, Generate) and shaped.task == "mcq"
    assert shaped.max_tokens == PROFILES["accuracy"].mcq_reasoning_cap
    fallback = shaped.fallback
    assert isinstance(fallback, Score) and fallback.choices == ["A", "B", "C", "D"]
    reasoning = (
        "<think>The answer is (A)?</think>Hmm, maybe (A). On reflection **The answer is (C)**."
    )
    for text, letter in [(reasoning, "C"), ("The answer is (B). Wait, The answer is (E).", "B")]:
        answered, model = reply(shaped, text)
        assert answered == Reply("mcq", f"The answer is ({letter}).", "length", wire.Usage(20, 3))
        assert [type(job) for job in model.jobs] == [wire.GenerateJob]
    for no_letter in ("Either A or C, hard to say", "The answer is (E)."):  # E is not offered
        answered, model = reply(shaped, no_letter, choice=3)
        assert answered == Reply("mcq", "The answer is (D).", "stop", wire.Usage(30, 4))
        assert [type(job) for job in model.jobs] == [wire.GenerateJob, wire.ScoreJob]


def test_the_clients_max_tokens_caps_what_the_model_may_generate():
    row = rows_of("mmlu_med")[0]
    assert plan(row["prompt"], "accuracy", max_tokens=7).max_tokens == 7
    assert (
        plan("Write a haiku.", "throughput", max_tokens=9000).max_tokens
        == get_profile("throughput").open_cap
    )
    assert plan_unshaped("Write a haiku.", "balanced", max_tokens=5).max_tokens == 5
    [job] = reply(plan("Write a haiku.", "balanced", max_tokens=5))[1].jobs
    assert job == wire.GenerateJob(plan("Write a haiku.", "balanced").messages, 5)


@pytest.mark.parametrize("profile", PROFILES)
def test_open_prompts_are_unwrapped_and_capped(profile):
    for row in rows_of("infobench"):
        shaped = plan(row["prompt"], profile)
        assert isinstance(shaped, Generate) and shaped.task == "open"
        assert shaped.max_tokens == get_profile(profile).open_cap and shaped.fallback is None
        system, user = shaped.messages
        assert system["role"] == "system" and "concise" in system["content"]
        assert user["role"] == "user" and user["content"]
        for wrapper in ("Instruction:", "Generation:"):
            assert not user["content"].startswith(wrapper) and not user["content"].endswith(wrapper)


def test_infobench_wrapper_becomes_instruction_then_input():
    prompt = "Instruction: Fix the code.\nQuestion: print(x\nGeneration:"
    assert plan(prompt, "throughput").messages[-1]["content"] == "Fix the code.\n\nprint(x"
    empty_input = "Instruction: Write a haiku.\nQuestion: \nGeneration:"
    assert plan(empty_input, "throughput").messages[-1]["content"] == "Write a haiku."


def test_open_output_loses_reasoning_blocks():
    shaped = plan("Write a haiku.", "balanced")
    for output in ("<think>plan it</think>\n\nAn old pond.", "plan it</think>An old pond."):
        assert reply(shaped, output)[0].text == "An old pond."
    assert reply(shaped, "<think>An old pond.")[0] == Reply(
        "open", "An old pond.", "length", wire.Usage(20, 3)
    )


def test_unparsable_graph_goes_to_the_model_as_graph():
    prompt = (
        "You are given a directed graph.\n0 -> 1, weight: 4\n"  # no node count
        "Find the top 2 shortest paths from node 0 to node 1."
    )
    shaped = plan(prompt, "throughput")
    assert isinstance(shaped, UnsolvedGraph) and shaped.task == "graph"
    assert shaped.max_tokens == get_profile("throughput").open_cap and shaped.fallback is None
    assert shaped.messages[-1]["content"] == prompt


def test_unknown_profile_is_rejected():
    with pytest.raises(ValueError):
        plan("hello", "fastest")


def test_chat_template_plus_prefix_puts_each_letter_in_one_token():
    """The replica's scoring contract: after the prefix, every offered letter is one token."""
    options = "\n".join(f"{chr(65 + i)}. choice {i}" for i in range(10))
    shaped = plan(f"Question: which?\nChoices:\n{options}", "balanced")
    text = tokenizer().apply_chat_template(
        shaped.messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    base = tokenizer()(text + shaped.prefix)["input_ids"]
    for letter in shaped.choices:
        ids = tokenizer()(text + shaped.prefix + letter)["input_ids"]
        assert ids[: len(base)] == base and len(ids) == len(base) + 1


@given(st.text(max_size=300), st.sampled_from(sorted(PROFILES)))
def test_plan_never_raises(prompt, profile):
    assert isinstance(plan(prompt, profile), Answer | Score | Generate)


def test_unshaped_plan_sends_the_prompt_as_it_stands():
    prompt = "Instruction: say hi\nQuestion: \nGeneration:" + " x" * 10_000
    request = plan_unshaped(prompt, "balanced")
    assert request.messages[-1] == {"role": "user", "content": prompt}
    assert request.max_tokens == get_profile("balanced").open_cap

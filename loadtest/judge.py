"""InfoBench judging by the course's protocol (InfoBench's evaluation.py, as the course runs it).

One chat per answer: the first user turn holds the rules, the task's `input` (if any; the scorer
takes it from the prompt) and the generated text with the first decomposed question; each later
question is its own turn.
A reply counts as YES/NO by its first word, else by which of "YES"/"NO" it contains; a reply
with neither ends the chat (the remaining questions count as NO). The score is the share of
YES over all questions; an empty answer scores 0. Only ever constructed with an explicit key.
"""

from __future__ import annotations

import asyncio
from typing import Any

from openai import AsyncOpenAI, OpenAIError

JUDGE_MODEL = "gpt-5-nano-2025-08-07"  # the course's judge model
JUDGE_TEMPERATURE = 1.0
MAX_TRIES = 3

# The judge's instructions, verbatim from InfoBench (MIT), as the course grader sends them.
SYS_MSG = (
    "Based on the provided Input (if any) and Generated Text, answer the ensuing Questions with "
    "either a YES or NO choice. Your selection should be based on your judgment as well as the "
    "following rules:\n\n- YES: Select 'YES' if the generated text entirely fulfills the "
    "condition specified in the question. However, note that even minor inaccuracies exclude "
    "the text from receiving a 'YES' rating. As an illustration. consider a question that asks. "
    '"Does each sentence in the generated text use a second person?” If even one sentence does '
    "not use the second person, the answer should NOT be 'YES'. To qualify for a 'YES' rating, "
    "the generated text must be entirely accurate and relevant to the question\n\n- NO: Opt for "
    "'NO' if the generated text fails to meet the question's requirements or provides no "
    "information that could be utilized to answer the question. For instance, if the question "
    'asks. "Is the second sentence in the generated text a compound sentence?" and the '
    "generated text only has one sentence. it offers no relevant information to answer the "
    "question. Consequently, the answer should be 'NO'.'''"
)


def parse_verdict(reply: str) -> bool | None:
    """YES -> True, NO -> False, neither (or both) -> None, by the protocol's rules."""
    reply = reply.strip()
    lowered = reply.lower()
    if lowered.startswith("yes"):
        return True
    if lowered.startswith("no"):
        return False
    if ("YES" in reply) != ("NO" in reply):
        return "YES" in reply
    return None


class InfoBenchJudge:
    """Scores InfoBench answers with the course's judge; bounds its own parallel chats."""

    def __init__(self, api_key: str, parallel: int = 16) -> None:
        self._client = AsyncOpenAI(api_key=api_key)
        self._calls = asyncio.Semaphore(parallel)

    async def score(self, answer: str, meta: dict[str, Any]) -> float | None:
        """Share of the gold's decomposed questions judged YES, as the course computes it.

        None only when the judge could not be reached (a tooling failure, not a wrong answer).
        """
        questions = meta.get("decomposed_questions") or []
        if not answer or not questions:
            return 0.0
        source = meta.get("input", "")
        header = f'{SYS_MSG}\n\nInput:\n"{source}"\n\n' if source else f"{SYS_MSG}\n\n"
        messages: list[dict[str, str]] = []
        yes = 0
        async with self._calls:
            for question in questions:
                first = f'{header}Generated Text:\n"{answer}"\n\nQuestion:\n{question}\n'
                messages.append({"role": "user", "content": f"{question}\n" if messages else first})
                reply = await self._ask(messages)
                if reply is None:
                    return None
                messages.append({"role": "assistant", "content": reply})
                verdict = parse_verdict(reply)
                if verdict is None:
                    break
                yes += verdict
        return yes / len(questions)

    async def _ask(self, messages: list[dict[str, str]]) -> str | None:
        """One judge turn, retried with backoff on API errors as the course grader does."""
        for attempt in range(MAX_TRIES):
            try:
                completion = await self._client.chat.completions.create(
                    model=JUDGE_MODEL, messages=messages, temperature=JUDGE_TEMPERATURE
                )
                return completion.choices[0].message.content or ""
            except OpenAIError:
                await asyncio.sleep(2.0**attempt)
        return None

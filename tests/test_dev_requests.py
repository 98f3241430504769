"""All dev requests, in both prompt formats, through a tiny-random server: the answer formats hold."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from shortcuts.grading import ANSWER_RE, grade, parse_submission
from shortcuts.mcq import option_letters
from shortcuts.text import task_text
from tests.shortcuts_dev_data import DEV_FILES, dev_rows

BATCH = 8


async def _answers(url: str, prompts: list[str]) -> list[str]:
    async with aiohttp.ClientSession() as session:

        async def batch(chunk: list[str]) -> list[str]:
            body = {"prompt": chunk, "max_tokens": 12}
            async with session.post(url + "/v1/completions", json=body) as response:
                assert response.status == 200, await response.text()
                return [choice["text"] for choice in (await response.json())["choices"]]

        chunks = [prompts[i : i + BATCH] for i in range(0, len(prompts), BATCH)]
        return [text for texts in await asyncio.gather(*map(batch, chunks)) for text in texts]


@pytest.mark.parametrize("dev_file", DEV_FILES)
def test_dev_requests_answer_in_grader_form(server, dev_file):
    rows = [row for row in dev_rows() if row["file"] == dev_file]
    assert len(rows) == 300
    texts = asyncio.run(_answers(server.url, [row["prompt"] for row in rows]))
    graph_scores, mcq_formats = [], []
    for row, text in zip(rows, texts, strict=True):
        if row["task"] == "graph":
            graph_scores.append(grade("graph", text, row["gold_answer"]))
        elif row["task"] == "mmlu_med":
            match = ANSWER_RE.search(text)
            offered = option_letters(task_text(row["prompt"]))
            mcq_formats.append(match is not None and match.group(1) in offered)
            assert grade("mmlu_med", text, row["gold_answer"]) in {0.0, 1.0}
        else:
            assert text.strip(), row["prompt"][:80]
            assert not parse_submission(text) and not ANSWER_RE.search(text), text
    assert len(graph_scores) == 100 and sum(graph_scores) == 100
    assert len(mcq_formats) == 100 and all(mcq_formats)
    print(f"{dev_file}: graph {sum(graph_scores)}/100, MCQ parsable {sum(mcq_formats)}/100")

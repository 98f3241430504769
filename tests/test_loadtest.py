"""loadtest/: its pieces, its error handling against a stub, and two short runs against the server.

Traffic goes to 127.0.0.1 only; the InfoBench judge (OpenAI) never runs here.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

import loadtest.__main__ as loadtest_main
from loadtest.__main__ import measure, parse_args, write_outputs
from loadtest.client import BatchResult, answers_in_order, attribute_tokens
from loadtest.judge import InfoBenchJudge, parse_verdict
from loadtest.lengths import REALISTIC_LENGTHS, LengthSampler
from loadtest.report import Run, build_report
from loadtest.runner import Progress
from loadtest.scoring import NOT_JUDGED, first_answers, load_gold, score_answers
from loadtest.workload import TASKS, Prompt, ScheduledBatch, classify, load_schedule
from shortcuts.data import DATA, DEV_FILES, GOLD, read_jsonl
from shortcuts.text import split_infobench
from tests.server_process import ROOT, free_port

SAMPLE = DATA / "batch_arrivals_sample.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", DEV_FILES)
def test_classify_agrees_with_the_gold_task_in_both_prompt_formats(name):
    rows = read_jsonl(DATA / name)
    assert len(rows) == 300
    assert [classify(r["prompt"]) for r in rows] == [r["task"] for r in rows]


SOLVED = "submit_paths(paths=[[0, 1]], weights=[3])"


@pytest.mark.parametrize(
    ("total", "texts", "expected"),
    [
        (101, [SOLVED, "The answer is (B).", "A haiku."], [0, 1, 100]),  # solver, letter, open
        (30, ["abc", "abcdefg", ""], [9, 21, 0]),  # open answers by length
        (0, [SOLVED, SOLVED], [0, 0]),
        (41, ["The answer is (B).", "The answer is (C)."], [21, 20]),  # MCQ reasoning
        (1, ["The answer is (B).", "The answer is (C)."], [0, 1]),
    ],
)
def test_tokens_are_attributed_to_the_answers_that_made_them(total, texts, expected):
    assert attribute_tokens(total, texts) == expected


def test_per_task_tokens_per_s_count_nothing_for_solved_graphs():
    gold = load_gold(GOLD)
    prompts = [next(p for p, item in gold.items() if item.task == task) for task in TASKS]
    result = answered(prompts, [SOLVED, "The answer is (A).", "word " * 20])
    result.response = {"usage": {"completion_tokens": 51}}
    report = build_report(Run("closed", "x", {}, [result], window_s=10.0, wall_s=10.0))
    per_task = {task: stats["tokens_per_s"] for task, stats in report["per_task"].items()}
    assert per_task == {"graph": 0.0, "mmlu_med": 0.1, "infobench": 5.0}
    assert "submit_paths" in report["per_task_tokens_note"]


def test_realistic_lengths_hit_their_median_and_p90():
    sampler = LengthSampler("realistic", seed=1)
    for task, (median, p90) in REALISTIC_LENGTHS.items():
        draws = [sampler.draw(task) for _ in range(20_000)]
        assert np.median(draws) == pytest.approx(median, rel=0.08), task
        assert np.percentile(draws, 90) == pytest.approx(p90, rel=0.08), task
    capped = LengthSampler("realistic", seed=1, cap=50)
    assert max(capped.for_batch(["infobench", "graph"]) for _ in range(500)) == 50
    assert LengthSampler("fixed").for_batch(["graph"]) == 2048


def test_answers_are_put_in_prompt_order_and_bad_bodies_rejected():
    body = {"choices": [{"index": 1, "text": "b"}, {"index": 0, "text": "a"}]}
    assert answers_in_order(body, 2) == ["a", "b"]
    bad = [
        {"choices": [{"index": 0, "text": "a"}]},
        {"choices": [{"index": 0, "text": "a"}, {"index": 0, "text": "b"}]},
        {"choices": [{"index": 0, "text": "a"}, {"index": 2, "text": "b"}]},
        {"choices": [{"index": 0, "text": "a"}, {"index": 1}]},
        {"error": "nope"},
    ]
    for case in bad:
        with pytest.raises(ValueError):
            answers_in_order(case, 2)


def test_judge_verdicts_follow_the_course_rules():
    assert parse_verdict(" Yes, it is.") is True
    assert parse_verdict("no") is False
    assert parse_verdict("The answer is YES") is True
    assert parse_verdict("Clearly NO.") is False
    assert parse_verdict("Either YES or NO") is None
    assert parse_verdict("maybe") is None


def test_judging_needs_an_explicit_key(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    argv = ["closed", "--url", "http://127.0.0.1:9", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        parse_args([*argv, "--gold", str(GOLD), "--judge-infobench"])
    assert not parse_args([*argv, "--gold", str(GOLD)]).judge_infobench


def answered(prompts: list[str], texts: list[str] | None, sent_s: float = 0.0) -> BatchResult:
    return BatchResult(
        batch_id=0,
        prompts=tuple(Prompt.of(p) for p in prompts),
        max_tokens=8,
        scheduled_s=None,
        sent_s=sent_s,
        duration_s=1.0,
        status=200 if texts is not None else 500,
        response=None,
        texts=texts,
        error=None if texts is not None else "HTTP 500",
    )


def test_grading_on_a_known_answer_set():
    gold = load_gold(GOLD)
    by_task: dict[str, list[str]] = {}
    for prompt, item in gold.items():
        by_task.setdefault(item.task, []).append(prompt)
    graph_right, graph_wrong, graph_unanswered = by_task["graph"][:3]
    mcq_right, mcq_wrong = by_task["mmlu_med"][:2]
    [path] = gold[graph_right].answer["paths"]
    letter = gold[mcq_right].answer
    other = "A" if gold[mcq_wrong].answer != "A" else "B"
    results = [
        answered(
            [graph_right, graph_wrong, mcq_right, mcq_wrong, by_task["infobench"][0]],
            [
                f"submit_paths(paths=[{path['path']}], weights=[{path['weight']}])",
                "submit_paths(paths=[[0, 1]], weights=[1])",
                f"Because... The answer is ({letter}).",
                f"The answer is ({other}).",
                "A poem.",
            ],
        ),
        answered([graph_unanswered], None),
        answered([mcq_right], ["The answer is (Z)."], sent_s=5.0),  # a later repeat: ignored
    ]
    answers = first_answers(results)
    assert answers[graph_unanswered] == "" and answers[mcq_right].startswith("Because")
    scores = asyncio.run(score_answers(answers, gold, judge=None))
    assert scores["graph"] == {"scored": 3, "score": pytest.approx(1 / 3)}
    assert scores["mmlu_med"] == {"scored": 2, "score": 0.5}
    assert scores["infobench"] == {"scored": 0, "score": NOT_JUDGED}

    async def fake_judge(text: str, meta: dict) -> float:  # stands in for the OpenAI judge
        assert text == "A poem." and meta["decomposed_questions"]
        return 0.5

    judged = asyncio.run(score_answers(answers, gold, judge=fake_judge))
    assert judged["infobench"] == {"scored": 1, "score": 0.5}


@pytest.mark.parametrize("name", DEV_FILES)
def test_the_judge_is_shown_the_task_input_from_the_prompt(name):
    gold = load_gold(DATA / name)
    by_id = {row["meta"]["original_id"]: row["prompt"] for row in read_jsonl(GOLD)}
    seen: dict[str, str] = {}

    async def fake_judge(text: str, meta: dict) -> float:
        seen[text] = meta["input"]
        return 1.0

    infobench = [(p, item) for p, item in gold.items() if item.task == "infobench"]
    answers = {p: f"answer {i}" for i, (p, _) in enumerate(infobench)}
    asyncio.run(score_answers(answers, gold, judge=fake_judge))
    inputs = [split_infobench(by_id[item.meta["original_id"]])[1] for _, item in infobench]
    matches = [
        seen[answers[p]] == expected for (p, _), expected in zip(infobench, inputs, strict=True)
    ]
    assert sum(1 for x in inputs if x) >= 40
    # the raw format cannot tell an instruction's own blank line from the input's: 3 of 100
    assert sum(matches) >= (100 if name == GOLD.name else 97)


class FakeOpenAI:
    """Records the judge's chats and answers YES, in place of the OpenAI client."""

    def __init__(self) -> None:
        self.chats: list[list[dict[str, str]]] = []
        self.chat = self.completions = self

    async def create(self, model: str, messages: list, temperature: float):
        self.chats.append([dict(m) for m in messages])
        message = type("Message", (), {"content": "YES"})
        return type("Completion", (), {"choices": [type("Choice", (), {"message": message})]})


def test_judge_prompt_holds_the_input_as_the_course_sends_it():
    judge = InfoBenchJudge(api_key="unused")
    judge._client = fake = FakeOpenAI()
    meta = {"input": "+ how are you?", "decomposed_questions": ["Is it funny?", "Is it short?"]}
    assert asyncio.run(judge.score("Great, thanks!", meta)) == 1.0
    first = fake.chats[-1][0]["content"]
    assert '\n\nInput:\n"+ how are you?"\n\nGenerated Text:\n"Great, thanks!"' in first
    assert first.endswith("Question:\nIs it funny?\n")
    assert fake.chats[-1][2] == {"role": "user", "content": "Is it short?\n"}
    judge._client = fake = FakeOpenAI()
    asyncio.run(judge.score("Hi", {**meta, "input": ""}))
    assert "Input:" not in fake.chats[0][0]["content"]


async def stub_completions(request: web.Request) -> web.Response:
    """Answers in reverse choice order (the client must reorder) and fails prompts saying FAIL."""
    body = await request.json()
    if any("FAIL" in p for p in body["prompt"]):
        return web.Response(status=500, text="boom")
    choices = [{"index": i, "text": f"echo {p}"} for i, p in enumerate(body["prompt"])]
    usage = {"completion_tokens": 3 * len(choices)}
    return web.json_response({"choices": choices[::-1], "usage": usage})


def replay_against_stub(schedule: Path, speed: float) -> Run:
    """A replay measured in-process against `stub_completions` on 127.0.0.1."""

    async def run() -> Run:
        app = web.Application()
        app.router.add_post("/v1/completions", stub_completions)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        argv = ["replay", "--url", f"http://127.0.0.1:{port}/v1/completions"]
        argv += ["--speed", str(speed), "--schedule", str(schedule), "--out", "x"]
        try:
            return await measure(parse_args(argv))
        finally:
            await runner.cleanup()

    return asyncio.run(run())


def test_replay_against_a_stub_records_errors_and_keeps_order(tmp_path, monkeypatch):
    schedule = [
        {"batch_id": 0, "arrival_time": 0.0, "prompts": ["one", "two"]},
        {"batch_id": 1, "arrival_time": 0.2, "prompts": ["FAIL please", "three"]},
        {"batch_id": 2, "arrival_time": 0.4, "prompts": ["four"]},
    ]
    (tmp_path / "schedule.json").write_text(json.dumps(schedule))
    titles: list[str] = []
    monkeypatch.setattr(
        loadtest_main, "plot_run", lambda results, path, title, window_s: titles.append(title)
    )
    run = replay_against_stub(tmp_path / "schedule.json", speed=2)
    report = write_outputs(run, tmp_path / "out")
    assert (report["prompts_sent"], report["prompts_served"], report["prompt_errors"]) == (5, 3, 2)
    assert (
        report["http_requests_sent"],
        report["http_requests_served"],
        report["http_request_errors"],
    ) == (3, 2, 1)
    assert report["http_requests_served_in_window"] == 2
    assert report["prompts_served_in_window"] == 3
    window = report["window_s"]
    assert report["http_requests_per_20min"] == pytest.approx(2 / window * 1200)
    assert report["prompts_per_20min"] == pytest.approx(3 / window * 1200)
    assert report["error_samples"] == ["HTTP 500: boom"]
    assert report["tokens_per_s"] == pytest.approx(9 / window)
    headline = (
        f"per 20 minutes: {2 / window * 1200:,.0f} HTTP requests (batches) served, "
        f"{3 / window * 1200:,.0f} prompts served"
    )
    assert headline in (tmp_path / "out" / "summary.md").read_text()
    assert titles == [f"replay · {run.url}\n{headline}"]
    assert first_answers(run.results)["two"] == "echo two"
    records = read_jsonl(tmp_path / "out" / "batches.jsonl")
    assert [r["status_code"] for r in records] == [200, 500, 200]
    assert [r["scheduled_arrival_time"] for r in records] == [0.0, 0.1, 0.2]
    assert all(r["actual_send_time"] >= r["scheduled_arrival_time"] for r in records)


def check_counts_agree_with(report: dict, schedule: list[ScheduledBatch]) -> None:
    """A replay where everything is answered serves the schedule's batches and prompts, and
    its window ends at the last answer, so all of them count towards the per-20-min figures."""
    batches, prompts = len(schedule), sum(len(b.prompts) for b in schedule)
    assert batches < prompts  # the sample batches several prompts together: the counts differ
    assert report["http_requests_sent"] == report["http_requests_served"] == batches
    assert report["http_requests_served_in_window"] == batches
    assert report["prompts_sent"] == report["prompts_served"] == prompts
    assert report["prompts_served_in_window"] == prompts
    per_20min = 1200 / report["window_s"]
    assert report["http_requests_per_20min"] == pytest.approx(batches * per_20min)
    assert report["prompts_per_20min"] == pytest.approx(prompts * per_20min)


def test_replay_of_the_sample_schedule_against_a_stub_counts_batches_and_prompts(tmp_path):
    report = write_outputs(replay_against_stub(SAMPLE, speed=100), tmp_path)
    check_counts_agree_with(report, load_schedule(SAMPLE))
    summary = (tmp_path / "summary.md").read_text()
    assert "served 4 of 4 HTTP requests (0 failed), 6 of 6 prompts (0 failed)" in summary


class FakeClock:
    """Stands in for time.monotonic, so progress lines can be counted against simulated time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_in_a_log_writes_a_line_per_interval_not_per_answer():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(total=1920, desc="replay", stream=stream, interval_s=5.0, clock=clock)
    for i in range(1, 961):  # 960 answers of 2 prompts over 30 simulated seconds
        clock.now = i / 32
        progress(answered(["one", "two"], None if i % 100 == 0 else ["a", "b"]))
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 30 // 5 + 1  # at 5, 10, ..., 30 s, and the last at close
    assert lines[0] == "replay: 160 HTTP requests done (1 failed), 320/1920 prompts, 5 s"
    assert lines[-1] == "replay: 960 HTTP requests done (9 failed), 1920/1920 prompts, 30 s"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_a_bar():
    stream = FakeTerminal()
    progress = Progress(total=4, desc="closed", stream=stream)
    progress(answered(["one", "two"], ["a", "b"]))
    progress.close()
    drawn = stream.getvalue()
    assert drawn.startswith("\rclosed:") and "2/4 [" in drawn and "requests=1" in drawn


def run_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_outputs(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert (out / "load.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "load.png").stat().st_size > 20_000  # two drawn panels, not an empty figure
    summary = (out / "summary.md").read_text()
    assert "HTTP requests (batches) served" in summary and "prompts served" in summary
    assert report["prompt_errors"] == report["http_request_errors"] == 0
    assert report["error_samples"] == []
    assert report["prompts_served"] == report["prompts_sent"] > 0
    assert report["http_requests_served"] == report["http_requests_sent"] > 0
    for unit in ("http_requests", "prompts"):
        assert report[f"{unit}_per_20min"] == pytest.approx(
            report[f"{unit}_served_in_window"] / report["window_s"] * 1200
        )
    for task, stats in report["per_task"].items():
        if stats["prompts_served"]:
            lat = stats["latency_s"]
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], task
    return report


@pytest.mark.slow
def test_replay_of_the_sample_schedule_at_10x(server, tmp_path):
    url = server.url + "/v1/completions"
    args = ["replay", "--url", url, "--schedule", str(SAMPLE), "--speed", "10"]
    args += ["--lengths", "realistic", "--max-tokens", "16", "--gold", str(GOLD)]
    done = run_cli(*args, "--out", str(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    report = check_outputs(tmp_path)
    schedule = load_schedule(SAMPLE)
    check_counts_agree_with(report, schedule)
    expected = Counter(p.task for b in schedule for p in b.prompts)
    served = {t: s["prompts_served"] for t, s in report["per_task"].items() if s["prompts_served"]}
    assert served == expected
    assert report["send_lag_s"]["max"] < 0.5
    assert report["wall_s"] >= schedule[-1].arrival_s / 10
    records = read_jsonl(tmp_path / "batches.jsonl")
    assert [r["scheduled_arrival_time"] for r in records] == [b.arrival_s / 10 for b in schedule]
    accuracy = report["accuracy"]
    assert accuracy["infobench"]["score"] == NOT_JUDGED
    assert accuracy["graph"]["scored"] == expected["graph"]
    assert accuracy["mmlu_med"]["scored"] == expected["mmlu_med"]


@pytest.mark.slow
def test_closed_loop_of_50_clients_for_10_seconds(server, tmp_path):
    url = server.url + "/v1/completions"
    args = ["closed", "--url", url, "--clients", "50", "--seconds", "10"]
    args += ["--lengths", "realistic", "--max-tokens", "16"]
    done = run_cli(*args, "--out", str(tmp_path), timeout=75)
    assert done.returncode == 0, done.stderr[-2000:]
    report = check_outputs(tmp_path)
    assert report["window_s"] == 10
    assert report["http_requests_served_in_window"] > 0
    assert report["http_requests_sent"] >= 50
    sizes = [r["batch_size"] for r in read_jsonl(tmp_path / "batches.jsonl")]
    assert len(sizes) == report["http_requests_sent"] and min(sizes) >= 1 and max(sizes) <= 8
    assert report["prompts_sent"] == sum(sizes)
    assert all(r["actual_send_time"] < 10 for r in read_jsonl(tmp_path / "batches.jsonl"))

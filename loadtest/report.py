"""Numbers people read after a run: report.json and a short Markdown summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.client import TOKENS_NOTE, BatchResult
from loadtest.workload import TASKS

COURSE_WINDOW_S = 20 * 60  # the course counts what is served in 20 minutes


@dataclass
class Run:
    """One finished run: its settings, its batches, and the window throughput is measured over.

    `window_s` is the closed loop's duration, or the replay's time to its last answer.
    """

    mode: str
    url: str
    settings: dict[str, Any]
    results: list[BatchResult]
    window_s: float
    wall_s: float
    accuracy: dict[str, dict[str, Any]] | None = field(default=None)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
    return {"p50": p50, "p90": p90, "p99": p99, "mean": float(np.mean(values)), "max": max(values)}


def _task_stats(run: Run, task: str) -> dict[str, Any]:
    """Latency of a prompt is its request's duration: a batch is answered all at once."""
    latencies: list[float] = []
    served = errors = tokens = 0
    for result in run.results:
        counts = result.completion_tokens()
        for prompt, n_tokens in zip(result.prompts, counts, strict=True):
            if prompt.task != task:
                continue
            if not result.ok:
                errors += 1
                continue
            served += 1
            latencies.append(result.duration_s)
            if result.done_s <= run.window_s:
                tokens += n_tokens
    return {
        "prompts_served": served,
        "prompt_errors": errors,
        "latency_s": percentiles(latencies),
        "output_tokens_in_window": tokens,
        "tokens_per_s": tokens / run.window_s if run.window_s > 0 else 0.0,
    }


def build_report(run: Run) -> dict[str, Any]:
    """Everything report.json holds. The course's unit is ambiguous (one HTTP request carries
    1 to 8 prompts), so every count is given twice, named: HTTP requests and prompts. The
    `*_per_20min` figures extrapolate the window's answers to the course's 20 minutes."""
    ok = [r for r in run.results if r.ok]
    in_window = [r for r in ok if r.done_s <= run.window_s]
    prompts_in_window = sum(len(r.prompts) for r in in_window)
    tokens_in_window = sum(sum(r.completion_tokens()) for r in in_window)
    per_20min = COURSE_WINDOW_S / run.window_s if run.window_s > 0 else 0.0
    report: dict[str, Any] = {
        "mode": run.mode,
        "url": run.url,
        "settings": run.settings,
        "wall_s": run.wall_s,
        "window_s": run.window_s,
        "http_requests_sent": len(run.results),
        "http_requests_served": len(ok),
        "http_request_errors": len(run.results) - len(ok),
        "prompts_sent": sum(len(r.prompts) for r in run.results),
        "prompts_served": sum(len(r.prompts) for r in ok),
        "prompt_errors": sum(len(r.prompts) for r in run.results if not r.ok),
        "error_samples": sorted({r.error for r in run.results if r.error})[:5],
        "http_requests_served_in_window": len(in_window),
        "prompts_served_in_window": prompts_in_window,
        "http_requests_per_20min": len(in_window) * per_20min,
        "prompts_per_20min": prompts_in_window * per_20min,
        "tokens_per_s": tokens_in_window / run.window_s if run.window_s > 0 else 0.0,
        "latency_s": percentiles([r.duration_s for r in ok]),  # per HTTP request
        "per_task": {task: _task_stats(run, task) for task in TASKS},
        "per_task_tokens_note": TOKENS_NOTE,
    }
    lags = [r.sent_s - r.scheduled_s for r in run.results if r.scheduled_s is not None]
    if lags:
        report["send_lag_s"] = percentiles(lags)
    if run.accuracy is not None:
        report["accuracy"] = run.accuracy
        scores = [a["score"] for a in run.accuracy.values()]
        if all(isinstance(s, float) for s in scores):
            report["accuracy_mean"] = sum(scores) / len(scores)  # the course's accuracy
    return report


def headline(report: dict[str, Any]) -> str:
    """Both per-20-minute figures under their names: summary.md and the plot title share it."""
    return (
        f"per 20 minutes: {report['http_requests_per_20min']:,.0f} HTTP requests (batches) "
        f"served, {report['prompts_per_20min']:,.0f} prompts served"
    )


def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "–" if value is None else str(value)


def summary_markdown(report: dict[str, Any]) -> str:
    """A few lines and one table: what a reviewer checks first."""
    lat = report["latency_s"]
    lines = [
        f"# Load test: {report['mode']} against {report['url']}",
        "",
        f"- **{headline(report)}** ({report['http_requests_served_in_window']} HTTP requests, "
        f"{report['prompts_served_in_window']} prompts answered in a "
        f"{_fmt(report['window_s'], 1)} s window), {_fmt(report['tokens_per_s'], 1)} output tokens/s",
        f"- served {report['http_requests_served']} of {report['http_requests_sent']} HTTP requests "
        f"({report['http_request_errors']} failed), {report['prompts_served']} of "
        f"{report['prompts_sent']} prompts ({report['prompt_errors']} failed), "
        f"in {_fmt(report['wall_s'], 1)} s",
        f"- latency per HTTP request: p50 {_fmt(lat['p50'])} s, p90 {_fmt(lat['p90'])} s, "
        f"p99 {_fmt(lat['p99'])} s",
        f"- settings: {', '.join(f'{k}={v}' for k, v in report['settings'].items())}",
    ]
    if "send_lag_s" in report:
        lines.append(f"- send lag behind schedule: p99 {_fmt(report['send_lag_s']['p99'], 3)} s")
    lines += [
        "",
        "Per task, counted in prompts; a prompt's latency is its HTTP request's.",
        "",
        "| task | prompts served | prompt errors | p50 s | p90 s | p99 s | tokens/s | score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    accuracy = report.get("accuracy") or {}
    for task, stats in report["per_task"].items():
        lat = stats["latency_s"]
        score = (accuracy.get(task) or {}).get("score", "–")
        lines.append(
            f"| {task} | {stats['prompts_served']} | {stats['prompt_errors']} | {_fmt(lat['p50'])} "
            f"| {_fmt(lat['p90'])} | {_fmt(lat['p99'])} | {_fmt(stats['tokens_per_s'], 1)} "
            f"| {_fmt(score, 3)} |"
        )
    lines.append(f"\nPer-task tokens/s: {report['per_task_tokens_note']}.")
    for sample in report["error_samples"]:
        lines.append(f"\n> error: {sample}")
    return "\n".join(lines) + "\n"

"""`python -m loadtest {replay,closed}`: drive a completion server and write a report.

  replay --url URL --schedule FILE --speed K --out DIR   the course schedule at K× speed
  closed --url URL --clients C --seconds T --out DIR     C clients back to back for T seconds
Common: --lengths {fixed,realistic}, --max-tokens N, --gold FILE, --judge-infobench, --seed.
(replay also takes --max-concurrency, default 300; closed takes --prompts FILE.)
Writes DIR/report.json, DIR/summary.md, DIR/load.png and DIR/batches.jsonl (one line per POST).
Exits 1 if any prompt went unanswered.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import orjson

from loadtest.closed import closed_loop
from loadtest.lengths import COURSE_MAX_TOKENS, LengthSampler
from loadtest.plots import plot_run
from loadtest.replay import replay
from loadtest.report import Run, build_report, headline, summary_markdown
from loadtest.runner import run_load
from loadtest.workload import load_prompts, load_schedule
from shortcuts.data import GOLD, SCHEDULE


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", required=True, help="the completions URL every POST goes to")
    common.add_argument("--out", type=Path, required=True, help="directory for the report")
    common.add_argument("--lengths", choices=("fixed", "realistic"), default="fixed")
    common.add_argument("--max-tokens", type=int, default=COURSE_MAX_TOKENS, help="cap per request")
    common.add_argument("--gold", type=Path, help="score answers against this gold JSONL")
    common.add_argument(
        "--judge-infobench",
        action="store_true",
        help="judge InfoBench answers with the course's OpenAI judge (needs OPENAI_API_KEY)",
    )
    common.add_argument("--seed", type=int, default=0)
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    rep = modes.add_parser("replay", parents=[common], help="replay the course's arrival schedule")
    rep.add_argument("--schedule", type=Path, default=SCHEDULE)
    rep.add_argument("--speed", type=float, default=1.0, help="K: arrival times are divided by K")
    rep.add_argument("--max-concurrency", type=int, default=300, help="requests in flight")
    clo = modes.add_parser("closed", parents=[common], help="C clients sending back to back")
    clo.add_argument("--clients", type=int, default=300)
    clo.add_argument("--seconds", type=float, default=300.0)
    clo.add_argument("--prompts", type=Path, default=GOLD)
    args = parser.parse_args(argv)
    if args.judge_infobench and not (args.gold and os.environ.get("OPENAI_API_KEY")):
        parser.error("--judge-infobench needs --gold and OPENAI_API_KEY in the environment")
    return args


async def measure(args: argparse.Namespace) -> Run:
    """Send the load, then score it: judging happens after the clock stops."""
    lengths = LengthSampler(args.lengths, seed=args.seed, cap=args.max_tokens)
    settings = {"lengths": args.lengths, "max_tokens": args.max_tokens, "seed": args.seed}
    if args.mode == "replay":
        schedule = load_schedule(args.schedule)
        settings |= {"schedule": args.schedule.name, "speed": args.speed}
        results, wall_s = await run_load(
            args.url,
            lambda client: replay(client, schedule, args.speed, lengths, args.max_concurrency),
            args.max_concurrency,
            sum(len(b.prompts) for b in schedule),
            f"replay ×{args.speed:g}",
        )
        window_s = max((r.done_s for r in results), default=0.0)
    else:
        pool = load_prompts(args.prompts)
        settings |= {"clients": args.clients, "seconds": args.seconds, "prompts": args.prompts.name}
        results, wall_s = await run_load(
            args.url,
            lambda client: closed_loop(
                client, pool, args.clients, args.seconds, lengths, args.seed
            ),
            max(args.clients, 1),
            None,
            f"closed {args.clients} clients",
        )
        window_s = args.seconds
    run = Run(args.mode, args.url, settings, results, window_s, wall_s)
    if args.gold:
        run.accuracy = await grade_run(run, args)
    return run


async def grade_run(run: Run, args: argparse.Namespace) -> dict:
    """Imported here: grading (and the judge's openai) is needed only when asked."""
    from loadtest.scoring import first_answers, load_gold, score_answers

    judge = None
    if args.judge_infobench:
        from loadtest.judge import InfoBenchJudge

        judge = InfoBenchJudge(os.environ["OPENAI_API_KEY"]).score
    return await score_answers(first_answers(run.results), load_gold(args.gold), judge)


def write_outputs(run: Run, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(run)
    (out / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    (out / "summary.md").write_text(summary_markdown(report))
    with (out / "batches.jsonl").open("wb") as f:
        for result in sorted(run.results, key=lambda r: r.sent_s):
            f.write(orjson.dumps(result.to_json()) + b"\n")
    title = f"{run.mode} · {run.url}\n{headline(report)}"
    plot_run(run.results, out / "load.png", title, run.window_s)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = asyncio.run(measure(args))
    report = write_outputs(run, args.out)
    print(summary_markdown(report))
    return 1 if report["prompt_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

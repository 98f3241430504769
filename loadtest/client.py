"""One POST of a batch of prompts, timed and checked, as the course's make_requests.py sends it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from loadtest.workload import Prompt

REQUEST_TIMEOUT_S = 600.0  # the course client's per-request timeout

TOKENS_NOTE = (
    "usage is per request, so output tokens are attributed per answer: a solver's bare "
    "submit_paths(...) answer made none, a bare MCQ answer line one (the scored letter), the "
    "rest goes to the other answers by length, or evenly to the MCQ answers when there are no "
    "others (the accuracy profile reasons before its answer line)"
)
_SOLVED = re.compile(r"\s*submit_paths\(paths=\[.*\], weights=\[.*\]\)\s*", re.S)
_LETTER = re.compile(r"\s*The answer is \([A-Z]\)\.\s*")


@dataclass
class BatchResult:
    """What make_requests.py records per batch, plus what the report needs per prompt.

    Times are seconds since the start of the run. `scheduled_s` is None in the closed loop.
    `texts` holds the answers in prompt order when the request succeeded.
    """

    batch_id: int
    prompts: tuple[Prompt, ...]
    max_tokens: int
    scheduled_s: float | None
    sent_s: float
    duration_s: float
    status: int | None
    response: dict[str, Any] | None
    texts: list[str] | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def done_s(self) -> float:
        return self.sent_s + self.duration_s

    def completion_tokens(self) -> list[int]:
        """Output tokens per prompt. `usage` is per request, so it is attributed (TOKENS_NOTE)."""
        if not self.ok or self.texts is None:
            return [0] * len(self.prompts)
        total = int(((self.response or {}).get("usage") or {}).get("completion_tokens") or 0)
        return attribute_tokens(total, self.texts)

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "batch_size": len(self.prompts),
            "tasks": [p.task for p in self.prompts],
            "max_tokens": self.max_tokens,
            "scheduled_arrival_time": self.scheduled_s,
            "actual_send_time": self.sent_s,
            "request_duration": self.duration_s,
            "status_code": self.status,
            "error": self.error,
            "response": self.response,
        }


def attribute_tokens(total: int, texts: list[str]) -> list[int]:
    """Split a request's completion tokens over its answers as TOKENS_NOTE says; sums to total."""
    kinds = [
        "solved" if _SOLVED.fullmatch(t) else "letter" if _LETTER.fullmatch(t) else "other"
        for t in texts
    ]
    letter = [kind == "letter" for kind in kinds]
    fixed = sum(letter) if total >= sum(letter) else 0
    weights = [len(t) if kind == "other" else 0 for t, kind in zip(texts, kinds, strict=True)]
    if not any(weights):
        weights = letter if any(letter) else [True] * len(texts)
    shares, cumulative, given = [], 0, 0
    for weight in weights:  # cumulative rounding keeps the sum exact
        cumulative += weight
        shares.append(round((total - fixed) * cumulative / sum(weights)) - given)
        given += shares[-1]
    return [share + (fixed > 0 and one) for share, one in zip(shares, letter, strict=True)]


def answers_in_order(body: Any, n: int) -> list[str]:
    """The choices' texts in prompt order; raises ValueError if the body is not n valid choices."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) != n:
        raise ValueError(f"expected {n} choices, got {body!r:.200}")
    texts: list[str | None] = [None] * n
    for choice in choices:
        index, text = choice.get("index"), choice.get("text")
        if not isinstance(index, int) or not 0 <= index < n or texts[index] is not None:
            raise ValueError(f"bad or repeated choice index {index!r}")
        if not isinstance(text, str):
            raise ValueError(f"choice {index} has no text")
        texts[index] = text
    return [t for t in texts if t is not None]


class CompletionClient:
    """Sends batches to one URL and reports each result; never raises for a failed request."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        on_result: Callable[[BatchResult], None] = lambda _: None,
    ) -> None:
        self._session = session
        self._url = url
        self._on_result = on_result
        self._t0 = time.perf_counter()

    def now(self) -> float:
        """Seconds since the client was made: the run's clock."""
        return time.perf_counter() - self._t0

    async def send(
        self,
        batch_id: int,
        prompts: tuple[Prompt, ...],
        max_tokens: int,
        scheduled_s: float | None = None,
    ) -> BatchResult:
        payload = {"prompt": [p.text for p in prompts], "max_tokens": max_tokens}
        sent = self.now()
        status: int | None = None
        body: Any = None
        texts: list[str] | None = None
        error: str | None = None
        try:
            async with self._session.post(
                self._url,
                data=orjson.dumps(payload),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
            ) as resp:
                status = resp.status
                raw = await resp.read()
            if status != 200:
                error = f"HTTP {status}: {raw[:200].decode(errors='replace')}"
            else:
                body = orjson.loads(raw)
                texts = answers_in_order(body, len(prompts))
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:  # JSON errors are ValueErrors
            error = f"{type(e).__name__}: {e}"[:300]
        result = BatchResult(
            batch_id=batch_id,
            prompts=prompts,
            max_tokens=max_tokens,
            scheduled_s=scheduled_s,
            sent_s=sent,
            duration_s=self.now() - sent,
            status=status,
            response=body if isinstance(body, dict) else None,
            texts=texts,
            error=error,
        )
        self._on_result(result)
        return result

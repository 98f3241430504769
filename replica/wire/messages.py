"""Every message between the front end and a replica, one frozen dataclass each.

They cross the socket pickled inside replica.wire.framing's frames. The front end imports this
module and never torch, so nothing here may import it (or anything that does).

Front end -> replica: a Request (a GenerateJob or a ScoreJob under the id the dispatcher gave
it), Cancel, Shutdown. Replica -> front end: Ready once loaded, then for each request exactly
one of Result, Failed or Cancelled (a streamed GenerateJob first sends its text in Deltas).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Chat = list[dict[str, str]]  # [{"role": ..., "content": ...}]: what the chat template renders
FinishReason = Literal["stop", "length"]
# When the checkpoint's sampling settings (its generation_config.json) replace a request's:
# "never" (the client set temperature, top_p or top_k), "always" (chat, which set none of them:
# vLLM's default), "thinking" (the course path, which set none: only a model that thinks
# samples, seeded by its prompt; the others stay greedy)
CheckpointDefaults = Literal[
    "never", "always", "thinking"
]  # the one definition: engine, wire and API share it


@dataclass(frozen=True)
class SamplingParams:
    """How a request draws its tokens (replica.ops.sampler does the drawing)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # None: the engine draws one

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class Decoding:
    """The client's decoding settings: how tokens are drawn (None: greedy), the strings that
    end the text before them, and when the checkpoint's own sampling settings replace these."""

    sampling: SamplingParams | None = None
    stop: tuple[str, ...] = ()
    defaults: CheckpointDefaults = "never"


@dataclass(frozen=True)
class Reasoning:
    """Whether and how long the model thinks before it answers."""

    # None: the model's default (always-thinking thinks, hybrid and thinking-free do not);
    # True/False: the client's enable_thinking (ignored by a model that cannot think or always
    # does)
    enabled: bool | None = None
    budget: int = 1024  # most thought tokens; 0: the think block closes at once


@dataclass(frozen=True)
class ScoreJob:
    """One prefill of `messages` plus `prefix`; the answer is the index of the option whose
    token the model ranks highest next (no decode step at all).

    As a GenerateJob's `if_thinking`, for a model that thinks: `votes` thoughts are sampled
    (forks of one prefill), each closed and followed by `prefix`, and one more prefill each (over
    the thought's cached blocks) gives the options' probabilities; the answer is the option with
    the largest sum. The replica takes one vote while its decode rows are busy."""

    messages: Chat
    prefix: str
    options: tuple[str, ...]
    votes: int = 1


@dataclass(frozen=True)
class GenerateJob:
    """Decode an assistant turn for `messages`, at most `max_tokens` tokens (already the
    lower of the profile's cap and the client's), `n` times from one prefill; `stream` sends
    the text in Deltas as it grows. `max_tokens` counts the thought and the answer.

    `if_thinking`: what a model that thinks (under `reasoning`) does instead (an MCQ of the
    accuracy profile: think, then score); its Result then carries `choice`, not text."""

    messages: Chat
    max_tokens: int
    decoding: Decoding = Decoding()
    stream: bool = False
    n: int = 1
    reasoning: Reasoning = Reasoning()
    if_thinking: ScoreJob | None = None


Job = GenerateJob | ScoreJob


@dataclass(frozen=True)
class Request:
    """A job under the id the dispatcher gave it; the replica's answer carries the same id."""

    id: int
    job: Job


@dataclass(frozen=True)
class Cancel:
    """The client went away: drop the request and free its KV."""

    id: int


@dataclass(frozen=True)
class Shutdown:
    """Exit once the messages before this one are handled."""


@dataclass(frozen=True)
class Ready:
    """Loaded and serving; `info` describes the replica for /health (model, pid, KV slots…)."""

    info: dict[str, Any]


@dataclass(frozen=True)
class Usage:
    """Tokens a replica processed for a request (OpenAI's usage, without the total)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # thought tokens, also counted in completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
        )


@dataclass(frozen=True)
class KVUsage:
    """The replica's KV pool when it sent a result: blocks free (never used, or cached and held
    by none), blocks whose contents the prefix cache keeps, and the prompt tokens admitted so far
    and how many of them the cache already held."""

    blocks_total: int
    blocks_free: int
    blocks_cached: int
    prompt_tokens: int
    prompt_tokens_cached: int


@dataclass(frozen=True)
class Sample:
    """One of the n generated texts of a GenerateJob."""

    text: str
    finish_reason: FinishReason
    reasoning: str | None = None  # the thought's text; None when the model did not think


@dataclass(frozen=True)
class Result:
    """A request's answer: the generated text (its first sample; `more` holds the others when
    n > 1), or for a ScoreJob the chosen option's index. `text` is the answer alone (never a
    think tag; a thought is in `reasoning`). `usage` counts the prompt once and every sample's
    tokens."""

    id: int
    text: str
    finish_reason: FinishReason
    usage: Usage
    choice: int | None = None
    kv: KVUsage | None = None  # the replica's pool as this result left it
    more: tuple[Sample, ...] = ()
    reasoning: str | None = None  # its first sample's thought (samples 1.. carry theirs in more)

    @property
    def samples(self) -> tuple[Sample, ...]:
        return (Sample(self.text, self.finish_reason, self.reasoning), *self.more)


@dataclass(frozen=True)
class Delta:
    """More text of a streamed request's sample, as it is generated (never half a character)."""

    id: int
    text: str
    sample: int = 0
    reasoning: bool = False  # True: this piece is thought text


@dataclass(frozen=True)
class Failed:
    """A request the replica refused; status, param and code follow OpenAI's errors
    (e.g. 400, "prompt", "context_length_exceeded")."""

    id: int
    status: int
    message: str
    param: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class Cancelled:
    """The engine dropped a cancelled request and freed its KV blocks."""

    id: int


ToReplica = Request | Cancel | Shutdown
FromReplica = Ready | Delta | Result | Failed | Cancelled
Message = ToReplica | FromReplica

"""What the completion service honours of a request besides its prompts (api.params parses it
from the body; the service reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from replica.wire.messages import Decoding, Reasoning


@dataclass(frozen=True)
class Options:
    """What we honour of a request besides its prompt: the client's token cap, its decoding
    settings, how many samples each prompt gets, whether (and with a usage chunk or not) to
    stream, and its reasoning settings: `enable_thinking` (chat_template_kwargs'; None: the
    model's default) and the thinking budget its `reasoning_effort` names (None: the server's)."""

    max_tokens: int | None = None
    decoding: Decoding = field(default_factory=Decoding)
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    enable_thinking: bool | None = None
    thinking_budget: int | None = None

    def reasoning(self, server_budget: int) -> Reasoning:
        """The request's Reasoning: its own budget (from reasoning_effort) over the server's
        (--reasoning-budget, else the profile's)."""
        budget = server_budget if self.thinking_budget is None else self.thinking_budget
        return Reasoning(self.enable_thinking, budget)

"""What the completion service honours of a request besides its prompts (api.params parses it
from the body; the service reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from replica.wire.messages import Decoding


@dataclass(frozen=True)
class Options:
    """What we honour of a request besides its prompt: the client's token cap, its decoding
    settings, how many samples each prompt gets, and whether (and with a usage chunk or not)
    to stream."""

    max_tokens: int | None = None
    decoding: Decoding = field(default_factory=Decoding)
    stream: bool = False
    include_usage: bool = False
    n: int = 1

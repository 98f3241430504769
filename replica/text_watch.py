"""A generated text followed token by token: for streaming, and for stop strings, which must
end a request as soon as they appear (its KV slot is freed then, not at its token cap)."""

from __future__ import annotations

from collections.abc import Callable

Decode = Callable[[list[int]], str]
PARTIAL = "\ufffd"  # what decoding shows for the first bytes of a character split over tokens


class TextWatch:
    """One request's text as its tokens arrive, decoded incrementally (a character whose bytes
    span tokens appears whole, once its last token is in) and cut before the first stop
    string."""

    def __init__(self, decode: Decode, prompt_tokens: int, stop: tuple[str, ...]) -> None:
        self.decode = decode
        self.prompt_tokens = prompt_tokens
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self.sent = 0  # characters of `text` handed out by `unsent`
        self._prefix = 0  # ids[_prefix:_read] decode to the end of `text`: context for the rest
        self._read = 0

    def add(self, ids: list[int]) -> None:
        """Take new tokens; `stopped` turns True when a stop string appears."""
        if self.stopped:
            return
        self.ids += ids
        known = self.decode(self.ids[self._prefix : self._read])
        grown = self.decode(self.ids[self._prefix :])
        if len(grown) <= len(known) or grown.endswith(PARTIAL):
            return
        self._extend(grown[len(known) :])
        self._prefix, self._read = self._read, len(self.ids)

    def _extend(self, new: str) -> None:
        longest = max((len(stop) for stop in self.stop), default=0)
        start = max(0, len(self.text) - longest + 1)
        self.text += new
        cuts = [at for stop in self.stop if (at := self.text.find(stop, start)) >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.stopped = True

    def finish(self) -> str:
        """The whole text once generation ended: decoded in one piece unless a stop cut it."""
        if not self.stopped:
            self.text = self.decode(self.ids)
        return self.text

    def unsent(self) -> str:
        """Text not handed out yet, keeping back a tail that could begin a stop string."""
        held = 0 if self.stopped else max((len(stop) - 1 for stop in self.stop), default=0)
        end = max(self.sent, len(self.text) - held)
        piece, self.sent = self.text[self.sent : end], end
        return piece

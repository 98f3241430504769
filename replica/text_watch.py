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


class Trimmed:
    """A text handed out piece by piece as its trimmed form would show it: leading whitespace
    dropped (`lstrip`), trailing whitespace held back until more text follows (`hold_tail`).
    Each piece costs its own length, however long the text grows."""

    def __init__(self, lstrip: bool, hold_tail: bool) -> None:
        self.lstrip, self.hold_tail = lstrip, hold_tail
        self.started = not lstrip
        self.held = ""

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        if not self.hold_tail:
            return piece
        text = self.held + piece
        body = text.rstrip()
        self.held = text[len(body) :]
        return body


class SampleWatch:
    """A generated sample's text as its tokens arrive. One that thinks (`end_id`, `</think>`,
    given) has two parts: the thought until `end_id` and the answer after it, each decoded on its
    own, trimmed as the chat template trims them (the thought of surrounding whitespace, the
    answer of leading whitespace); stop strings watch the answer alone. `end_id` itself is in
    neither text."""

    def __init__(self, decode: Decode, stop: tuple[str, ...], end_id: int | None = None) -> None:
        self.end_id = end_id
        self.thinking = end_id is not None  # its tokens still go to the thought
        self.thought_watch = TextWatch(decode, 0, ())
        self.answer = TextWatch(decode, 0, stop)
        self.thought_tokens = 0  # the think block's tokens, `end_id` included
        trims = end_id is not None
        self._shown = (Trimmed(trims, trims), Trimmed(trims, False))  # thought, answer pieces

    @property
    def stopped(self) -> bool:
        return self.answer.stopped

    @property
    def tokens(self) -> int:
        """Tokens the sample counts: its think block and its answer up to a stop string."""
        return self.thought_tokens + len(self.answer.ids)

    def add(self, ids: list[int]) -> None:
        if self.thinking:
            cut = ids.index(self.end_id) if self.end_id in ids else len(ids)
            self.thought_watch.add(ids[:cut])
            self.thought_tokens += min(cut + 1, len(ids))
            if cut == len(ids):
                return
            self.thinking, ids = False, ids[cut + 1 :]
        self.answer.add(ids)

    def _trim(self, part: int, text: str) -> str:
        if self.end_id is None:
            return text
        return text.strip() if part == 0 else text.lstrip()

    def unsent(self) -> list[tuple[str, bool]]:
        """(piece, is thought) for text not handed out yet: the thought's, then the answer's.
        The pieces of each part add up to a prefix of its final text."""
        pieces = []
        for part, watch in enumerate((self.thought_watch, self.answer)):
            if piece := self._shown[part].feed(watch.unsent()):
                pieces.append((piece, part == 0))
        return pieces

    def finish(self) -> tuple[str, str | None]:
        """(the answer, the thought or None when it did not think), generation over."""
        answer = self._trim(1, self.answer.finish())
        if self.end_id is None:
            return answer, None
        return answer, self._trim(0, self.thought_watch.finish())

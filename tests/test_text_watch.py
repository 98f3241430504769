"""Incremental detokenizing and stop strings with the real tokenizer: whole characters only,
pieces that add up to the one-piece decode, stops found across token boundaries."""

from __future__ import annotations

import pytest

from replica.loading.source import VENDORED_TOKENIZER
from replica.text_watch import TextWatch
from replica.tokenization import PromptCodec

TEXT = "Ünïcödé ✓ 汉字 and emoji 🙂🚀, then plain words to finish."


@pytest.fixture(scope="module")
def codec() -> PromptCodec:
    return PromptCodec(VENDORED_TOKENIZER)


def fed(codec: PromptCodec, text: str, stop: tuple[str, ...] = ()) -> tuple[TextWatch, list[str]]:
    """A watch fed `text`'s tokens one at a time, and the pieces it handed out meanwhile."""
    watch = TextWatch(codec.decode, 0, stop)
    pieces = []
    for token in codec.tokenizer.encode(text, add_special_tokens=False):
        watch.add([token])
        pieces.append(watch.unsent())
    return watch, pieces


def test_pieces_are_whole_characters_and_add_up(codec):
    watch, pieces = fed(codec, TEXT)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == TEXT == watch.finish()
    assert any(len(piece.encode()) > 1 and len(piece) == 1 for piece in pieces if piece)


def test_a_stop_string_cuts_the_text_even_across_tokens(codec):
    watch, pieces = fed(codec, TEXT, stop=("emoji 🙂", "never"))
    assert watch.stopped and watch.finish() == TEXT[: TEXT.index("emoji 🙂")]
    assert "".join(pieces) == watch.finish()


def test_a_tail_that_could_begin_a_stop_is_held_back(codec):
    watch = TextWatch(codec.decode, 0, ("STOP",))
    watch.add(codec.tokenizer.encode("hello ST", add_special_tokens=False))
    assert watch.unsent() == "hello"
    watch.add(codec.tokenizer.encode("ay", add_special_tokens=False))
    assert watch.unsent() == " S"  # the last 3 characters could still begin "STOP"
    assert not watch.stopped and watch.finish() == "hello STay"  # the Result brings the rest

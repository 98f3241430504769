"""Which models this engine serves, decided before any weight is loaded.

A model we would serve wrongly (another architecture, scaled RoPE, a template that always thinks,
a checkpoint whose tensors do not match its config) is refused at start-up with one line naming
what is unsupported, instead of crashing a replica in a restart loop or answering garbage. The
config's own checks run when it is read (replica.loading.config); these need the tokenizer and
the checkpoint's tensor names.
"""

from __future__ import annotations

import argparse
import sys

from replica.loading.config import UnsupportedModel
from replica.loading.reader import CheckpointReader
from replica.loading.source import ModelSource, resolve
from replica.loading.weights import expected_tensor_names, redundant_tensor_names
from replica.tokenization import PromptCodec


def check_chat_template(render: str) -> None:
    """`render` is a user turn plus the generation prompt, thinking off. A Thinking model's
    template opens a think block there regardless: we would score MCQ letters inside it and
    return raw reasoning as the answer."""
    answer = render.rsplit("<|im_start|>assistant", 1)[-1]
    if "<think>" in answer and "</think>" not in answer:
        raise UnsupportedModel(
            "the chat template always opens a <think> block (a Thinking model); "
            "serve an Instruct or hybrid Qwen3 instead"
        )


def check_tensors(present: set[str], expected: set[str], redundant: set[str]) -> None:
    """The checkpoint holds exactly the tensors the config implies (`redundant` may appear)."""
    missing = sorted(expected - present)
    unused = sorted(present - expected - redundant)
    for names, what in ((missing, "missing"), (unused, "unused")):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise UnsupportedModel(f"checkpoint tensors {what}: {', '.join(names[:3])}{more}")


def check_servable(source: ModelSource) -> None:
    """Everything above for a resolved model: its config was checked when it was read; this
    renders its chat template and, for a real checkpoint, matches its tensor names."""
    codec = PromptCodec(source.tokenizer_dir)
    check_chat_template(codec.render([{"role": "user", "content": "Hello"}]))
    if source.weights_dir is not None:
        present = CheckpointReader.from_dir(source.weights_dir).names
        expected = expected_tensor_names(source.config)
        check_tensors(present, expected, redundant_tensor_names(source.config, present))


def main(argv: list[str] | None = None) -> int:
    """`python -m replica.loading.servable MODEL [--random-weights]`: exit 0 if we can serve it, else
    print one line saying why and exit 2. The server runs it before starting any replica."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model")
    parser.add_argument("--random-weights", action="store_true")
    args = parser.parse_args(argv)
    try:
        check_servable(resolve(args.model, args.random_weights))
    except (UnsupportedModel, OSError, ValueError) as error:
        print(f"cannot serve {args.model}: {error}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

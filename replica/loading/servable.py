"""Which models this engine serves, decided before any weight is loaded.

A model we would serve wrongly (another architecture, scaled RoPE, a chat template that is neither
thinking-free, hybrid nor always-thinking, a checkpoint whose tensors do not match its config) is refused at start-up with one line naming
what is unsupported, instead of crashing a replica in a restart loop or answering garbage. The
config's own checks run when it is read (replica.loading.config); these need the tokenizer and
the checkpoint's tensor names.
"""

from __future__ import annotations

import argparse
import sys

from replica.loading.config import UnsupportedModel
from replica.loading.model import QUANTIZE_MODES, check_quantize
from replica.loading.quantization import int4_checkpoint
from replica.loading.reader import CheckpointReader
from replica.loading.source import ModelSource, resolve
from replica.loading.weights import expected_tensor_names, redundant_tensor_names
from replica.tokenization import PromptCodec, UnsupportedTemplate
from replica.wire.stages import check_stages


def check_chat_template(source: ModelSource) -> PromptCodec:
    """The model's codec, whose chat template is thinking-free, hybrid or always-thinking
    (replica.tokenization.reasoning_kind classifies it)."""
    try:
        return source.codec()
    except UnsupportedTemplate as error:
        raise UnsupportedModel(str(error)) from error


def check_tensors(present: set[str], expected: set[str], redundant: set[str]) -> None:
    """The checkpoint holds exactly the tensors the config implies (`redundant` may appear)."""
    missing = sorted(expected - present)
    unused = sorted(present - expected - redundant)
    for names, what in ((missing, "missing"), (unused, "unused")):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise UnsupportedModel(f"checkpoint tensors {what}: {', '.join(names[:3])}{more}")


def check_servable(source: ModelSource, quantize: str | None = None, stages: int = 1) -> None:
    """Everything above for a resolved model: its config was checked when it was read; this
    checks its quantization (a 4-bit format we serve, or `--quantize` on a 16-bit one), that its
    layers split into `stages` pipeline stages, classifies its chat template and, for a real
    checkpoint, matches its tensor names."""
    checkpoint = int4_checkpoint(source.config)
    check_stages(stages, source.config.num_hidden_layers)
    check_quantize(source, quantize)
    check_chat_template(source)
    if source.weights_dir is not None:
        present = CheckpointReader.from_dir(source.weights_dir).names
        expected = expected_tensor_names(source.config, checkpoint, present)
        check_tensors(present, expected, redundant_tensor_names(source.config, present))


def main(argv: list[str] | None = None) -> int:
    """`python -m replica.loading.servable MODEL [--random-weights] [--quantize int4]
    [--pipeline-parallel-size P]`: exit 0 if we can serve it, else
    print one line saying why and exit 2. The server runs it before starting any replica."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        source = resolve(args.model, args.random_weights)
        check_servable(source, args.quantize, args.pipeline_parallel_size)
    except (UnsupportedModel, OSError, ValueError) as error:
        print(f"cannot serve {args.model}: {error}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

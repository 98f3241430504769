"""Which models this engine serves, decided before any weight is loaded.

A model we would serve wrongly (another architecture, scaled RoPE, a template that always thinks,
a checkpoint whose tensors do not match its config) is refused at start-up with one line naming
what is unsupported, instead of crashing a replica in a restart loop or answering garbage.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from transformers import PretrainedConfig, Qwen3Config, Qwen3MoeConfig

if TYPE_CHECKING:
    from replica.checkpoint import ModelSource

CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "qwen3": Qwen3Config,
    "qwen3_moe": Qwen3MoeConfig,
}


class UnsupportedModel(ValueError):
    """The model cannot be served by this engine; the message says why, in one line."""


def config_from_dict(raw: dict[str, Any]) -> PretrainedConfig:
    """The config through transformers' own class for its model_type (so that, for example,
    `num_experts` and `num_local_experts` read the same), refusing other families."""
    model_type = raw.get("model_type")
    if model_type not in CONFIG_CLASSES:
        served = ", ".join(CONFIG_CLASSES)
        raise UnsupportedModel(f"model_type {model_type!r} is not served (served: {served})")
    config = CONFIG_CLASSES[model_type].from_dict(raw)
    check_config(config)
    return config


def check_config(config: PretrainedConfig) -> None:
    """Refuse the options our forward does not implement rather than ignore them."""
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems = [
        (rope_type != "default", f"rope scaling {rope_type!r} (e.g. YaRN)"),
        (getattr(config, "attention_bias", False), "attention_bias"),
        (getattr(config, "use_sliding_window", False), "sliding-window attention"),
        (getattr(config, "hidden_act", "silu") != "silu", f"hidden_act {config.hidden_act!r}"),
    ]
    if config.model_type == "qwen3_moe":
        problems += [
            (bool(config.mlp_only_layers), "dense layers among the MoE layers (mlp_only_layers)"),
            (config.decoder_sparse_step != 1, "decoder_sparse_step other than 1"),
        ]
    for unsupported, what in problems:
        if unsupported:
            raise UnsupportedModel(f"{config.model_type} with {what} is not supported")


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
    from replica.checkpoint import CheckpointReader
    from replica.tokenization import PromptCodec
    from replica.weights import expected_tensor_names, redundant_tensor_names

    codec = PromptCodec(source.tokenizer_dir)
    check_chat_template(codec.render([{"role": "user", "content": "Hello"}]))
    if source.weights_dir is not None:
        present = CheckpointReader.from_dir(source.weights_dir).names
        expected = expected_tensor_names(source.config)
        check_tensors(present, expected, redundant_tensor_names(source.config, present))


def main(argv: list[str] | None = None) -> int:
    """`python -m replica.servable MODEL [--random-weights]`: exit 0 if we can serve it, else
    print one line saying why and exit 2. The server runs it before starting any replica."""
    import argparse

    from replica.checkpoint import resolve

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

"""transformers' own greedy generation: what our engine's tokens are compared against."""

from __future__ import annotations

import torch

from replica.loading.source import VENDORED_TOKENIZER
from replica.tokenization import PromptCodec

EOS_IDS = PromptCodec(VENDORED_TOKENIZER).eos_ids  # <|im_end|>, <|endoftext|>


def greedy_continuations(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation by `model.generate`, one prompt at a time."""
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=list(EOS_IDS),
                pad_token_id=EOS_IDS[1],
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs

"""transformers' own generation, greedy or drawn by the reference sampler: what our engine's
tokens are compared against."""

from __future__ import annotations

import torch

from replica.loading.source import VENDORED_TOKENIZER
from replica.ops.sampler import sample
from replica.tokenization import PromptCodec
from replica.wire.messages import SamplingParams

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


def sampled_continuation(
    model, prompt: list[int], sampling: SamplingParams | None, new_tokens: int
) -> list[int]:
    """One prompt alone, token by token: transformers' logits of the whole prefix, then the
    reference sampler with this row's settings (argmax when greedy). Token j is drawn with the
    noise of the position it follows, as the engine draws it; EOS ends it and is not kept."""
    params = sampling or SamplingParams()
    settings = [
        torch.tensor([value])
        for value in (params.temperature, params.top_k, params.top_p, params.seed or 0)
    ]
    ids = list(prompt)
    with torch.no_grad():
        while len(ids) - len(prompt) < new_tokens:
            logits = model(torch.tensor([ids])).logits[:, -1].float()
            position = torch.tensor([len(ids) - 1])
            token = int(sample(logits, *settings, position)[0])
            if token in EOS_IDS:
                break
            ids.append(token)
    return ids[len(prompt) :]

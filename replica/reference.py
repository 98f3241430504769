"""transformers `generate` behind the Engine contract: the baseline our own engine is measured
against (the course starter's approach), one static batch at a time."""

from __future__ import annotations

from collections import deque

import torch

from replica.checkpoint import ModelSource, build_reference_model
from replica.protocol import EngineRequest, EngineResult


class ReferenceEngine:
    def __init__(
        self,
        source: ModelSource,
        device: str,
        dtype: torch.dtype,
        eos_ids: tuple[int, ...],
        pad_id: int,
        max_batch: int = 64,
    ) -> None:
        self.model = build_reference_model(source, dtype).to(device)
        self.device = device
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.waiting: deque[EngineRequest] = deque()

    def add(self, request: EngineRequest) -> None:
        self.waiting.append(request)

    def cancel(self, request_id: int) -> bool:
        before = len(self.waiting)
        self.waiting = deque(r for r in self.waiting if r.id != request_id)
        return len(self.waiting) < before

    def has_work(self) -> bool:
        return bool(self.waiting)

    def step(self) -> list[EngineResult]:
        """Run the oldest request's kind as one static batch to completion."""
        kind = self.waiting[0].kind
        batch = [r for r in self.waiting if r.kind == kind][: self.max_batch]
        taken = {r.id for r in batch}
        self.waiting = deque(r for r in self.waiting if r.id not in taken)
        return self._score(batch) if kind == "score" else self._generate(batch)

    def _left_padded(self, batch: list[EngineRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def _score(self, batch: list[EngineRequest]) -> list[EngineResult]:
        ids, mask = self._left_padded(batch)
        last_logits = self.model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        results = []
        for row, request in enumerate(batch):
            logits = last_logits[row, request.choice_ids].tolist()
            best = max(range(len(logits)), key=logits.__getitem__)
            results.append(
                EngineResult(request.id, len(request.prompt_ids), [], "stop", best, logits)
            )
        return results

    @torch.inference_mode()
    def _generate(self, batch: list[EngineRequest]) -> list[EngineResult]:
        ids, mask = self._left_padded(batch)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(r.max_new_tokens for r in batch),
            do_sample=False,
            eos_token_id=list(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        return [
            self._trim(request, out[row, ids.shape[1] :].tolist())
            for row, request in enumerate(batch)
        ]

    def _trim(self, request: EngineRequest, new_ids: list[int]) -> EngineResult:
        """Cut at the first EOS (stop) or at the request's own cap (length)."""
        new_ids = new_ids[: request.max_new_tokens]
        for position, token in enumerate(new_ids):
            if token in self.eos_ids:
                return EngineResult(request.id, len(request.prompt_ids), new_ids[:position], "stop")
        reason = "length" if len(new_ids) == request.max_new_tokens else "stop"
        return EngineResult(request.id, len(request.prompt_ids), new_ids, reason)

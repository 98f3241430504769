"""A checkpoint's tensors by Hugging Face name, read from safetensors shards on demand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointReader:
    """A checkpoint's tensors by Hugging Face name, each read only when taken.

    Reading on demand lets the loader build one layer at a time, so the host never holds more
    than a layer's worth of source tensors. It remembers what was taken, so that tensors the
    model never used can be reported instead of silently ignored.
    """

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]]) -> None:
        self._loaders = loaders
        self._taken: set[str] = set()

    @classmethod
    def from_dir(cls, weights_dir: Path) -> CheckpointReader:
        loaders: dict[str, Callable[[], torch.Tensor]] = {}
        for shard in sorted(weights_dir.glob("*.safetensors")):
            handle = safe_open(str(shard), framework="pt", device="cpu")
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                loaders[name] = _getter(handle, name)
        if not loaders:
            raise FileNotFoundError(f"no *.safetensors in {weights_dir}")
        return cls(loaders)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> CheckpointReader:
        return cls({name: (lambda t=tensor: t) for name, tensor in state.items()})

    @property
    def names(self) -> set[str]:
        return set(self._loaders)

    def take(self, name: str) -> torch.Tensor:
        if name not in self._loaders:
            raise KeyError(f"checkpoint tensor {name} is missing")
        self._taken.add(name)
        return self._loaders[name]()

    def untaken(self) -> set[str]:
        return self.names - self._taken


def _getter(handle, name: str) -> Callable[[], torch.Tensor]:
    return lambda: handle.get_tensor(name)

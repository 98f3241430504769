"""How the front end starts a replica: the arguments its spawned process receives.

Both dataclasses are frozen, picklable and torch-free (the front end builds them from the command
line, replica.wire.flags, and never imports torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_MODEL_LEN = 32768
DEFAULT_MAX_BATCH = 256
DEFAULT_PREFILL_TOKENS = 16384
DEFAULT_KV_FRACTION = 0.9
ATTENTION_CHOICES = ("reference", "triton", "flash")
QUANTIZE_CHOICES = ("int4",)


@dataclass(frozen=True)
class EngineConfig:
    """How one engine runs its model. Memory and shapes are fixed when it starts; the
    scheduling policy (`POLICY_FIELDS`) may change between runs (Engine.set_policy)."""

    max_model_len: int = DEFAULT_MAX_MODEL_LEN  # the context cap; the model's own is the most
    max_batch: int = DEFAULT_MAX_BATCH  # the largest decode batch
    prefill_tokens: int = DEFAULT_PREFILL_TOKENS  # a prefill step's tokens (longer: chunks)
    kv_fraction: float = DEFAULT_KV_FRACTION  # of the GPU memory free after the weights
    gpu_memory_gb: float | None = None  # plan as if the GPU had this many GiB (79: an A100)
    kv_blocks: int | None = None  # a fixed pool size (default: what memory holds; CPU: 64k tokens)
    refill: bool = True  # False: static batching (the ablation)
    min_refill: int | None = None  # free decode rows that start a refill (default max_batch / 8)
    prefix_caching: bool = True  # False: every prompt computed whole (the ablation)
    attention: str | None = None  # a backend of ATTENTION_CHOICES (default: the best that runs)
    cuda_graphs: bool | None = None  # decode as graph replays (default: on CUDA)
    warm_up: bool | None = None  # compile the prefill kernels at start-up (default: on CUDA)
    quantize: str | None = None  # QUANTIZE_CHOICES: a 16-bit checkpoint made 4-bit at load
    seed: int = 0  # random weights' seed
    pipeline_parallel_size: int = 1  # stages a replica's layers split into, one device each
    micro_batches: int = 2  # in flight between a pipeline's stages (1: none; one stage: 1)

    POLICY_FIELDS = ("refill", "min_refill", "prefix_caching", "prefill_tokens")

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_batch", "prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(
                f"--pipeline-parallel-size must be at least 1, not {self.pipeline_parallel_size}"
            )
        if self.micro_batches not in (1, 2):
            raise ValueError(f"micro_batches is 1 or 2, not {self.micro_batches}")
        if self.attention not in (None, *ATTENTION_CHOICES):
            raise ValueError(f"attention {self.attention!r}: choose from {ATTENTION_CHOICES}")
        if self.quantize not in (None, *QUANTIZE_CHOICES):
            raise ValueError(f"quantize {self.quantize!r}: choose from {QUANTIZE_CHOICES}")


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica needs to start: which model, on which GPUs (one a pipeline stage, a
    GPU may repeat; none: the CPU), with how many CPU threads, and its engine's configuration."""

    model: str
    gpus: tuple[int, ...] = ()
    random_weights: bool = False
    cpu_threads: int = 1
    engine: EngineConfig = field(default_factory=EngineConfig)

"""What each system deploys and how big it is: model, profile, container sizing, KV block plan.
Read by deploy/modal_app.py, deploy/weights.py and `deploy.sh --dry-run` (which runs this file).
Standard library only: `modal deploy` imports it with the Python that runs the `modal` command
(a pipx or uv tool environment with nothing else in it), and the dry run with plain python3.

deploy.sh passes the per-system choices as DEPLOY_APP_NAME, DEPLOY_PROFILE, DEPLOY_MODEL (empty:
the profile's default), DEPLOY_MAX_CONTAINERS and DEPLOY_REASONING_BUDGET (empty: the profile's);
the Modal container gets the same variables, so it rebuilds the same Deployment on import.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENDORED_CONFIGS = PROJECT_ROOT / "vendor" / "configs"
GiB = 1 << 30
KiB = 1 << 10

# Answer caps per profile: the most tokens a prompt may generate (shortcuts/profiles.py: the
# open-answer cap, and for accuracy also the MCQ reasoning cap, which is smaller).
ANSWER_CAPS = {"throughput": 512, "balanced": 1024, "accuracy": 2048}
# Thinking budgets per profile when a request names no reasoning_effort (shortcuts/profiles.py;
# tests/test_deploy.py holds the two equal: shortcuts needs the project's dependencies).
REASONING_BUDGETS = {"throughput": 256, "balanced": 512, "accuracy": 1024}
DEFAULT_MODELS = {
    "throughput": "Qwen/Qwen3-4B-Instruct-2507",
    "balanced": "Qwen/Qwen3-4B-Instruct-2507",
    "accuracy": "Qwen/Qwen3-30B-A3B-Instruct-2507",  # MoE, 61 GB: one whole copy per GPU
}

APP_NAME = "qwen3-completion-dev"  # `modal deploy deploy/modal_app.py` without deploy.sh
ENDPOINT = "completion"  # the function name; Modal's default label is `<app>-<function>`
PORT = 8000
GPU_TYPE, GPU_COUNT = "A100-80GB", 2
GPU = f"{GPU_TYPE}:{GPU_COUNT}"
GPU_MEMORY_BYTES = 80 * GiB
CPU_CORES = 8.0  # front end (HTTP, graph solver, planner workers) and two tokenizing replicas
MEMORY_MIB = 64 * 1024  # a 61 GB checkpoint passes through host memory on its way to the GPUs
MAX_INPUTS = 300  # the grader's peak concurrency fits one container
TIMEOUT_S = 1200  # per request: no request is cut while a 20-minute grading run lasts
STARTUP_TIMEOUT_S = 1200  # waiting for the weights step, loading both GPUs, graph capture
DEFAULT_MAX_CONTAINERS = 1  # the course's hardware is one 2 x A100-80GB box
MIN_CONTAINERS = 0  # nothing billed while idle; deploy.sh wakes the container (docs/DEPLOY.md)
SCALEDOWN_WINDOW_S = 3600  # Modal's longest: warm from deploy through grading's waits

# Engine knobs the deploy passes explicitly, so that the block plan below uses the same numbers.
MAX_BATCH = 256
MAX_MODEL_LEN = 32768  # the server's default context cap (the model's own may be less)
BLOCK_SIZE = 16  # tokens a KV block holds (replica/engine/kv_cache.py)
KV_FRACTION = 0.9
# A 4-bit weight: half a byte, plus a bf16 scale and zero per group of 128 (replica/ops/packed.py)
INT4_BYTES_PER_WEIGHT = 0.5 + 4 / 128
QUANTIZE_MODES = ("int4",)  # replica/loading/model.py
OVERHEAD_ESTIMATE_BYTES = 2 * GiB  # assumed: CUDA context, workspaces, activations (not measured)

# Weights live in a Modal Volume, filled by deploy/weights.py beside the image build.
WEIGHTS_VOLUME = "qwen3-weights"
WEIGHTS_APP = "qwen3-weights-fill"
WEIGHTS_DIR = "/weights"
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]  # as replica/loading/source.py
HUB_VERSION = "2.4.0"  # huggingface-hub, as requirements.txt pins it
DOWNLOAD_WORKERS = 16
FILL_CPU_CORES = 8.0  # hf-xet's parallel range downloads use the cores
FILL_TIMEOUT_S = 3600

PYTHON_VERSION = "3.11"
TORCH_VERSION = "2.13.0"  # requirements.txt's pin
TORCH_CUDA = "cu126"  # runs on any driver >= 525 and carries sm_80 (A100) kernels
TORCH_INDEX_URL = f"https://download.pytorch.org/whl/{TORCH_CUDA}"


def hub_cache(weights_dir: str | Path = WEIGHTS_DIR) -> Path:
    """The Hugging Face cache inside the volume: the fill writes it, the replicas read it."""
    return Path(weights_dir) / "hub"


def ready_marker(model: str, weights_dir: str | Path = WEIGHTS_DIR) -> Path:
    """Written once `model` is complete in the volume; the serving container waits for it."""
    return Path(weights_dir) / "ready" / model.replace("/", "--")


@dataclass(frozen=True)
class Shape:
    """What the KV block plan needs from a model's config.json."""

    layers: int
    kv_heads: int
    head_dim: int
    params: int
    int4_params: int = 0  # of `params`, the projections stored 4-bit

    @classmethod
    def from_config(cls, config: Mapping, int4: bool = False) -> Shape:
        """Count the parameters of a Qwen3 dense or MoE config (bf16 weights are 2 bytes each);
        `int4` (or a 4-bit checkpoint's quantization_config): the layers' projections 4-bit."""
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 2 * head_dim
        experts = config.get("num_experts") or config.get("num_local_experts") or 0
        dense_layers = set(config.get("mlp_only_layers") or [])
        step = config.get("decoder_sparse_step") or 1
        total = projections = 0
        for layer in range(layers):
            if experts and layer not in dense_layers and (layer + 1) % step == 0:
                mlp = experts * 3 * hidden * config["moe_intermediate_size"]
                total += hidden * experts  # the router stays 16-bit
            else:
                mlp = 3 * hidden * config["intermediate_size"]
            total += attention + mlp + 2 * hidden
            projections += attention - 2 * head_dim + mlp
        embeddings = config["vocab_size"] * hidden
        total += embeddings * (1 if config.get("tie_word_embeddings") else 2) + hidden
        quantization = config.get("quantization_config") or {}
        int4 = int4 or (bool(quantization) and quantization.get("bits", 4) == 4)
        return cls(layers, kv_heads, head_dim, total, projections if int4 else 0)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * self.kv_heads * self.head_dim * 2 * 2  # K and V, bf16

    @property
    def weight_bytes(self) -> int:
        sixteen_bit = self.params - self.int4_params
        return sixteen_bit * 2 + int(self.int4_params * INT4_BYTES_PER_WEIGHT)


def repo_name(model: str) -> str:
    """`Qwen/Qwen3-4B-Instruct-2507` -> `Qwen3-4B-Instruct-2507`."""
    return model.rsplit("/", 1)[-1]


THINKING_2507, INSTRUCT_2507 = "-Thinking-2507", "-Instruct-2507"
FOUR_BIT = re.compile(r"-(awq|gptq-int4|w4a16)\b.*$", re.IGNORECASE)  # a 4-bit build's repo suffix


def architecture_sibling(model: str) -> str | None:
    """The repo whose architecture `model` has: a 4-bit build's base (`...-AWQ`), and a
    `<name>-Thinking-2507`'s `<name>-Instruct-2507` (4B, 30B-A3B, 235B-A22B); it is planned
    from that sibling's vendored config."""
    name = FOUR_BIT.sub("", repo_name(model))
    if name.lower().endswith(THINKING_2507.lower()):
        return name[: -len(THINKING_2507)] + INSTRUCT_2507
    return name if name != repo_name(model) else None


def vendored_config(model: str) -> Path | None:
    """vendor/configs/<repo name, lower case>/config.json, else its architecture sibling's."""
    names = [name for name in (repo_name(model), architecture_sibling(model)) if name]
    paths = (VENDORED_CONFIGS / name.lower() / "config.json" for name in names)
    return next((path for path in paths if path.is_file()), None)


def vendored_shape(model: str, int4: bool = False) -> tuple[Shape, Path] | None:
    """The model's shape from its vendored config (vendored_config), if there is one."""
    path = vendored_config(model)
    return None if path is None else (Shape.from_config(json.loads(path.read_text()), int4), path)


THINKS = {  # what the dry run says of each kind `thinks` tells
    "always": "always (a Thinking-2507 model: every answer starts with a thought)",
    "never": "never (an Instruct-2507 model: thinking-free)",
    "hybrid, off by default": "hybrid, off by default (a hybrid Qwen3: a request turns it on "
    "with chat_template_kwargs.enable_thinking)",
    "unknown": "unknown (not a Qwen3 name)",
}


def thinks(model: str) -> str:
    """Whether the model thinks, by its repo name (the server classifies its template itself)."""
    name = repo_name(model).lower()
    if THINKING_2507.lower() in name:
        return "always"
    if INSTRUCT_2507.lower() in name:
        return "never"
    if name.startswith("qwen3"):
        return "hybrid, off by default"
    return "unknown"


def blocks_in(budget_bytes: int, block_bytes: int) -> int:
    """replica/engine/kv_cache.py's rule (blocks_that_fit): whole blocks in the budget, one kept
    as scratch; tests/test_structure.py holds the two together."""
    return max(0, budget_bytes // block_bytes - 1)


@dataclass(frozen=True)
class BlockPlan:
    """The engine's KV sizing (replica/engine/kv_cache.py plan_blocks) worked out for an
    A100-80GB. An estimate: the free memory after loading is taken as the card less the weights
    less OVERHEAD_ESTIMATE_BYTES; the measured figures go in docs/DEPLOY.md."""

    shape: Shape

    @property
    def block_bytes(self) -> int:
        return BLOCK_SIZE * self.shape.kv_bytes_per_token

    @property
    def kv_budget_bytes(self) -> int:
        free = GPU_MEMORY_BYTES - self.shape.weight_bytes - OVERHEAD_ESTIMATE_BYTES
        return max(0, int(free * KV_FRACTION))

    @property
    def blocks_per_gpu(self) -> int:
        return blocks_in(self.kv_budget_bytes, self.block_bytes)

    @property
    def tokens_per_gpu(self) -> int:
        return self.blocks_per_gpu * BLOCK_SIZE

    def rows_at(self, tokens: int) -> int:
        """Decode rows the pool holds when every row has `tokens` live tokens."""
        return min(MAX_BATCH, self.tokens_per_gpu // tokens)


@dataclass(frozen=True)
class Deployment:
    """One system's deployment, as deploy.sh chose it."""

    app_name: str
    profile: str
    model: str
    max_containers: int
    quantize: str = ""  # DEPLOY_QUANTIZE: "" (the checkpoint's own weights) or "int4"
    reasoning_budget: int | None = None  # DEPLOY_REASONING_BUDGET: None, the profile's budget

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Deployment:
        """Read deploy.sh's variables; a bad value is a ValueError naming the variable."""
        profile = env.get("DEPLOY_PROFILE") or "throughput"
        if profile not in ANSWER_CAPS:
            raise ValueError(
                f"DEPLOY_PROFILE={profile!r}: expected one of {', '.join(ANSWER_CAPS)}"
            )
        model = env.get("DEPLOY_MODEL") or DEFAULT_MODELS[profile]
        if model.startswith(("/", ".")) or Path(model).is_dir():
            raise ValueError(
                f"DEPLOY_MODEL={model!r} is a local path: pass a Hugging Face Hub id, which "
                "deploy/weights.py downloads into the weights volume"
            )
        raw = env.get("DEPLOY_MAX_CONTAINERS") or str(DEFAULT_MAX_CONTAINERS)
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"DEPLOY_MAX_CONTAINERS={raw!r}: expected a whole number >= 1")
        quantize = env.get("DEPLOY_QUANTIZE") or ""
        if quantize and quantize not in QUANTIZE_MODES:
            raise ValueError(f"DEPLOY_QUANTIZE={quantize!r}: expected one of {QUANTIZE_MODES}")
        budget = env.get("DEPLOY_REASONING_BUDGET") or ""
        if budget and (not budget.isdigit() or int(budget) < 1):
            raise ValueError(
                f"DEPLOY_REASONING_BUDGET={budget!r}: expected a whole number >= 1 (thought tokens)"
            )
        app = env.get("DEPLOY_APP_NAME") or APP_NAME
        return cls(app, profile, model, int(raw), quantize, int(budget) if budget else None)

    def env(self) -> dict[str, str]:
        """The variables that rebuild this Deployment (forwarded into the container)."""
        env = {
            "DEPLOY_APP_NAME": self.app_name,
            "DEPLOY_PROFILE": self.profile,
            "DEPLOY_MODEL": self.model,
            "DEPLOY_MAX_CONTAINERS": str(self.max_containers),
            "DEPLOY_QUANTIZE": self.quantize,
            "DEPLOY_REASONING_BUDGET": str(self.reasoning_budget or ""),
        }
        return {name: value for name, value in env.items() if value}

    def block_plan(self) -> BlockPlan | None:
        found = vendored_shape(self.model, bool(self.quantize or FOUR_BIT.search(self.model)))
        return None if found is None else BlockPlan(found[0])

    @property
    def pipeline_parallel_size(self) -> int:
        """GPU_COUNT stages of one replica when the weights overflow a GPU (deploy/stages.py)."""
        plan, room = self.block_plan(), GPU_MEMORY_BYTES - OVERHEAD_ESTIMATE_BYTES
        return GPU_COUNT if plan and plan.shape.weight_bytes > room else 1

    def server_command(self, python: str) -> list[str]:
        """`server.py` on every GPU of the container: a replica each, or one replica's stages."""
        gpus, stages = ",".join(str(i) for i in range(GPU_COUNT)), self.pipeline_parallel_size
        options = {
            "--model": self.model,
            "--host": "0.0.0.0",
            "--port": PORT,
            "--gpus": gpus,
            "--profile": self.profile,
            "--max-model-len": MAX_MODEL_LEN,
            "--max-batch": MAX_BATCH,
            "--kv-fraction": KV_FRACTION,
            "--quantize": self.quantize or None,
            "--pipeline-parallel-size": stages if stages > 1 else None,
            "--reasoning-budget": self.reasoning_budget,
        }
        flags = [[flag, str(value)] for flag, value in options.items() if value is not None]
        return [python, "server.py", *(word for flag in flags for word in flag)]

    def url(self, workspace: str = "<workspace>") -> str:
        return f"https://{workspace}--{self.app_name}-{ENDPOINT}.modal.run"

    def settings(self) -> dict[str, str]:
        """Every deploy setting, as `deploy.sh --dry-run` prints it."""
        return (
            {
                "app": self.app_name,
                "profile": self.profile,
                "model": self.model,
                "url": self.url(),
                "gpu": f"{GPU} (one replica per GPU, or a pipeline stage per GPU: below)",
                "cpu_cores": f"{CPU_CORES:g} reserved",
                "memory": f"{MEMORY_MIB // 1024} GiB reserved",
                "max_containers": f"{self.max_containers} (--max-containers N scales out)",
                "min_containers": f"{MIN_CONTAINERS} (deploy.sh wakes the container and waits for /ready)",
                "scaledown_window_s": str(SCALEDOWN_WINDOW_S),
                "max_concurrent_inputs": f"{MAX_INPUTS} per container",
                "timeout_s": f"{TIMEOUT_S} per request",
                "startup_timeout_s": f"{STARTUP_TIMEOUT_S} per container",
                "weights": f"volume {WEIGHTS_VOLUME} at {WEIGHTS_DIR}, filled by deploy/weights.py "
                "beside the image build",
                "torch": f"{TORCH_VERSION}+{TORCH_CUDA} (extra index {TORCH_INDEX_URL}; "
                "its dependencies resolve from PyPI)",
                "server": " ".join(self.server_command("python")),
                "max_model_len": f"{MAX_MODEL_LEN} (the context cap; the model's own may be less, "
                f"and the profile caps each answer at {ANSWER_CAPS[self.profile]})",
            }
            | self.thinking_settings()
            | self.kv_settings()
        )

    def thinking_settings(self) -> dict[str, str]:
        budget, kind = REASONING_BUDGETS[self.profile], thinks(self.model)
        chosen = (
            f"{self.reasoning_budget} thought tokens (--reasoning-budget; the {self.profile} "
            f"profile's is {budget}"
            if self.reasoning_budget
            else f"{budget} thought tokens (the {self.profile} profile's"
        )
        unused = "; unused: this model never thinks)" if kind == "never" else ")"
        return {
            "thinks": THINKS[kind] + "; by the repo name: the server classifies the chat "
            "template at start-up",
            "thinking_budget": f"{chosen}; a request's reasoning_effort overrides it{unused}",
        }

    def kv_settings(self) -> dict[str, str]:
        plan = self.block_plan()
        if plan is None:
            return {
                "kv_blocks_per_gpu": f"unknown (no vendored config for {self.model}; the engine "
                "sizes it at start-up)"
            }
        shape, config = plan.shape, vendored_config(self.model)
        assert config is not None  # block_plan found it
        source = config.relative_to(PROJECT_ROOT)
        sibling = config.parent.name != repo_name(self.model).lower()
        origin = {
            "kv_plan_from": f"planned from the vendored config of "
            f"{architecture_sibling(self.model)} (same architecture): {source}"
            if sibling
            else f"the vendored config {source}"
        }
        if self.pipeline_parallel_size > 1:
            return origin | {"kv_plan": "per pipeline stage (the stages' lines below)"}
        return origin | {
            "kv_per_token": f"{shape.kv_bytes_per_token // 1024} KiB ({shape.layers} layers x "
            f"{shape.kv_heads} KV heads x {shape.head_dim} x K,V x 2 bytes)",
            "weights_per_gpu": f"{shape.weight_bytes / GiB:.1f} GiB ({shape.params / 1e9:.2f}B "
            + (
                f"parameters, {shape.int4_params / 1e9:.2f}B of them 4-bit at "
                f"{INT4_BYTES_PER_WEIGHT:g} bytes, the rest bf16"
                if shape.int4_params
                else "parameters in bf16"
            )
            + ", estimate from the vendored config)",
            "kv_blocks_per_gpu": f"{plan.blocks_per_gpu} (estimate: {KV_FRACTION:g} x ("
            f"{GPU_MEMORY_BYTES // GiB} GiB - weights - {OVERHEAD_ESTIMATE_BYTES // GiB} GiB "
            f"assumed overhead) / {plan.block_bytes // KiB} KiB a block of {BLOCK_SIZE} "
            "tokens, less 1)",
            "kv_tokens_per_gpu": f"{plan.tokens_per_gpu} (estimate)",
            "kv_tokens_per_container": f"{plan.tokens_per_gpu * GPU_COUNT} (estimate, "
            f"{GPU_COUNT} GPUs)",
            "rows_at_1000_tokens_per_gpu": f"{plan.rows_at(1000)} (estimate, at most {MAX_BATCH})",
        }


if __name__ == "__main__":
    try:
        deployment = Deployment.from_env(os.environ)
    except ValueError as error:
        raise SystemExit(f"deploy/systems.py: {error}") from None
    for key, value in deployment.settings().items():
        print(f"{key}: {value}")

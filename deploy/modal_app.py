"""The Modal app: one 2 x A100-80GB container running `server.py`, one replica per GPU.

`deploy.sh` passes the per-system settings as environment variables (DEPLOY_APP_NAME,
DEPLOY_PROFILE, DEPLOY_MODEL). They are read at import, so `modal deploy`, the container (which
imports this file again, with the same variables forwarded through `env=`), the tests and
`deploy.sh --dry-run` (`python deploy/modal_app.py`) all see one configuration, without network.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import modal

PROFILES = ("throughput", "balanced", "accuracy")
APP_NAME = os.environ.get("DEPLOY_APP_NAME", "qwen3-completion-dev")
PROFILE = os.environ.get("DEPLOY_PROFILE", "throughput")
MODEL = os.environ.get("DEPLOY_MODEL", "Qwen/Qwen3-4B-Instruct-2507")
if PROFILE not in PROFILES:
    raise ValueError(f"DEPLOY_PROFILE={PROFILE!r}: expected one of {', '.join(PROFILES)}")
if MODEL.startswith(("/", ".")) or Path(MODEL).is_dir():  # the image downloads MODEL from the Hub
    raise ValueError(f"DEPLOY_MODEL={MODEL!r} is a local path: pass a Hugging Face Hub id")

GPU_TYPE, GPU_COUNT = "A100-80GB", 2
GPU = f"{GPU_TYPE}:{GPU_COUNT}"
PORT = 8000
ENDPOINT = "completion"  # the function name; Modal's default label is `<app>-<function>`
MAX_INPUTS = 300  # the grader's peak concurrency fits one container
TIMEOUT_S = 1200  # per request: no request is cut while a 20-minute grading run lasts
STARTUP_TIMEOUT_S = 600  # container start: weights onto both GPUs, CUDA-graph capture
READY_TIMEOUT_S = STARTUP_TIMEOUT_S - 60  # our own wait for /health, inside the startup budget
MIN_CONTAINERS = 1  # warm from deploy on, through grading
MAX_CONTAINERS = 3  # past MAX_INPUTS in flight, Modal adds containers behind the same URL
SCALEDOWN_WINDOW_S = 1200  # extra containers stay through a grading run's lulls

# Image pins. torch matches requirements.txt (tests check it); cu126 rather than PyPI's default
# cu130 build because it runs on any driver >= 525 and still carries sm_80 (A100) kernels.
PYTHON_VERSION = "3.11"
TORCH_VERSION = "2.13.0"
TORCH_CUDA = "cu126"
TORCH_INDEX_URL = f"https://download.pytorch.org/whl/{TORCH_CUDA}"
# flash-attn's release wheels are named by CUDA major, torch minor, C++11 ABI and Python. The
# install is best effort: with no such wheel the engine runs its Triton attention kernels instead.
FLASH_ATTN_VERSION = "2.8.3"
FLASH_ATTN_WHEEL = (
    f"flash_attn-{FLASH_ATTN_VERSION}+cu{TORCH_CUDA[2:4]}"
    f"torch{TORCH_VERSION.rsplit('.', 1)[0]}cxx11abiTRUE"
    f"-cp{PYTHON_VERSION.replace('.', '')}-cp{PYTHON_VERSION.replace('.', '')}-linux_x86_64.whl"
)
FLASH_ATTN_URL = (
    "https://github.com/Dao-AILab/flash-attention/releases/download/"
    f"v{FLASH_ATTN_VERSION}/{FLASH_ATTN_WHEEL.replace('+', '%2B')}"
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REMOTE_ROOT = "/root/project"
HF_HOME = "/models"  # weights live in the image's Hugging Face cache
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt"]  # as replica/checkpoint.py downloads
LOCAL_ONLY = [".venv", ".git", "**/__pycache__", "out", ".*_cache", ".hypothesis", "**/*.whl"]

image = (
    modal.Image.debian_slim(python_version=PYTHON_VERSION)
    .pip_install(f"torch=={TORCH_VERSION}", index_url=TORCH_INDEX_URL)
    .pip_install_from_requirements(str(PROJECT_ROOT / "requirements.txt"))
    .run_commands(
        f"pip install --no-deps '{FLASH_ATTN_URL}' && python -c 'import flash_attn'"
        " || { pip uninstall -y -q flash-attn;"
        f" echo 'no usable {FLASH_ATTN_WHEEL}: the engine uses its Triton attention kernels'; }}"
    )
    .env({"HF_HOME": HF_HOME})
    .run_commands(
        "python -c "
        + shlex.quote(
            "from huggingface_hub import snapshot_download; "
            f"snapshot_download({MODEL!r}, allow_patterns={WEIGHT_PATTERNS!r})"
        )
    )
    .env({"HF_HUB_OFFLINE": "1"})  # weights come from the image, never from the network
    .add_local_dir(PROJECT_ROOT, REMOTE_ROOT, ignore=LOCAL_ONLY)
)

app = modal.App(APP_NAME)


def server_command() -> list[str]:
    """`server.py` on every GPU of the container: one replica per GPU."""
    gpus = ",".join(str(i) for i in range(GPU_COUNT))
    return [
        sys.executable,
        "server.py",
        "--model",
        MODEL,
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        "--gpus",
        gpus,
        "--profile",
        PROFILE,
    ]


def wait_until_ready(
    server: subprocess.Popen, url: str, timeout_s: float, poll_s: float = 2.0
) -> None:
    """Block until `url` answers 200: the port opens while replicas load (503), and Modal would
    route requests to the container as soon as the port accepts connections."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server.py exited with code {server.returncode} while loading")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:  # 503 while the replicas load
            error.close()
        except OSError:  # refused while the server starts
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


@app.function(
    image=image,
    gpu=GPU,
    timeout=TIMEOUT_S,
    startup_timeout=STARTUP_TIMEOUT_S,
    min_containers=MIN_CONTAINERS,
    max_containers=MAX_CONTAINERS,
    scaledown_window=SCALEDOWN_WINDOW_S,
    env={"DEPLOY_APP_NAME": APP_NAME, "DEPLOY_PROFILE": PROFILE, "DEPLOY_MODEL": MODEL},
)
@modal.concurrent(max_inputs=MAX_INPUTS)
@modal.web_server(PORT, startup_timeout=60)
def completion() -> None:
    """Start the server and return once it is ready; Modal then proxies the endpoint to PORT."""
    server = subprocess.Popen(server_command(), cwd=REMOTE_ROOT)
    wait_until_ready(server, f"http://127.0.0.1:{PORT}/health", READY_TIMEOUT_S)


def settings() -> dict[str, str]:
    """Every deploy setting, as `deploy.sh --dry-run` prints it."""
    return {
        "app": APP_NAME,
        "profile": PROFILE,
        "model": MODEL,
        "gpu": GPU,
        "timeout_s": str(TIMEOUT_S),
        "startup_timeout_s": str(STARTUP_TIMEOUT_S),
        "max_concurrent_inputs": str(MAX_INPUTS),
        "min_containers": str(MIN_CONTAINERS),
        "max_containers": str(MAX_CONTAINERS),
        "scaledown_window_s": str(SCALEDOWN_WINDOW_S),
        "endpoint_function": ENDPOINT,
        "endpoint_label": f"{APP_NAME}-{ENDPOINT}",
        "url": f"https://<workspace>--{APP_NAME}-{ENDPOINT}.modal.run",
        "server": " ".join(["python", *server_command()[1:]]),
        "torch": f"{TORCH_VERSION}+{TORCH_CUDA}",
        "flash_attn_wheel": FLASH_ATTN_WHEEL,
    }


if __name__ == "__main__":
    for key, value in settings().items():
        print(f"{key}: {value}")

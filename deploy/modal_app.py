"""The Modal app: one 2 x A100-80GB container running `server.py`, one replica per GPU.

deploy.sh runs `modal deploy deploy/modal_app.py` with the system's DEPLOY_* variables; every
setting comes from deploy/systems.py (which also prints them for `deploy.sh --dry-run`). The
weights are not in the image: they live in the Modal Volume that deploy/weights.py fills, and the
container waits for that fill's ready marker before it starts the server (docs/DEPLOY.md says why).
deploy.sh wakes the container right after the deploy, so its start overlaps the download.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import modal
import systems  # beside this file: `modal deploy` puts its directory on sys.path

DEPLOYMENT = systems.Deployment.from_env(os.environ)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
REMOTE_ROOT = "/root/project"
LOCAL_ONLY = [".venv", ".git", "**/__pycache__", "out", ".*_cache", ".hypothesis", "**/*.whl"]

# torch from PyTorch's CUDA 12.6 index as an *extra* index: PyPI stays the main index, so torch's
# own dependencies (setuptools >= 77 among them) resolve there. The `+cu126` pin makes sure the
# CUDA 12.6 build is the one taken. requirements.txt's `torch==2.13.0` is then already met.
image = (
    modal.Image.debian_slim(python_version=systems.PYTHON_VERSION)
    .pip_install(
        f"torch=={systems.TORCH_VERSION}+{systems.TORCH_CUDA}",
        extra_index_url=systems.TORCH_INDEX_URL,
    )
    .pip_install_from_requirements(str(PROJECT_ROOT / "requirements.txt"))
    .env({"HF_HUB_CACHE": str(systems.hub_cache()), "HF_HUB_OFFLINE": "1"})
    .add_local_python_source("systems")
    .add_local_dir(PROJECT_ROOT, REMOTE_ROOT, ignore=LOCAL_ONLY)
)
weights = modal.Volume.from_name(systems.WEIGHTS_VOLUME, create_if_missing=True)
app = modal.App(DEPLOYMENT.app_name)


def wait_for_weights(
    marker: Path, reload: Callable[[], None], deadline: float, poll_s: float = 1.0
) -> None:
    """deploy.sh wakes this container as soon as `modal deploy` returns, while the weights may
    still be downloading: wait for the fill's marker, looking often, so the replicas start
    loading within about a second of the fill's commit."""
    while not marker.exists():
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{marker} was never written: did the weights step (modal run deploy/weights.py) fail?"
            )
        time.sleep(poll_s)
        reload()  # see what the fill has committed since


def wait_until_ready(
    server: subprocess.Popen, url: str, deadline: float, poll_s: float = 2.0
) -> None:
    """Block until `url` answers 200: the port opens while replicas load (503), and Modal would
    route requests to the container as soon as the port accepts connections."""
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
    raise TimeoutError(f"{url} not ready in time")


@app.function(
    image=image,
    gpu=systems.GPU,
    cpu=systems.CPU_CORES,
    memory=systems.MEMORY_MIB,
    volumes={systems.WEIGHTS_DIR: weights},
    timeout=systems.TIMEOUT_S,
    startup_timeout=systems.STARTUP_TIMEOUT_S,
    min_containers=systems.MIN_CONTAINERS,
    max_containers=DEPLOYMENT.max_containers,
    scaledown_window=systems.SCALEDOWN_WINDOW_S,
    env=DEPLOYMENT.env(),
)
@modal.concurrent(max_inputs=systems.MAX_INPUTS)
@modal.web_server(systems.PORT, startup_timeout=60)
def completion() -> None:
    """Start the server once the weights are in, and return when it is ready; Modal then
    proxies the endpoint to PORT."""
    deadline = time.monotonic() + systems.STARTUP_TIMEOUT_S - 60
    wait_for_weights(systems.ready_marker(DEPLOYMENT.model), weights.reload, deadline)
    server = subprocess.Popen(DEPLOYMENT.server_command(sys.executable), cwd=REMOTE_ROOT)
    wait_until_ready(server, f"http://127.0.0.1:{systems.PORT}/ready", deadline)

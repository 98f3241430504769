"""Fill the weights volume with the deployment's model: `modal run --detach deploy/weights.py`.

deploy.sh runs this beside `modal deploy`, so the download overlaps the image build. It is a
separate app with a small image: `modal run` on deploy/modal_app.py would build the serving image
first. `--detach` keeps the fill running on Modal when deploy.sh (and with it this local client)
is stopped: the serving container waits for the fill's marker, not for deploy.sh.

Several deploys may fill one model at once (systems 1 and 2 share the 4B). A volume has no file
locking and the last commit of a file wins, so one fill per model holds a claim in a Modal Dict
(`put(..., skip_if_exists=True)` is atomic on Modal's side); the others wait for its marker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import modal
import systems  # beside this file: `modal run` puts its directory on sys.path

DEPLOYMENT = systems.Deployment.from_env(os.environ)
FILL_CLAIMS = "qwen3-weights-fills"  # Modal Dict: model -> when its fill's claim lapses (epoch s)
CLAIM_S = systems.FILL_TIMEOUT_S + 60  # Modal has stopped the claiming fill by then
POLL_S = 2.0

image = (
    modal.Image.debian_slim(python_version=systems.PYTHON_VERSION)
    .pip_install(f"huggingface-hub=={systems.HUB_VERSION}")  # brings hf-xet
    .env({"HF_XET_HIGH_PERFORMANCE": "1"})  # hf-xet: more parallel range requests
    .add_local_python_source("systems")
)
volume = modal.Volume.from_name(systems.WEIGHTS_VOLUME, create_if_missing=True)
claims = modal.Dict.from_name(FILL_CLAIMS, create_if_missing=True)
app = modal.App(systems.WEIGHTS_APP)


def download(model: str, weights_dir: Path) -> Path:
    """Download `model` into the volume's Hugging Face cache, then write its marker (last, so a
    marker means every file is in)."""
    from huggingface_hub import snapshot_download

    snapshot = snapshot_download(
        model,
        cache_dir=systems.hub_cache(weights_dir),
        allow_patterns=systems.WEIGHT_PATTERNS,
        max_workers=systems.DOWNLOAD_WORKERS,
    )
    marker = systems.ready_marker(model, weights_dir)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{snapshot}\n")
    return marker


def claim(claims: modal.Dict, model: str, now: float) -> bool:
    """Take the model's fill claim: free, or left by a fill that Modal has stopped (its timeout
    passed). Taking over a lapsed claim is not atomic: two waiters could both take it, which
    needs a fill to have died without releasing its claim first."""
    if claims.put(model, now + CLAIM_S, skip_if_exists=True):
        return True
    lapses = claims.get(model)
    if lapses is not None and lapses > now:
        return False
    claims.put(model, now + CLAIM_S)
    return True


def fill_weights(
    model: str,
    weights_dir: Path,
    volume: modal.Volume,
    claims: modal.Dict,
    poll_s: float = POLL_S,
    clock: Callable[[], float] = time.time,
) -> Path:
    """Make sure `model` is complete in the volume: download it under the claim, or wait for
    the fill that holds the claim to write the marker. A marker already there costs nothing."""
    marker = systems.ready_marker(model, weights_dir)
    while not marker.exists():
        if claim(claims, model, clock()):
            try:
                volume.reload()  # a fill that released its claim since this container started
                if not marker.exists():
                    download(model, weights_dir)
                    volume.commit()  # before the release: the next claimant must see it
            finally:
                claims.pop(model, None)
            break
        time.sleep(poll_s)
        volume.reload()  # see what the claiming fill has committed since
    return marker


@app.function(
    image=image,
    volumes={systems.WEIGHTS_DIR: volume},
    cpu=systems.FILL_CPU_CORES,
    timeout=systems.FILL_TIMEOUT_S,
)
def fill(model: str) -> str:
    return str(fill_weights(model, Path(systems.WEIGHTS_DIR), volume, claims))


@app.local_entrypoint()
def main() -> None:
    marker = fill.remote(DEPLOYMENT.model)
    print(f"weights: {DEPLOYMENT.model} is in volume {systems.WEIGHTS_VOLUME} ({marker})")

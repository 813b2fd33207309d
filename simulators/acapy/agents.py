"""Real ACA-Py agents for a run (a mediator and a multitenant agent), or the description of external ones.

`launch_agents(work_dir)` starts `aca-py` (acapy-agent 1.7.0 from `.venv-acapy`, see
`scripts/install-acapy`) as the seed's docker-compose did, but on 127.0.0.1 and free ports chosen at
start: the mediator with `--open-mediation`, the multitenant agent with `--multitenant
--multitenant-admin` and by default all sub-wallets as profiles of one askar store (an ARGON2I_MOD
sub-wallet then takes about 4 ms to create instead of 350 ms for a store of its own). Each agent gets a
scratch `ACAPY_HOME` with a sqlite askar wallet (`--wallet-test` in-memory wallets do not start in
1.7.0), its own process group and a log file in `work_dir`; both start in parallel and are ready when
`GET /status/ready` answers 200. Then one mediation is granted and its sub-wallet deleted
(`prime_mediator`), because a fresh 1.7.0 mediator loses concurrent first grants. `--timing` is on, so
`/status` counts handler calls (the mediator's forwards). Secrets (wallet keys, the JWT secret, an
admin API key) go through the environment, not the command line.

`AcapyTargets` describes the agents a simulator talks to, launched or external: the multitenant admin
URL and API key, and the mediator as an admin URL (an invitation is created there, so no one copies it
from a console) or as an invitation URL given by the user (`parse_invitation_url`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from harness.errors import TargetError, UsageError
from simulators.acapy.admin import ACTIVE_STATES, DIDEXCHANGE, AdminError, raw_wallet_key, short_message

ACAPY_VERSION = "1.7.0"
"""The acapy-agent release `scripts/install-acapy` installs and these simulators were built against."""
BIN_ENV = "HARNESS_ACAPY_BIN"
"""Environment variable naming the `aca-py` executable to use instead of `.venv-acapy/bin/aca-py`."""
REPO = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO / ".venv-acapy" / "bin" / "aca-py"
HOST = "127.0.0.1"
INSTALL_HINT = f"run scripts/install-acapy (a Python 3.13 venv with acapy-agent {ACAPY_VERSION})"
_PORT_IN_USE = ("address already in use", "errno 98")
_ERROR_LINE = re.compile(r"error|exception|critical", re.IGNORECASE)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class AcapyNotInstalledError(UsageError):
    """The `aca-py` executable is missing."""


class AgentStartError(TargetError):
    """An agent that exited or did not get ready at start; the message ends with its log tail."""


def acapy_binary(path: str | Path | None = None) -> Path:
    """The `aca-py` executable: `path`, else $HARNESS_ACAPY_BIN, else `.venv-acapy/bin/aca-py` of the repo."""
    explicit = path or os.environ.get(BIN_ENV)
    if explicit:
        candidate = Path(explicit).expanduser()
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
        source = "argument" if path else BIN_ENV
        raise AcapyNotInstalledError(
            f"ACA-Py executable {candidate} (from {source}) is missing or not executable: {INSTALL_HINT}, "
            f"or point {BIN_ENV} at an aca-py {ACAPY_VERSION}"
        )
    for candidate in (DEFAULT_BIN, Path.cwd() / ".venv-acapy" / "bin" / "aca-py"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise AcapyNotInstalledError(
        f"ACA-Py is not installed ({DEFAULT_BIN} is missing): {INSTALL_HINT}, or set {BIN_ENV}"
    )


@dataclass(frozen=True)
class AgentSpec:
    """How to start one agent: its role, label, base wallet and flags; ports are chosen at start."""

    role: str
    """`mediator` or `multitenant` (names the log file and scratch folder)."""
    label: str
    wallet_name: str
    wallet_key: str = field(repr=False)
    role_args: tuple[str, ...] = ()
    """Flags of the role (`--open-mediation …`, `--multitenant …`)."""
    log_level: str = "warning"
    admin_api_key: str | None = field(default=None, repr=False)
    """None: `--admin-insecure-mode`; else admin calls need the header `X-API-Key`."""
    jwt_secret: str | None = field(default=None, repr=False)
    """The multitenant agent's `--jwt-secret` (32 bytes or more, or PyJWT warns on every token)."""
    extra_args: tuple[str, ...] = ()

    def command(self, binary: Path, inbound_port: int, admin_port: int) -> list[str]:
        """The `aca-py start` command line (secrets are in `environment()`)."""
        return [
            str(binary),
            "start",
            "--label",
            self.label,
            "--inbound-transport",
            "http",
            HOST,
            str(inbound_port),
            "--outbound-transport",
            "http",
            "--endpoint",
            f"http://{HOST}:{inbound_port}",
            "--admin",
            HOST,
            str(admin_port),
            *(() if self.admin_api_key else ("--admin-insecure-mode",)),
            "--no-ledger",
            "--wallet-type",
            "askar",
            "--wallet-name",
            self.wallet_name,
            "--auto-provision",
            *self.role_args,
            "--auto-accept-invites",
            "--auto-accept-requests",
            "--auto-ping-connection",
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]

    def environment(self, home: Path) -> dict[str, str]:
        """The agent's environment: ours without ACAPY_*/PYTHON* settings, plus its home and secrets."""
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("ACAPY_", "PYTHONPATH", "PYTHONHOME"))
        }
        env["ACAPY_HOME"] = str(home)
        env["ACAPY_WALLET_KEY"] = self.wallet_key
        if self.admin_api_key:
            env["ACAPY_ADMIN_API_KEY"] = self.admin_api_key
        if self.jwt_secret:
            env["ACAPY_MULTITENANT_JWT_SECRET"] = self.jwt_secret
        return env


def mediator_spec(
    *,
    label: str = "Mediator",
    log_level: str = "warning",
    admin_api_key: str | None = None,
    extra_args: Sequence[str] = (),
    open_mediation: bool = True,
) -> AgentSpec:
    """The mediator of `real-targets.md` §1: open mediation, undelivered-message queue, auto-accept.

    Without `open_mediation` requests wait in state `request` until the admin API grants or denies them.
    """
    return AgentSpec(
        role="mediator",
        label=label,
        wallet_name="mediator",
        wallet_key=secrets.token_urlsafe(24),
        role_args=(("--open-mediation",) if open_mediation else ()) + ("--enable-undelivered-queue",),
        log_level=log_level,
        admin_api_key=admin_api_key,
        extra_args=tuple(extra_args),
    )


def multitenant_spec(
    *,
    label: str = "MultiAgent",
    single_store: bool = True,
    jwt_secret: str | None = None,
    log_level: str = "warning",
    admin_api_key: str | None = None,
    extra_args: Sequence[str] = (),
) -> AgentSpec:
    """The multitenant agent of the seed's multi-demo; `single_store` keeps every sub-wallet in one store."""
    secret = jwt_secret or secrets.token_hex(32)
    if len(secret.encode()) < 32:
        raise UsageError("ACA-Py jwt_secret: use 32 bytes or more (PyJWT warns on every token otherwise)")
    role_args: tuple[str, ...] = ("--multitenant", "--multitenant-admin")
    if single_store:
        role_args += ("--multitenancy-config", "wallet_type=single-wallet-askar", "wallet_name=subwallets")
    return AgentSpec(
        role="multitenant",
        label=label,
        wallet_name="base",
        wallet_key=secrets.token_urlsafe(24),
        role_args=role_args,
        log_level=log_level,
        admin_api_key=admin_api_key,
        jwt_secret=secret,
        extra_args=tuple(extra_args),
    )


@dataclass(frozen=True)
class AgentTarget:
    """One agent's admin API: its URL and, unless it runs in insecure mode, its `X-API-Key`."""

    admin_url: str
    api_key: str | None = field(default=None, repr=False)

    def headers(self) -> dict[str, str]:
        """The base-wallet headers for this agent's admin API."""
        return {"X-API-Key": self.api_key} if self.api_key else {}


@dataclass(frozen=True)
class AcapyTargets:
    """The agents a simulator uses, launched or external: a multitenant agent and a mediator."""

    multitenant: AgentTarget
    mediator: AgentTarget | None = None
    """The mediator's admin API, where invitations are created (and /status read for evidence)."""
    mediator_invitation_url: str | None = None
    """An invitation URL (`?oob=` or legacy `?c_i=`) given by the user; used before `mediator`."""

    @classmethod
    def external(
        cls,
        multitenant_admin_url: str,
        *,
        multitenant_api_key: str | None = None,
        mediator_admin_url: str | None = None,
        mediator_api_key: str | None = None,
        mediator_invitation_url: str | None = None,
    ) -> AcapyTargets:
        """Agents someone else runs; the invitation URL, if given, is checked here (UsageError)."""
        for url in (multitenant_admin_url, mediator_admin_url):
            if url is not None and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise UsageError(f"ACA-Py admin URL {url!r}: use http://host:port or https://…")
        if mediator_invitation_url:
            parse_invitation_url(mediator_invitation_url)
        return cls(
            multitenant=AgentTarget(multitenant_admin_url.rstrip("/"), multitenant_api_key),
            mediator=AgentTarget(mediator_admin_url.rstrip("/"), mediator_api_key)
            if mediator_admin_url
            else None,
            mediator_invitation_url=mediator_invitation_url or None,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable (what `prepare_run` hands to workers); `from_dict` inverts it."""
        return {
            "multitenant": {"admin_url": self.multitenant.admin_url, "api_key": self.multitenant.api_key},
            "mediator": (
                {"admin_url": self.mediator.admin_url, "api_key": self.mediator.api_key}
                if self.mediator
                else None
            ),
            "mediator_invitation_url": self.mediator_invitation_url,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AcapyTargets:
        """The inverse of `as_dict`."""
        mediator = data.get("mediator")
        return cls(
            multitenant=AgentTarget(**data["multitenant"]),
            mediator=AgentTarget(**mediator) if mediator else None,
            mediator_invitation_url=data.get("mediator_invitation_url"),
        )

    def mediator_invitation(self, *, alias: str = "harness", multi_use: bool = True) -> dict[str, Any]:
        """The invitation sub-wallets accept to connect to the mediator (UsageError if none is configured)."""
        if self.mediator_invitation_url:
            return parse_invitation_url(self.mediator_invitation_url)
        if self.mediator is not None:
            return mediator_invitation(
                self.mediator.admin_url, self.mediator.api_key, alias=alias, multi_use=multi_use
            )
        raise UsageError("ACA-Py: no mediator: give the mediator's admin URL or an invitation URL")


def _free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _get(url: str, headers: dict[str, str], timeout: float) -> int:
    """The HTTP status of a GET (0 when nothing answers)."""
    try:
        with _NO_PROXY.open(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except (OSError, ValueError):
        return 0


def _group_alive(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of a process group."""
    out = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                out.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class RunningAgent:
    """One started `aca-py` process."""

    spec: AgentSpec
    admin_url: str
    endpoint: str
    """The DIDComm inbound endpoint (`--endpoint`)."""
    home: Path
    """Its scratch `ACAPY_HOME` (wallets); removed by `stop()`."""
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    started_in: float = 0.0
    """Seconds from launch to the first 200 from `/status/ready`."""

    @property
    def pid(self) -> int:
        """The agent's pid, which is also its process group id."""
        return self.process.pid

    @property
    def target(self) -> AgentTarget:
        """Its admin API as an `AgentTarget`."""
        return AgentTarget(self.admin_url, self.spec.admin_api_key)

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of its log, after its first error lines if those are further up (argparse's)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        all_lines = text.rstrip().splitlines()
        tail = all_lines[-lines:]
        head = all_lines[: max(0, len(all_lines) - lines)]
        errors = [line for line in head if _ERROR_LINE.search(line) and not line.startswith((" ", "\t"))][:5]
        return "\n".join([*errors, "…", *tail] if errors else tail) or "(empty log)"


def _start(spec: AgentSpec, binary: Path, work_dir: Path) -> RunningAgent:
    inbound, admin = _free_ports(2)
    home = Path(tempfile.mkdtemp(prefix=f"acapy-{spec.role}-", dir=work_dir))
    log_path = work_dir / f"{home.name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            spec.command(binary, inbound, admin),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=spec.environment(home),
            cwd=home,
            start_new_session=True,  # its own process group: pgid == pid
        )
    return RunningAgent(
        spec=spec,
        admin_url=f"http://{HOST}:{admin}",
        endpoint=f"http://{HOST}:{inbound}",
        home=home,
        log_path=log_path,
        process=process,
    )


class Agents:
    """The agents `launch_agents` started; `stop()` (or leaving the `with` block) ends them."""

    def __init__(
        self, work_dir: Path, mediator: RunningAgent | None, multitenant: RunningAgent | None
    ) -> None:
        self.work_dir = work_dir
        self.mediator = mediator
        self.multitenant = multitenant
        self.primed_in: float | None = None
        """Seconds `prime_mediator` took at launch (None: not primed)."""
        self._stopped = False

    @property
    def running(self) -> list[RunningAgent]:
        """The agents started, mediator first."""
        return [a for a in (self.mediator, self.multitenant) if a is not None]

    @property
    def stopped(self) -> bool:
        """True once `stop()` ran."""
        return self._stopped

    def targets(self) -> AcapyTargets:
        """These agents as the `AcapyTargets` a simulator uses (needs the multitenant agent)."""
        if self.multitenant is None:
            raise UsageError("ACA-Py: no multitenant agent was launched")
        return AcapyTargets(
            multitenant=self.multitenant.target,
            mediator=self.mediator.target if self.mediator else None,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM each agent's process group, SIGKILL what is left after `timeout`, remove scratch homes."""
        if self._stopped:
            return
        self._stopped = True
        agents = self.running
        for agent in agents:
            if agent.process.poll() is None:
                _killpg(agent.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for agent in agents:
            try:
                agent.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(agent.pid, signal.SIGKILL)
                agent.process.wait()
            if _group_alive(agent.pid):  # children that outlived the leader
                _killpg(agent.pid, signal.SIGKILL)
        for agent in agents:
            shutil.rmtree(agent.home, ignore_errors=True)

    def __enter__(self) -> Agents:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        parts = [f"{a.spec.role} admin={a.admin_url} endpoint={a.endpoint} pid={a.pid}" for a in self.running]
        return f"<Agents {'; '.join(parts) or 'none'}{' stopped' if self._stopped else ''}>"


def launch_agents(
    work_dir: Path,
    *,
    mediator: bool = True,
    multitenant: bool = True,
    multitenancy_single_store: bool = True,
    jwt_secret: str | None = None,
    admin_api_key: str | None = None,
    log_level: str = "warning",
    extra_args: Sequence[str] = (),
    mediator_args: Sequence[str] = (),
    multitenant_args: Sequence[str] = (),
    binary: str | Path | None = None,
    timeout: float = 60.0,
    prime: bool = True,
    timing: bool = True,
    open_mediation: bool = True,
) -> Agents:
    """Start the mediator and the multitenant agent in parallel on free loopback ports; wait until ready.

    `extra_args` go to both agents, `mediator_args`/`multitenant_args` to one. `timing` adds `--timing`, so
    `/status` counts handler calls (`timing.count["ForwardHandler.handle"]` is the mediator's forwards,
    see `admin.handler_counts`); without it only `conductor.task_done` exists, which also counts every
    admin request. `admin_api_key` makes both
    admin APIs require `X-API-Key` (default: insecure mode, loopback only). A random 64-character JWT
    secret is used unless `jwt_secret` is given. With both agents and `prime`, one mediation is granted
    and deleted before returning (`prime_mediator`: concurrent first grants of a fresh mediator race); without
    `open_mediation` the mediator grants nothing by itself (then pass `prime=False` and grant through its
    admin API, one at a time).
    Raises `AcapyNotInstalledError` without `aca-py`, and `AgentStartError` (with the log tail) when an
    agent exits or is not ready within `timeout`; agents already started are stopped first.
    """
    exe = acapy_binary(binary)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    specs: list[AgentSpec] = []
    if timing:
        extra_args = ("--timing", *extra_args)
    if mediator:
        specs.append(
            mediator_spec(
                log_level=log_level,
                admin_api_key=admin_api_key,
                extra_args=(*extra_args, *mediator_args),
                open_mediation=open_mediation,
            )
        )
    if multitenant:
        specs.append(
            multitenant_spec(
                single_store=multitenancy_single_store,
                jwt_secret=jwt_secret,
                log_level=log_level,
                admin_api_key=admin_api_key,
                extra_args=(*extra_args, *multitenant_args),
            )
        )
    began = time.monotonic()
    started = [_start(spec, exe, work_dir) for spec in specs]
    by_role = {a.spec.role: a for a in started}
    agents = Agents(work_dir, by_role.get("mediator"), by_role.get("multitenant"))
    try:
        _wait_ready(agents, exe, began, timeout)
        if prime and agents.mediator is not None and agents.multitenant is not None:
            agents.primed_in = prime_mediator(agents, timeout=max(10.0, timeout - (time.monotonic() - began)))
    except BaseException:
        agents.stop()
        raise
    return agents


def _wait_ready(agents: Agents, exe: Path, began: float, timeout: float) -> None:
    """Poll every agent's `/status/ready` until all answer 200; restart one whose port was taken."""
    pending = {a.spec.role: a for a in agents.running}
    retries = {role: 2 for role in pending}
    launched = {role: began for role in pending}
    deadline = began + timeout
    while pending:
        for role, agent in list(pending.items()):
            code = agent.process.poll()
            if code is not None:
                tail = agent.log_tail()
                if retries[role] and any(s in tail.lower() for s in _PORT_IN_USE):
                    retries[role] -= 1  # a free port taken between choosing and binding: new ports
                    shutil.rmtree(agent.home, ignore_errors=True)
                    fresh = _start(agent.spec, exe, agents.work_dir)
                    setattr(agents, role, fresh)
                    pending[role], launched[role] = fresh, time.monotonic()
                    continue
                raise AgentStartError(
                    f"ACA-Py {role} exited with code {code} during start "
                    f"({time.monotonic() - launched[role]:.1f}s); {agent.log_path}:\n{tail}"
                )
            if _get(f"{agent.admin_url}/status/ready", agent.target.headers(), 1.0) == 200:
                agent.started_in = time.monotonic() - launched[role]
                del pending[role]
        if not pending:
            return
        if time.monotonic() > deadline:
            role, agent = next(iter(pending.items()))
            raise AgentStartError(
                f"ACA-Py {role} not ready after {timeout:g}s ({agent.admin_url}/status/ready); "
                f"{agent.log_path}:\n{agent.log_tail()}"
            )
        time.sleep(0.1)


def admin_call(
    admin_url: str,
    method: str,
    path: str,
    *,
    api_key: str | None = None,
    token: str | None = None,
    params: dict[str, Any] | None = None,
    body: Any = None,
    timeout: float = 10.0,
) -> Any:
    """One blocking admin call, for setup code outside an event loop: parsed JSON, AdminError on non-2xx."""
    query = {
        k: str(v).lower() if isinstance(v, bool) else str(v)
        for k, v in (params or {}).items()
        if v is not None
    }
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{admin_url.rstrip('/')}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else ""),
        data=None if body is None else json.dumps(body).encode(),
        headers=headers,
        method=method,
    )
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        with exc:
            text = exc.read().decode("utf-8", "replace")
        raise AdminError(exc.code, short_message(text), path, method=method) from None
    except OSError as exc:
        raise AdminError(0, f"{admin_url} unreachable: {exc}", path, method=method) from None
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return text


def mediator_invitation(
    mediator_admin_url: str,
    api_key: str | None = None,
    *,
    alias: str = "harness",
    multi_use: bool = True,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Create an out-of-band didexchange/1.1 invitation on the mediator's admin API; the invitation."""
    path = "/out-of-band/create-invitation"
    record = admin_call(
        mediator_admin_url,
        "POST",
        path,
        api_key=api_key,
        params={"auto_accept": True, "multi_use": multi_use},
        body={"handshake_protocols": [DIDEXCHANGE], "alias": alias, "use_public_did": False},
        timeout=timeout,
    )
    invitation = record.get("invitation") if isinstance(record, dict) else None
    if not isinstance(invitation, dict):
        raise AdminError(200, "no invitation in the answer", path, method="POST")
    return invitation


def _poll(fetch: Callable[[], Any], done: Callable[[Any], bool], what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AgentStartError(
                f"ACA-Py priming: {what} not reached after {timeout:g}s (last {value!r:.200})"
            )
        time.sleep(0.05)


def prime_mediator(agents: Agents, timeout: float = 30.0) -> float:
    """Get one mediation granted through a throwaway sub-wallet, then delete the sub-wallet; seconds taken.

    ACA-Py 1.7.0 creates the mediator's routing DID on its first grant, unlocked: concurrent first grants
    race on it (`StorageDuplicateError: Duplicate record: routing_did/routing_did` in the mediator's log)
    and the losers stay in state `request` for ever. One grant before the load makes the DID exist. It
    also creates the multitenant agent's shared sub-wallet store, which the first tenant would wait for.
    The mediator keeps one connection (alias `harness-primer-…`) and one granted mediation record: 1.7.0
    cannot delete mediation records (`DELETE /mediation/requests/{id}` answers 500), so count by delta.
    """
    med, multi = agents.mediator, agents.multitenant
    if med is None or multi is None:
        raise UsageError("ACA-Py: priming the mediator needs both the mediator and the multitenant agent")
    began = time.monotonic()
    med_key, multi_key = med.spec.admin_api_key, multi.spec.admin_api_key
    alias = f"harness-primer-{secrets.token_hex(4)}"
    invitation = mediator_invitation(med.admin_url, med_key, alias=alias, multi_use=False)
    wallet = admin_call(
        multi.admin_url,
        "POST",
        "/multitenancy/wallet",
        api_key=multi_key,
        body={
            "label": alias,
            "wallet_name": alias,
            "wallet_key": raw_wallet_key(),
            "wallet_key_derivation": "RAW",
            "wallet_type": "askar",
            "key_management_mode": "managed",
        },
    )
    token = wallet["token"]
    try:
        oob = admin_call(
            multi.admin_url,
            "POST",
            "/out-of-band/receive-invitation",
            api_key=multi_key,
            token=token,
            params={"auto_accept": True, "alias": "mediator"},
            body=invitation,
        )
        conn_path = f"/connections/{oob['connection_id']}"
        _poll(
            lambda: admin_call(multi.admin_url, "GET", conn_path, api_key=multi_key, token=token),
            lambda record: record.get("state") in ACTIVE_STATES,
            "mediator connection active",
            timeout,
        )
        request = admin_call(
            multi.admin_url,
            "POST",
            f"/mediation/request/{oob['connection_id']}",
            api_key=multi_key,
            token=token,
            body={},
        )
        med_path = f"/mediation/requests/{request['mediation_id']}"
        _poll(
            lambda: admin_call(multi.admin_url, "GET", med_path, api_key=multi_key, token=token),
            lambda record: record.get("state") == "granted",
            "mediation granted",
            timeout,
        )
    finally:
        admin_call(
            multi.admin_url,
            "DELETE",
            f"/multitenancy/wallet/{wallet['wallet_id']}",
            api_key=multi_key,
            body={},
        )
    return time.monotonic() - began


def parse_invitation_url(url: str) -> dict[str, Any]:
    """The invitation in an invitation URL: `?oob=` (out-of-band) or `?c_i=` (RFC 0160), base64url JSON."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url.strip()).query)
    encoded = (query.get("oob") or query.get("c_i") or [""])[0]
    if not encoded:
        raise UsageError("ACA-Py invitation URL: no 'oob=' or 'c_i=' parameter in it")
    try:
        invitation = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise UsageError(f"ACA-Py invitation URL: not base64url JSON ({exc})") from None
    if not isinstance(invitation, dict) or "invitation" not in str(invitation.get("@type", "")):
        raise UsageError(
            "ACA-Py invitation URL: the payload is not an invitation message (no invitation @type)"
        )
    return invitation


def invitation_url(invitation: dict[str, Any], base: str = "http://127.0.0.1") -> str:
    """An `?oob=` URL for an out-of-band invitation, as consoles print; `parse_invitation_url` inverts it."""
    encoded = base64.urlsafe_b64encode(json.dumps(invitation, separators=(",", ":")).encode()).decode()
    return f"{base}?oob={encoded.rstrip('=')}"

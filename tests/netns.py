"""Private network namespaces for multi-host tests: a hub namespace linked to peer namespaces by veth pairs.

Root only. Every namespace is named `h10-<pid>-<lab>-<role>` so that two test runs never collide and the
namespaces of a crashed run (its pid gone) can be removed by the next one (`clean_stale`). Both ends of
every veth pair are created directly inside namespaces, so the host's own network is never touched, and
the only addresses are the private ones made here (10.231.N.1 on the hub side, 10.231.N.2 on peer N's
side, one /24 per link). No namespace has a default route: traffic cannot leave them.

    lab = Lab()
    try:
        lab.namespace("hc")
        link = lab.link("hc", "ha1", 1)          # hc 10.231.1.1/24  <->  ha1 10.231.1.2/24
        server = lab.spawn("hc", [sys.executable, "-m", "http.server", ...], log=tmp / "server.log")
        lab.set_link(link, up=False)
    finally:
        lab.close()                              # kills every process inside, deletes the namespaces
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

PREFIX = "h10-"
SUBNET = "10.231.{n}.{host}"
_STALE = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
_labs = itertools.count(1)


def unavailable() -> str | None:
    """Why namespaces cannot be used here (a reason to skip), or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _delete(probe)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip ARGS`; RuntimeError with ip's message when `check` and it fails."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def namespaces() -> list[str]:
    """Names of the network namespaces that exist now."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _delete(ns: str) -> None:
    """Kill every process inside `ns`, then delete it (its veth ends go with it)."""
    for _ in range(50):
        pids = _pids(ns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    _ip("netns", "delete", ns, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale() -> list[str]:
    """Delete namespaces with this module's prefix left by runs whose process is gone; returns them."""
    removed = []
    for ns in namespaces():
        match = _STALE.match(ns)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            _delete(ns)
            removed.append(ns)
    return removed


@dataclass
class Link:
    """A veth pair between the hub namespace and one peer namespace, on subnet 10.231.`n`.0/24."""

    hub: str
    peer: str
    n: int
    hub_if: str
    peer_if: str

    @property
    def hub_addr(self) -> str:
        """The hub side's address (what the peer connects to)."""
        return SUBNET.format(n=self.n, host=1)

    @property
    def peer_addr(self) -> str:
        """The peer side's address."""
        return SUBNET.format(n=self.n, host=2)


@dataclass
class Lab:
    """A set of namespaces, links and processes for one test, all removed by `close()`."""

    names: dict[str, str] = field(default_factory=dict)
    """Role (e.g. `hc`) -> the namespace's real name."""
    links: list[Link] = field(default_factory=list)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    files: list[IO[Any]] = field(default_factory=list)
    prefix: str = ""

    def __post_init__(self) -> None:
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_labs)}-"

    def namespace(self, role: str) -> str:
        """Create the namespace for `role` (once) with `lo` up; returns its real name."""
        if role in self.names:
            return self.names[role]
        name = self.prefix + role
        if name in namespaces():  # left over by an earlier lab of this same process
            _delete(name)
        _ip("netns", "add", name)
        self.names[role] = name
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def link(self, hub: str, peer: str, n: int) -> Link:
        """A veth pair hub <-> peer with 10.231.n.1/24 on the hub side and 10.231.n.2/24 on the peer's."""
        if not 1 <= n <= 254:
            raise ValueError(f"subnet number {n} is not in 1..254")
        hub_ns, peer_ns = self.namespace(hub), self.namespace(peer)
        link = Link(hub, peer, n, hub_if=f"to-{peer}"[:15], peer_if=f"to-{hub}"[:15])
        _ip(
            "-n",
            hub_ns,
            "link",
            "add",
            link.hub_if,
            "type",
            "veth",
            "peer",
            "name",
            link.peer_if,
            "netns",
            peer_ns,
        )
        _ip("-n", hub_ns, "addr", "add", f"{link.hub_addr}/24", "dev", link.hub_if)
        _ip("-n", peer_ns, "addr", "add", f"{link.peer_addr}/24", "dev", link.peer_if)
        self.links.append(link)
        self.set_link(link, up=True)
        return link

    def set_link(self, link: Link, *, up: bool) -> None:
        """Bring the hub's end of `link` down (the peer is cut off) or up again."""
        state = "up" if up else "down"
        _ip("-n", self.names[link.hub], "link", "set", link.hub_if, state)
        if up:
            _ip("-n", self.names[link.peer], "link", "set", link.peer_if, "up")

    def argv(self, role: str, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace of `role`."""
        return ["ip", "netns", "exec", self.names[role], *argv]

    def spawn(
        self,
        role: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        log: Path | None = None,
        stderr_log: Path | None = None,
    ) -> subprocess.Popen[Any]:
        """Start `argv` inside `role`'s namespace in its own process group (session).

        Its output goes to `log` (stdout and stderr together unless `stderr_log` is given), else is
        dropped. `ip netns exec` execs the command, so the process's pid is the command's own.
        """
        out: IO[Any] | int = subprocess.DEVNULL
        err: IO[Any] | int = subprocess.STDOUT if log is not None else subprocess.DEVNULL
        if log is not None:
            out = open(log, "wb")  # noqa: SIM115 - closed by close()
            self.files.append(out)
        if stderr_log is not None:
            err = open(stderr_log, "wb")  # noqa: SIM115 - closed by close()
            self.files.append(err)
        proc = subprocess.Popen(
            self.argv(role, argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def run(
        self, role: str, argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `role`'s namespace to completion, capturing its output."""
        return subprocess.run(self.argv(role, argv), env=env, capture_output=True, text=True, timeout=timeout)

    def wait_port(self, role: str, host: str, port: int, timeout: float = 20) -> bool:
        """Whether a TCP connection to host:port from inside `role`'s namespace succeeds within `timeout`."""
        code = (
            "import socket, sys, time\n"
            f"end = time.monotonic() + {timeout}\n"
            "while time.monotonic() < end:\n"
            "    try:\n"
            f"        socket.create_connection(({host!r}, {port}), timeout=1).close()\n"
            "        sys.exit(0)\n"
            "    except OSError:\n"
            "        time.sleep(0.1)\n"
            "sys.exit(1)\n"
        )
        try:
            return self.run(role, [sys.executable, "-c", code], timeout=timeout + 10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    @staticmethod
    def kill(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
        """Send `sig` to `proc`'s whole process group (it and every process it started)."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill_all(self, role: str) -> list[int]:
        """SIGKILL every process inside `role`'s namespace (the host goes away); returns their pids."""
        pids = _pids(self.names[role])
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def stop(self, proc: subprocess.Popen[Any], grace: float = 5.0) -> int | None:
        """SIGTERM `proc`'s group, SIGKILL it after `grace` seconds; returns the exit code."""
        if proc.poll() is None:
            self.kill(proc, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill(proc, signal.SIGKILL)  # what the process itself left behind, too
        try:
            return proc.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Stop every process (SIGTERM, SIGKILL after 3 s), delete every namespace, even if a step fails."""
        running = [proc for proc in self.procs if proc.poll() is None]
        for proc in running:
            self.kill(proc, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            self.kill(proc, signal.SIGKILL)  # also whatever each one left behind in its group
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover - the namespace's deletion kills it
                pass
        for f in self.files:
            f.close()
        for name in self.names.values():
            _delete(name)
        self.names.clear()
        self.links.clear()

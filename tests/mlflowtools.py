"""A real `mlflow server` for the tests: sqlite backend and proxied artifacts in a folder, 127.0.0.1 on a free
port, in its own process group that is killed as a whole (MLflow's job runners would outlive its pid)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from tests.clitools import free_port

REPO = Path(__file__).resolve().parents[1]
SERVER_VENV = REPO / ".venv-mlflow"
"""Full `mlflow` (the server) lives here: in the project's venv it would downgrade gunicorn."""


def server_binary() -> Path | None:
    """The `mlflow` executable that can run a server: `.venv-mlflow`, else this venv if it has full mlflow."""
    candidate = SERVER_VENV / "bin" / "mlflow"
    if candidate.exists():
        return candidate
    here = Path(sys.executable).parent / "mlflow"
    try:
        import alembic  # noqa: F401  (only full mlflow pulls it in; mlflow-skinny cannot serve)
    except ImportError:
        return None
    return here if here.exists() else None


def group_processes(pgid: int) -> list[psutil.Process]:
    """Live processes of a process group (zombies excluded)."""
    out = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                out.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


@dataclass
class Server:
    """A running tracking server."""

    url: str
    pgid: int
    folder: Path
    started_in: float
    """Seconds from launch to the first healthy answer."""


def leftovers(server: Server) -> list[str]:
    """Processes of the server still alive: in its process group, or naming its folder in their command
    line or environment (MLflow hands its children the store URIs through the environment)."""
    folder = str(server.folder)
    found = {p.pid: p for p in group_processes(server.pgid)}
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        try:
            mentions = folder in " ".join(proc.info["cmdline"] or []) or any(
                folder in v for v in proc.environ().values()
            )
        except psutil.Error:
            continue
        if mentions:
            found[proc.pid] = proc
    out = []
    for proc in found.values():
        try:
            out.append(f"{proc.pid} {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            continue
    return out


@contextmanager
def mlflow_server(folder: Path, start_timeout: float = 90.0) -> Iterator[Server]:
    """Run `mlflow server` until the block ends. Raises if it does not get healthy in `start_timeout`."""
    binary = server_binary()
    if binary is None:
        raise FileNotFoundError(
            f"no MLflow server: python3.11 -m venv {SERVER_VENV} && {SERVER_VENV}/bin/pip install mlflow"
        )
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HARNESS_"))},
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    log_path = folder / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(binary),
                "server",
                "--backend-store-uri",
                f"sqlite:///{folder / 'mlflow.db'}",
                "--artifacts-destination",
                str(folder / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: pgid == pid
        )
    pgid = proc.pid
    began = time.monotonic()
    try:
        deadline = began + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {proc.returncode}: {log_path.read_text()[-2000:]}"
                )
            try:
                with requests.get(f"{url}/health", timeout=1) as response:
                    if response.status_code == 200:
                        break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server not healthy after {start_timeout:g}s: {log_path.read_text()[-2000:]}"
                )
            time.sleep(0.2)
        yield Server(url, pgid, folder, time.monotonic() - began)
    finally:
        stop_group(proc, pgid)


def stop_group(proc: subprocess.Popen[bytes], pgid: int, timeout: float = 15.0) -> None:
    """SIGTERM the whole process group, SIGKILL what is left after `timeout`; reap the leader."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while group_processes(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
        proc.poll()
    if group_processes(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)

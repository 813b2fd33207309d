"""The panel as production serves it: gunicorn processes (the README's command), a Redis server for
the Socket.IO message queue, and Socket.IO clients that join a run and keep its ticks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import socketio

from tests.clitools import ROOT, free_port


def start_gunicorn(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The documented gunicorn command on 127.0.0.1:`port`, with the HARNESS_* settings in `env` only."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    gunicorn = Path(sys.executable).with_name("gunicorn")
    command = [str(gunicorn), "--worker-class", "gthread", "-w", "1", "--threads", "100"]
    command += ["-b", f"127.0.0.1:{port}", "web:create_app()"]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Wait until the panel at `url` answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "gunicorn exited: " + _stderr(proc)
        try:
            requests.get(url + "api/session", timeout=2).close()
            return
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.2)
    raise AssertionError("gunicorn did not answer")


def stop_gunicorn(proc: subprocess.Popen[bytes], timeout: float = 30) -> int | None:
    """SIGTERM (a graceful shutdown), then SIGKILL if it hangs; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return None
    finally:
        if proc.stderr is not None:
            proc.stderr.close()


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    if proc.stderr is None or proc.poll() is None:
        return ""
    return proc.stderr.read().decode(errors="replace")[-2000:]


@contextmanager
def redis_server(work_dir: Path) -> Iterator[str]:
    """A real redis-server on 127.0.0.1 (Debian's package, from scripts/install-system); its URL."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    assert Path(binary).is_file(), "redis-server is missing: run scripts/install-system"
    import redis

    port = free_port()
    work_dir.mkdir(parents=True, exist_ok=True)
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*command, "--dir", str(work_dir)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, "redis-server exited"
            try:
                if redis.Redis.from_url(url, socket_timeout=1).ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


class TickClient:
    """A Socket.IO client that joins a run and keeps its `joined` answer, ticks and statuses."""

    def __init__(self, url: str, run_id: str, token: str, transport: str = "websocket") -> None:
        self.client = socketio.Client(reconnection=False)
        self.ticks: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.joined_msg: dict[str, Any] | None = None
        self.joined = threading.Event()
        self.client.on("tick", self.ticks.append)
        self.client.on("run_status", self.statuses.append)
        self.client.on("joined", self._on_joined)
        self.client.connect(url, auth={"token": token}, transports=[transport], wait_timeout=10)
        self.client.emit("join", {"run_id": run_id})

    def _on_joined(self, data: dict[str, Any]) -> None:
        self.joined_msg = data
        self.joined.set()

    def final_status(self, run_id: str) -> dict[str, Any] | None:
        """The `run_status` that carried the run's exit code, if it came."""
        return next((s for s in self.statuses if s.get("run_id") == run_id and "exit_code" in s), None)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()

"""Run embedded targets: in a supervised child process (`EmbeddedTarget`) or in the foreground.

Also `check_url`, the start-up health check for targets that harness does not run itself.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from multiprocessing.connection import Connection, wait
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from harness.distributions import Constant
from harness.durations import format_duration
from harness.errors import TargetError, UsageError
from harness.targets import TargetKind, get_target

_LOOPBACK_NAMES = {"localhost", "::1", "ip6-localhost"}
# Short per-probe timeouts so that a hung probe cannot eat the whole start-up budget.
_PROBE_TIMEOUT = 1.0
_POLL_INTERVAL = 0.05


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(app: web.Application, host: str, port: int, on_listening: Callable[[int], None]) -> None:
    """Serve `app` on host:port until SIGTERM or SIGINT, calling `on_listening(port)` once bound."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread: the caller stops us some other way
    # A short shutdown timeout: in-flight requests to a stopping target may fail, and `stop(grace)`
    # must not have to SIGKILL a target that is only waiting for slow handlers.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        on_listening(runner.addresses[0][1])
        await stop.wait()
    finally:
        await runner.cleanup()
        for sig in handled:
            loop.remove_signal_handler(sig)


async def serve_local(app: web.Application, shutdown_timeout: float = 1.0) -> tuple[web.AppRunner, str]:
    """Serve `app` on 127.0.0.1 and a free port in the running loop (a simulator's callback server, a
    test's target): the runner, to `cleanup()` when done, and the base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    return runner, _base_url(host, port)


@asynccontextmanager
async def served(app: web.Application, shutdown_timeout: float = 1.0) -> AsyncIterator[str]:
    """`serve_local` as a context manager: yields the base URL, cleans up on exit."""
    runner, url = await serve_local(app, shutdown_timeout)
    try:
        yield url
    finally:
        await runner.cleanup()


def _send(ready: Any, message: int | str) -> None:
    if hasattr(ready, "send"):
        ready.send(message)
    else:
        ready.put(message)


def serve_forever(
    name: str, config: Mapping[str, Any], host: str = "127.0.0.1", port: int = 0, ready: Any = None
) -> None:
    """Serve the target kind `name` on host:port until SIGTERM/SIGINT.

    `ready`, a multiprocessing Connection or Queue, receives the bound port (an int) once listening,
    or a one-line reason (a str) if the target could not start.
    """
    sent = False

    def on_listening(bound: int) -> None:
        nonlocal sent
        if ready is not None:
            _send(ready, bound)
            sent = True

    try:
        kind = get_target(name)
        app = kind.build_app(kind.parse_config(config))
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(app, host, port, on_listening))
    except BaseException as exc:
        if ready is None or sent:
            raise
        _send(ready, f"{type(exc).__name__}: {exc}")
        if isinstance(exc, OSError | UsageError):
            # Expected failures (port taken, bad config): the parent reports the reason, no traceback.
            raise SystemExit(1) from None
        raise


def _base_url(host: str, port: int) -> str:
    """The URL a local client uses (a target bound on every address is reached at the loopback one)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _is_loopback(host: str) -> bool:
    return host in _LOOPBACK_NAMES or host.startswith("127.")


def _probe(url: str, timeout: float) -> int:
    """The HTTP status of `GET url`; raises OSError when nothing answers."""
    host = urllib.parse.urlsplit(url).hostname or ""
    # Never route a loopback probe through an http_proxy from the environment.
    handlers = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()  # an HTTPError holds the open response: close it or it leaks a socket
        return int(exc.code)


def _reason(exc: OSError) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        exc = exc.reason if isinstance(exc.reason, OSError) else exc
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def check_url(name: str, url: str, health_path: str | None, timeout: float) -> None:
    """Wait until `url` answers < 500 on `health_path`, or (without one) accepts a TCP connection.

    Raises `TargetError` naming the target and the URL if it does not within `timeout` seconds.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"target {name!r}: url must look like http://host:port, got {url!r}")
    probe = url.rstrip("/") + health_path if health_path else url
    deadline = time.monotonic() + timeout
    reason = "no attempt"
    while True:
        remaining = deadline - time.monotonic()
        wait = max(0.05, min(_PROBE_TIMEOUT, remaining))
        if health_path is None:
            # Reachable is enough: the run itself will show how the target answers (or hangs).
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                socket.create_connection((parts.hostname, port), timeout=wait).close()
                return
            except OSError as exc:
                reason = _reason(exc)
                if time.monotonic() + _POLL_INTERVAL >= deadline:
                    raise TargetError(
                        f"target {name!r} is not reachable at {url} within {timeout}s: {reason}"
                    ) from None
                time.sleep(_POLL_INTERVAL)
                continue
        try:
            status = _probe(probe, wait)
        except OSError as exc:
            reason = _reason(exc)
        else:
            if health_path is None or status < 500:
                return
            reason = f"HTTP {status}"
        if time.monotonic() + _POLL_INTERVAL >= deadline:
            raise TargetError(f"target {name!r} did not answer {probe} within {timeout}s: {reason}")
        time.sleep(_POLL_INTERVAL)


class EmbeddedTarget:
    """An embedded target in its own process, health-checked at start and restarted if it dies."""

    def __init__(
        self,
        name: str,
        kind: str,
        config: Mapping[str, Any] | BaseModel | None,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.name = name
        self.kind: TargetKind = get_target(kind)
        self.config: BaseModel = self.kind.parse_config(config, label=name)
        # The child validates again, so pass it plain data: the user's own mapping when we have one.
        self._raw_config = (
            config.model_dump(by_alias=True) if isinstance(config, BaseModel) else dict(config or {})
        )
        self.host = host
        self.port = port
        self._process: Any = None  # a forkserver Process; Any because its class is context-specific
        self._wanted = False
        self._timeout = 15.0

    @property
    def url(self) -> str | None:
        """The base URL, `http://127.0.0.1:PORT`; None while the port is unknown (port 0, not yet started)."""
        return _base_url(self.host, self.port) if self.port else None

    @property
    def pid(self) -> int | None:
        """The process id of the running target, if any."""
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        """Whether the target's process is running."""
        return self._process is not None and self._process.is_alive()

    def start(self, timeout: float = 15.0) -> str:
        """Start the target and wait until its health path answers 200; returns the base URL."""
        if self.alive:
            return str(self.url)
        self._reap()
        self._timeout = timeout
        self._wanted = True
        deadline = time.monotonic() + timeout
        health = self.kind.health_path
        ctx = multiprocessing.get_context("forkserver")
        receiver, sender = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=serve_forever,
            args=(self.kind.name, self._raw_config, self.host, self.port, sender),
            name=f"harness-target-{self.name}",
            # Daemonic, so that a target never outlives the harness that started it.
            daemon=True,
        )
        try:
            process.start()
        finally:
            sender.close()
        self._process = process
        try:
            reason = self._wait_listening(receiver, deadline)
            if reason is None:
                reason = self._wait_healthy(deadline)
        finally:
            receiver.close()
        if reason is not None:
            url = _base_url(self.host, self.port) if self.port else _base_url(self.host, 0)
            self._kill()
            raise TargetError(
                f"target {self.name!r} did not answer {url}{health} within {timeout}s: {reason}"
            )
        return str(self.url)

    def _wait_listening(self, receiver: Connection, deadline: float) -> str | None:
        """Learn the bound port from the child; returns why not, or None."""
        process = self._process
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "the process did not start listening"
            ready = wait([receiver, process.sentinel], timeout=remaining)
            if receiver in ready:
                try:
                    message = receiver.recv()
                except EOFError:
                    process.join(1.0)
                    return f"the process exited with code {process.exitcode}"
                if isinstance(message, int):
                    self.port = message
                    return None
                process.join(1.0)
                return str(message)
            if process.sentinel in ready:
                process.join(1.0)
                return f"the process exited with code {process.exitcode}"

    def _wait_healthy(self, deadline: float) -> str | None:
        """Poll the health path until it answers 200; returns why not, or None."""
        probe = f"{self.url}{self.kind.health_path}"
        reason = "no answer"
        while True:
            if not self._process.is_alive():
                return f"the process exited with code {self._process.exitcode}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return reason
            try:
                status = _probe(probe, min(_PROBE_TIMEOUT, remaining))
            except OSError as exc:
                reason = _reason(exc)
            else:
                if status == 200:
                    return None
                reason = f"HTTP {status}"
            time.sleep(_POLL_INTERVAL)

    def stop(self, grace: float = 5.0) -> None:
        """Stop the target: SIGTERM, wait up to `grace` seconds, then SIGKILL."""
        self._wanted = False
        process = self._process
        if process is None:
            return
        if process.is_alive():
            process.terminate()
            process.join(grace)
        self._kill()

    def restart(self, timeout: float | None = None) -> str:
        """Stop and start again on the same port; returns the base URL."""
        self.stop()
        return self.start(self._timeout if timeout is None else timeout)

    def ensure_running(self) -> bool:
        """Restart the target, on the same port, if it died since `start`; True if it restarted."""
        if not self._wanted or self.alive:
            return False
        self.start(self._timeout)
        return True

    def _kill(self) -> None:
        process = self._process
        if process is None:
            return
        if process.is_alive():
            process.kill()
        process.join()
        process.close()
        self._process = None

    def _reap(self) -> None:
        # A dead process from an earlier start: collect it before starting the next.
        if self._process is not None:
            self._kill()

    def __enter__(self) -> EmbeddedTarget:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.alive else "stopped"
        return f"EmbeddedTarget({self.name!r}, kind={self.kind.name!r}, url={self.url!r}, {state})"


def _describe(config: BaseModel) -> str:
    """`concurrency=8, service_time=5ms, queue_limit=64` for a service-model config."""
    parts = []
    for field in ("concurrency", "service_time", "queue_limit"):
        if not hasattr(config, field):
            continue
        value = getattr(config, field)
        if isinstance(value, Constant):
            value = format_duration(value.value)
        elif hasattr(value, "mean") and hasattr(value, "type"):
            value = f"{value.type}(mean {format_duration(value.mean())})"
        parts.append(f"{field}={value}")
    return ", ".join(parts)


def run_foreground(name: str, config: Mapping[str, Any], host: str, port: int) -> int:
    """Serve target kind `name` in this process until Ctrl-C or SIGTERM (`python -m harness target NAME`)."""
    kind = get_target(name)
    parsed = kind.parse_config(config)
    app = kind.build_app(parsed)
    details = _describe(parsed)

    def on_listening(bound: int) -> None:
        suffix = f" ({details})" if details else ""
        print(f"{kind.name} target listening on {_base_url(host, bound)}{suffix}", flush=True)

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(app, host, port, on_listening))
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        # A second Ctrl-C during shutdown: still a clean exit, not a traceback.
        print("stopped", file=sys.stderr)
    return 0

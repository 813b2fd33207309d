"""A lean HTTP/1.1 keep-alive client for plain `http://` URLs: the `http` simulator's fast path.

Why it exists: a load generator spends most of its CPU in its HTTP client. aiohttp costs ~45 µs per
request on one core (URL objects, timeout contexts, response objects, stream readers); this client
does the same job in a few µs, so one core drives several times more requests:

- a request is encoded once (`prepare()`: request line, Host, Content-Length, `Connection:
  keep-alive`, headers and body in one `bytes`) and written as is on every send;
- responses are parsed by `httptools` (llhttp, the parser uvicorn uses) straight from an asyncio
  Protocol; a response is one future and one small object;
- connections are pooled per (host, port): idle ones reused last-in first-out, at most
  `connections` open in total, requests beyond that waiting first-in first-out on a bare future
  (100,000 queued users cost a future each, not a request object each);
- the total timeout (waiting for a connection included) needs no timer per request: every request
  of a client has the same timeout, so deadlines arrive in start order and one loop timer, armed for
  the earliest deadline, sweeps the pool when it fires.

What it does not do (use aiohttp for these; the simulator does so for https:// URLs and with
`client: aiohttp`): TLS, proxies, redirects, cookies, content decoding (gzip), request streaming,
pipelining, HTTP upgrades. It does handle Content-Length, chunked and read-until-close bodies, HEAD
and 204/304, interim 1xx responses, `Connection: close`, and a server closing an idle keep-alive
connection under our feet (the request is retried once on a fresh connection, as browsers do).
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections import deque
from typing import Any
from urllib.parse import quote, urlsplit

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

__all__ = [
    "ClientClosed",
    "ClientError",
    "ConnectError",
    "FastClient",
    "InvalidResponse",
    "PreparedRequest",
    "RequestTimeout",
    "Response",
    "ServerDisconnected",
]


class ClientError(Exception):
    """Base class of the errors FastClient raises."""


class ConnectError(ClientError, ConnectionError):
    """The TCP connection could not be opened (refused, unreachable, name not resolved)."""


class ServerDisconnected(ClientError, ConnectionError):
    """The server closed or reset the connection before the response was complete."""


class InvalidResponse(ClientError):
    """The server sent something that is not a valid HTTP/1.x response."""


class RequestTimeout(ClientError, TimeoutError):
    """The request (waiting for a connection included) took longer than the client's timeout."""


class ClientClosed(ClientError):
    """The client was closed while the request was waiting or in flight."""


class _Stale(Exception):
    """A reused keep-alive connection died before any response byte: retry on a fresh one."""


class Response:
    """A complete response: status, body and the raw header list."""

    __slots__ = ("_headers", "body", "raw_headers", "status")

    def __init__(self, status: int, body: bytes, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.body = body
        self.raw_headers = raw_headers
        """Header (name, value) pairs as received, in order."""
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Headers by lower-case name (repeated ones joined with ', '), built on first use."""
        if self._headers is None:
            headers: dict[str, str] = {}
            for raw_name, raw_value in self.raw_headers:
                name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self._headers = headers
        return self._headers

    def __repr__(self) -> str:
        return f"<Response {self.status} ({len(self.body)} bytes)>"


class PreparedRequest:
    """A request encoded once for a given client, ready to be sent any number of times."""

    __slots__ = ("body", "data", "head", "host", "method", "pool", "port", "url")

    def __init__(self, method: str, url: str, host: str, port: int, data: bytes, body: bytes, pool: _Pool):
        self.method = method
        self.url = url
        self.host = host
        self.port = port
        self.data = data
        """Request line, headers and body: exactly the bytes written."""
        self.body = body
        self.head = method == "HEAD"
        self.pool = pool

    def __repr__(self) -> str:
        return f"<PreparedRequest {self.method} {self.url}>"


def _check_token(text: str, what: str) -> None:
    # A CR or LF in a header would let a profile inject headers or split the request.
    if "\r" in text or "\n" in text or (what == "header name" and (":" in text or not text.strip())):
        raise ValueError(f"invalid {what}: {text!r}")


_PATH_SAFE = "/:@!$&'()*+,;=%-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


def _encode_request(
    method: str, url: str, defaults: dict[str, str], headers: dict[str, str] | None, body: bytes | None
) -> tuple[str, int, bytes]:
    """(host, port, wire bytes) of one request."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "http":
        raise ValueError(f"FastClient sends only http:// URLs, not {url!r} (use aiohttp for https)")
    if parts.username or parts.password:
        raise ValueError(f"credentials in the URL are not supported by FastClient: {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"URL has no host: {url!r}")
    port = parts.port or 80
    method = method.upper()
    _check_token(method, "method")
    if not method.isalpha():
        raise ValueError(f"invalid method: {method!r}")
    # Re-quote only what is not allowed on the wire; existing %-escapes are kept as they are.
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_QUERY_SAFE)
    host_header = f"[{host}]" if ":" in host else host
    if parts.port is not None and port != 80:
        host_header += f":{port}"
    merged: dict[str, tuple[str, str]] = {}  # lower-case name -> (name as given, value)
    for source in (defaults, headers or {}):
        for name, value in source.items():
            _check_token(name, "header name")
            _check_token(str(value), "header value")
            merged[name.lower()] = (name, str(value))
    merged.setdefault("host", ("Host", host_header))
    merged.setdefault("connection", ("Connection", "keep-alive"))
    if body is not None or method in ("POST", "PUT", "PATCH"):
        merged["content-length"] = ("Content-Length", str(len(body or b"")))
    merged.pop("transfer-encoding", None)  # the body is sent whole, with its length
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in merged.values()]
    wire = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + (body or b"")
    return host, port, wire


def _reason(exc: OSError) -> str:
    """'Connection refused' rather than asyncio's "Connect call failed ('127.0.0.1', 9)"."""
    if exc.errno and exc.errno > 0 and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


class _Conn(asyncio.Protocol):
    """One keep-alive connection: writes prepared bytes, parses responses with httptools."""

    __slots__ = (
        "deadline",
        "done",
        "dropped",
        "fut",
        "got_data",
        "head",
        "headers",
        "headers_done",
        "parser",
        "parts",
        "pool",
        "reused",
        "transport",
    )

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: Any = None
        self.parser = HttpResponseParser(self)
        self.fut: asyncio.Future[Response] | None = None
        self.deadline = 0.0
        """The in-flight request's deadline (loop time); 0 while idle."""
        self.head = False
        self.got_data = False
        self.headers_done = False
        self.done = False
        self.reused = False
        self.dropped = True
        """True until the pool registers the connection, and again once it has left the pool."""
        self.headers: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] = []

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.pool.client._transports += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small requests must not wait for Nagle's algorithm
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        if not self.deadline:
            # Bytes on an idle connection are not a response to anything: it can't be reused.
            self.close()
            return
        self.got_data = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            if not self.done:
                self.fail(InvalidResponse(f"{self.pool.name} switched protocols (not supported)"))
        except HttpParserError as exc:
            reason = str(exc) or type(exc).__name__
            self.fail(InvalidResponse(f"invalid HTTP response from {self.pool.name}: {reason}"))

    def eof_received(self) -> bool | None:
        if not self.deadline:
            self.drop()  # take an idle connection out of the pool now, before anyone picks it
        return None  # let the transport close; connection_lost finishes the in-flight request

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.client._lost()
        if self.deadline and not self.done:
            fut = self.fut
            if self.headers_done and self._ends_at_close():
                self.on_message_complete()  # the body was delimited by the close itself
            elif self.reused and not self.got_data and fut is not None and not fut.done():
                # The server dropped a keep-alive connection we just reused (its idle timeout
                # raced our request): the request never reached it, so it is safe to resend.
                # The pool slot stays with the retrying request.
                self.dropped = True
                self.pool.discard(self)
                self.deadline = 0.0
                self.fut = None
                fut.set_exception(_Stale())
            else:
                where = "mid-response" if self.got_data else "before responding"
                message = f"server closed the connection {where}"
                if exc is not None:
                    message += f" ({_reason(exc) if isinstance(exc, OSError) else exc})"
                self.fail(ServerDisconnected(message))
        self.drop()

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        if self.head and not 100 <= self.parser.get_status_code() < 200:
            # llhttp can't know the request was HEAD and would wait for Content-Length bytes;
            # the response ends here. The parser is mid-message, so the next one needs a new one.
            self.on_message_complete()
            self.parser = HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)

    def on_message_complete(self) -> None:
        if self.done:
            return  # a HEAD response already completed at its headers
        parser = self.parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # interim (100 Continue, 103 Early Hints): wait on
            self.headers = []
            self.parts = []
            self.headers_done = False
            return
        parts = self.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        response = Response(status, body, self.headers)
        self.headers = []  # the response owns the old lists now
        self.parts = []
        fut = self.fut
        self.done = True
        self.deadline = 0.0
        self.fut = None
        self.reused = True
        if self.transport is None or status == 101 or not parser.should_keep_alive():
            self.close()  # `Connection: close`, HTTP/1.0 or a body that ended at the close
        else:
            self.pool.release(self)
        if fut is not None and not fut.done():
            fut.set_result(response)

    # -- used by the pool and the client ----------------------------------------------------------

    def begin(self, prepared: PreparedRequest, fut: asyncio.Future[Response], deadline: float) -> None:
        """Send `prepared`; `fut` gets the response."""
        self.fut = fut
        self.deadline = deadline
        self.head = prepared.head
        self.got_data = self.headers_done = self.done = False
        self.transport.write(prepared.data)

    def _ends_at_close(self) -> bool:
        # A response with neither Content-Length nor chunked encoding ends when the server closes.
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length":
                return False
            if lower == b"transfer-encoding" and b"chunked" in value.lower():
                return False
        return True

    def fail(self, exc: BaseException) -> None:
        """End the in-flight request with `exc` and close the connection."""
        fut = self.fut
        self.fut = None
        self.deadline = 0.0
        self.done = True
        self.close()
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def close(self) -> None:
        """Close the connection for good (it is never reused) and give its slot back."""
        self.drop()
        if self.transport is not None:
            self.transport.abort()  # no lingering: nothing we still want to send

    def evict(self) -> None:
        """Close the connection and leave the pool, keeping its slot for the caller to use."""
        self.dropped = True
        self.pool.discard(self)
        if self.transport is not None:
            self.transport.abort()

    def drop(self) -> None:
        """Leave the pool (once), freeing the slot for a waiting request."""
        if not self.dropped:
            self.dropped = True
            self.pool.discard(self)
            self.pool.free_slot()


class _Pool:
    """Connections to one (host, port)."""

    __slots__ = ("client", "conns", "host", "idle", "name", "port")

    def __init__(self, client: FastClient, host: str, port: int) -> None:
        self.client = client
        self.host = host
        self.port = port
        self.name = f"{host}:{port}"
        self.idle: list[_Conn] = []
        """Reused from the end (LIFO): warm connections stay warm, surplus ones age out."""
        self.conns: set[_Conn] = set()

    def release(self, conn: _Conn) -> None:
        """A connection finished a response and may be reused."""
        waiters = self.client._waiters
        while waiters:
            _deadline, waiter, pool = waiters.popleft()
            if waiter.done():
                continue  # timed out or cancelled while waiting
            if pool is self:
                waiter.set_result(conn)  # straight to the longest-waiting request
            else:
                # The cap is on all connections: the oldest waiter wants another host, so this
                # connection makes room, and its slot passes to that waiter to connect with.
                conn.evict()
                waiter.set_result(None)
            return
        self.idle.append(conn)

    def discard(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def free_slot(self) -> None:
        self.client._free_slot()

    async def connect(self, deadline: float) -> _Conn:
        """Open a connection in a slot already taken for it; gives the slot back on failure."""
        client = self.client
        loop = client._loop
        try:
            async with asyncio.timeout_at(deadline):
                _transport, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except TimeoutError:
            client._free_slot()
            raise client._timeout_error() from None
        except OSError as exc:
            client._free_slot()
            raise ConnectError(f"cannot connect to {self.name}: {_reason(exc)}") from None
        except BaseException:
            client._free_slot()
            raise
        if client._closed:
            conn.close()
            client._free_slot()
            raise ClientClosed("the client was closed")
        conn.dropped = False
        self.conns.add(conn)
        return conn


class FastClient:
    """HTTP/1.1 keep-alive client for http:// URLs with a capped, shared connection pool."""

    # Create it inside the event loop that uses it. `timeout` is the total time of every request:
    # one value per client, which is what lets one timer serve all requests. `connections` caps open
    # connections across all hosts; `default_headers` go into every prepared request.

    def __init__(
        self, connections: int = 100, timeout: float = 10.0, default_headers: dict[str, str] | None = None
    ):
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self.connections = connections
        self.timeout = float(timeout)
        self.default_headers = dict(default_headers or {})
        self._loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        self._pools: dict[tuple[str, int], _Pool] = {}
        self._open = 0
        """Slots taken: connections open or being opened, across all pools."""
        self._waiters: deque[tuple[float, asyncio.Future[Any], _Pool]] = deque()
        """Requests waiting for a connection, oldest first. A waiter gets a `_Conn` to use, or
        `None`: a slot was freed and is now the waiter's to open a connection with."""
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._transports = 0
        self._all_lost: asyncio.Future[None] | None = None
        self._closed = False

    def prepare(
        self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> PreparedRequest:
        """Encode a request once (with the client's default headers) for any number of `send()`s."""
        host, port, data = _encode_request(method, url, self.default_headers, headers, body)
        pool = self._pools.get((host, port))
        if pool is None:
            pool = self._pools[(host, port)] = _Pool(self, host, port)
        return PreparedRequest(method.upper(), url, host, port, data, body or b"", pool)

    async def request(
        self,
        method: str,
        url: str | PreparedRequest,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        """Send one request (a URL, or a request from `prepare()`) and return the whole response."""
        prepared = url if isinstance(url, PreparedRequest) else self.prepare(method, url, headers, body)
        return await self.send(prepared)

    async def send(self, prepared: PreparedRequest) -> Response:
        """Send a prepared request; raises RequestTimeout, ConnectError, ServerDisconnected, ..."""
        loop = self._loop
        deadline = loop.time() + self.timeout
        pool = prepared.pool
        if pool.client is not self:
            raise ValueError("this request was prepared by another client")
        idle = pool.idle
        conn = idle.pop() if idle else await self._acquire(pool, deadline)
        fut: asyncio.Future[Response] = loop.create_future()
        conn.begin(prepared, fut, deadline)
        if self._sweep_timer is None:
            self._sweep_timer = loop.call_at(deadline, self._sweep)
        try:
            return await fut
        except _Stale:
            pass
        except asyncio.CancelledError:
            self._cancelled_stale(fut)
            raise
        # Retry once, on a new connection, in the slot the dead one held.
        conn = await pool.connect(deadline)
        fut = loop.create_future()
        conn.begin(prepared, fut, deadline)
        if self._sweep_timer is None:
            self._sweep_timer = loop.call_at(deadline, self._sweep)
        try:
            return await fut
        except _Stale:
            raise ServerDisconnected("server closed the connection before responding") from None
        except asyncio.CancelledError:
            self._cancelled_stale(fut)
            raise

    def _cancelled_stale(self, fut: asyncio.Future[Response]) -> None:
        # Cancelled after a stale connection had passed its slot on to this request for the retry.
        if fut.done() and not fut.cancelled() and isinstance(fut.exception(), _Stale):
            self._free_slot()

    async def _acquire(self, pool: _Pool, deadline: float) -> _Conn:
        """A connection when none is idle: open one if under the cap, else wait for one."""
        if self._closed:
            raise ClientClosed("the client is closed")
        if self._open < self.connections:
            self._open += 1
            return await pool.connect(deadline)
        for other in self._pools.values():
            if other.idle and other is not pool:
                # All slots are held, some by idle connections to another host: close the least
                # recently used of those and connect in its slot.
                other.idle[0].evict()
                return await pool.connect(deadline)
        # A waiter is a bare future (cheap with 100,000 users queued); it gets a connection of
        # its pool to use, or None: a freed slot, now the waiter's to open a connection with.
        waiter: asyncio.Future[Any] = self._loop.create_future()
        self._waiters.append((deadline, waiter, pool))
        if self._sweep_timer is None:
            self._sweep_timer = self._loop.call_at(deadline, self._sweep)
        try:
            conn: _Conn | None = await waiter
        except asyncio.CancelledError:
            self._hand_back(waiter)
            raise
        if conn is None:
            return await pool.connect(deadline)
        if conn.dropped:
            # The server closed it between the hand-over and now; its slot went to the next
            # waiter (or was freed), so queue again.
            return await self._acquire(pool, deadline)
        return conn

    def _hand_back(self, waiter: asyncio.Future[Any]) -> None:
        # Cancelled after a connection or slot was handed to us: pass it on, don't leak it.
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            conn: _Conn | None = waiter.result()
            if conn is None:
                self._free_slot()
            elif not conn.dropped:
                conn.pool.release(conn)

    def _free_slot(self) -> None:
        """A connection closed (or failed to open): let the oldest waiter open one, or free the slot."""
        waiters = self._waiters
        while waiters:
            _deadline, waiter, _pool = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot stays taken, now by this waiter
                return
        self._open -= 1

    def _timeout_error(self) -> RequestTimeout:
        return RequestTimeout(f"timeout after {self.timeout:g}s")

    def _sweep(self) -> None:
        """Fail what passed its deadline; re-arm for the next deadline."""
        self._sweep_timer = None
        now = self._loop.time()
        following = math.inf
        for pool in self._pools.values():
            expired = []
            for conn in pool.conns:
                deadline = conn.deadline
                if deadline:
                    if deadline <= now:
                        expired.append(conn)
                    elif deadline < following:
                        following = deadline
            for conn in expired:
                conn.fail(self._timeout_error())  # and the connection is closed, never reused
        waiters = self._waiters
        while waiters and waiters[0][0] <= now:
            _deadline, waiter, _pool = waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self._timeout_error())
        if waiters and waiters[0][0] < following:
            following = waiters[0][0]
        if following < math.inf and not self._closed:
            self._sweep_timer = self._loop.call_at(following, self._sweep)

    def _lost(self) -> None:
        self._transports -= 1
        if self._transports == 0 and self._all_lost is not None and not self._all_lost.done():
            self._all_lost.set_result(None)

    @property
    def open_connections(self) -> int:
        """Connections open or being opened."""
        return self._open

    async def close(self) -> None:
        """Close every connection and fail waiting requests; waits until transports are closed."""
        if self._closed:
            return
        self._closed = True
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        while self._waiters:
            _deadline, waiter, _pool = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ClientClosed("the client was closed"))
        for pool in self._pools.values():
            for conn in list(pool.conns):
                conn.fail(ClientClosed("the client was closed"))
        if self._transports > 0:
            # connection_lost runs on a later loop iteration; closing the loop before it would
            # leave "unclosed transport" warnings behind.
            self._all_lost = self._loop.create_future()
            try:
                async with asyncio.timeout(5):
                    await self._all_lost
            except TimeoutError:
                pass

    async def __aenter__(self) -> FastClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

"""FastClient against real servers on loopback: aiohttp web apps, the echo target, and raw asyncio
servers that misbehave on purpose. Every test runs on both the stdlib loop and uvloop."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import uvloop
from aiohttp import web

from harness.targets.runner import EmbeddedTarget
from simulators.http.client import (
    ClientClosed,
    ConnectError,
    FastClient,
    InvalidResponse,
    RequestTimeout,
    Response,
    ServerDisconnected,
)
from tests.clitools import free_port

T = TypeVar("T")
Runner = Callable[[Awaitable[T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner[Any]:
    """Run a coroutine to completion on a fresh loop of the parametrized kind."""
    if request.param == "uvloop":
        return lambda coro: uvloop.run(coro)  # type: ignore[arg-type]
    return lambda coro: asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    """The real echo target, in its own process."""
    with EmbeddedTarget("echo", "echo", {"concurrency": 16, "service_time": "0ms"}) as target:
        assert target.url is not None
        yield target.url


# -- servers ------------------------------------------------------------------------------------------


@dataclass
class Seen:
    """What a test server saw: client ports (one per connection), request order, concurrency."""

    ports: set[int] = field(default_factory=set)
    order: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    active: int = 0
    max_active: int = 0


@asynccontextmanager
async def aiohttp_server(seen: Seen, keepalive_timeout: float = 75.0) -> AsyncIterator[str]:
    """An aiohttp app with the routes the tests need; yields its base URL."""

    async def track(request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            seen.ports.add(peer[1])
        seen.order.append(request.query.get("i", ""))
        seen.headers.append(dict(request.headers))

    async def plain(request: web.Request) -> web.Response:
        await track(request)
        return web.Response(text="hello")

    async def delay(request: web.Request) -> web.Response:
        await track(request)
        seen.active += 1
        seen.max_active = max(seen.max_active, seen.active)
        try:
            await asyncio.sleep(float(request.query.get("s", "0.05")))
        finally:
            seen.active -= 1
        return web.Response(text="late")

    async def echo_body(request: web.Request) -> web.Response:
        await track(request)
        return web.Response(body=await request.read())

    async def chunked(request: web.Request) -> web.StreamResponse:
        await track(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"one,", b"two,", b"three"):
            await response.write(part)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def status(request: web.Request) -> web.Response:
        await track(request)
        return web.Response(status=int(request.match_info["code"]))

    async def close(request: web.Request) -> web.Response:
        await track(request)
        return web.Response(text="bye", headers={"Connection": "close"})

    async def big(request: web.Request) -> web.Response:
        await track(request)
        return web.Response(body=b"x" * int(request.match_info["n"]))

    app = web.Application()
    app.router.add_get("/", plain)
    app.router.add_get("/delay", delay)
    app.router.add_post("/echo", echo_body)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/close", close)
    app.router.add_get("/big/{n}", big)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP server running `handler(reader, writer, connection_number)`; yields (URL, connections)."""
    connections: list[int] = []
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer, len(connections) - 1)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", connections
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request head (the tests send no bodies to raw servers)."""
    return await reader.readuntil(b"\r\n\r\n")


# -- keep-alive, pool, queueing -----------------------------------------------------------------------


def test_keep_alive_reuses_one_connection(run: Runner[None]) -> None:
    seen = Seen()

    async def main() -> None:
        async with aiohttp_server(seen) as url, FastClient(10, 5.0, {"User-Agent": "t"}) as client:
            prepared = client.prepare("GET", url + "/")
            for _ in range(20):
                response = await client.send(prepared)
                assert (response.status, response.body) == (200, b"hello")
            assert client.open_connections == 1
            assert response.headers["content-length"] == "5"

    run(main())
    assert len(seen.ports) == 1
    assert seen.headers[0]["User-Agent"] == "t"
    assert seen.headers[0]["Connection"] == "keep-alive"
    assert seen.headers[0]["Host"].startswith("127.0.0.1:")


def test_pool_cap_limits_connections_and_concurrency(run: Runner[None]) -> None:
    seen = Seen()

    async def main() -> None:
        async with aiohttp_server(seen) as url, FastClient(3, 5.0, {}) as client:
            responses = await asyncio.gather(
                *(client.request("GET", f"{url}/delay?i={i}") for i in range(12))
            )
            assert [r.body for r in responses] == [b"late"] * 12
            assert client.open_connections == 3

    run(main())
    assert len(seen.ports) == 3
    assert seen.max_active == 3


def test_waiting_requests_are_served_first_in_first_out_and_their_wait_counts(run: Runner[None]) -> None:
    seen = Seen()
    latencies: list[float] = []

    async def main() -> None:
        async with aiohttp_server(seen) as url, FastClient(1, 5.0, {}) as client:

            async def one(i: int) -> None:
                start = time.perf_counter()
                await client.request("GET", f"{url}/delay?i={i}&s=0.05")
                latencies.append(time.perf_counter() - start)

            await asyncio.gather(*(one(i) for i in range(5)))

    run(main())
    assert seen.order == ["0", "1", "2", "3", "4"]
    assert len(seen.ports) == 1 and seen.max_active == 1
    assert max(latencies) >= 0.2  # the last one waited for four others


def test_many_waiters_on_a_small_pool(run: Runner[None]) -> None:
    seen = Seen()

    async def main() -> None:
        async with aiohttp_server(seen) as url, FastClient(4, 10.0, {}) as client:
            prepared = client.prepare("GET", url + "/")
            responses = await asyncio.gather(*(client.send(prepared) for _ in range(2000)))
            assert all(r.status == 200 for r in responses)
            assert client.open_connections == 4

    run(main())
    assert len(seen.ports) == 4


def test_global_cap_closes_an_idle_connection_of_another_host(run: Runner[None]) -> None:
    first, second = Seen(), Seen()

    async def main() -> None:
        async with aiohttp_server(first) as a, aiohttp_server(second) as b, FastClient(1, 5.0, {}) as client:
            for _ in range(3):
                assert (await client.request("GET", a + "/")).status == 200
                assert (await client.request("GET", b + "/")).status == 200
            assert client.open_connections == 1

    run(main())
    assert len(first.ports) == 3 and len(second.ports) == 3


# -- bodies and framing -------------------------------------------------------------------------------


def test_post_body_is_echoed_with_its_length(run: Runner[None]) -> None:
    seen = Seen()
    payload = b'{"q": "shoes"}' * 100

    async def main() -> None:
        async with aiohttp_server(seen) as url, FastClient(2, 5.0, {}) as client:
            response = await client.request(
                "POST", url + "/echo", {"Content-Type": "application/json"}, payload
            )
            assert response.body == payload
            empty = await client.request("POST", url + "/echo")
            assert empty.body == b""

    run(main())
    assert seen.headers[0]["Content-Length"] == str(len(payload))
    assert seen.headers[0]["Content-Type"] == "application/json"
    assert seen.headers[1]["Content-Length"] == "0"


def test_chunked_response(run: Runner[None]) -> None:
    seen = Seen()

    async def main() -> None:
        async with aiohttp_server(seen) as url, FastClient(2, 5.0, {}) as client:
            for _ in range(2):
                response = await client.request("GET", url + "/chunked")
                assert response.body == b"one,two,three"
                assert response.headers["transfer-encoding"] == "chunked"

    run(main())
    assert len(seen.ports) == 1


def test_large_body(run: Runner[None], echo: str) -> None:
    async def main() -> None:
        async with FastClient(2, 10.0, {}) as client:
            response = await client.request("GET", echo + "/bytes/1000000")
            assert response.status == 200 and len(response.body) == 1_000_000
            response = await client.request("POST", echo + "/echo", body=b"z" * 1_000_000)
            assert response.status == 200 and b"zzzz" in response.body

    run(main())


def test_head_204_and_304_have_no_body_and_keep_the_connection(run: Runner[None]) -> None:
    seen = Seen()

    async def main() -> None:
        async with aiohttp_server(seen) as url, FastClient(1, 5.0, {}) as client:
            head = await client.request("HEAD", url + "/big/5000")
            assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "5000")
            assert (await client.request("GET", url + "/big/10")).body == b"x" * 10
            assert (await client.request("GET", url + "/status/204")).status == 204
            assert (await client.request("GET", url + "/status/304")).status == 304
            assert (await client.request("HEAD", url + "/big/7")).body == b""
            assert (await client.request("GET", url + "/")).body == b"hello"

    run(main())
    assert len(seen.ports) == 1


def test_body_without_length_ends_at_close(run: Runner[None]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"part two")
        await writer.drain()

    async def main() -> None:
        async with raw_server(handler) as (url, connections), FastClient(2, 5.0, {}) as client:
            for _ in range(2):
                response = await client.request("GET", url + "/")
                assert (response.status, response.body) == (200, b"part one, part two")
            assert len(connections) == 2  # never reused: the close ended the body

    run(main())


def test_interim_100_continue_is_skipped(run: Runner[None]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async def main() -> None:
        async with raw_server(handler) as (url, connections), FastClient(2, 5.0, {}) as client:
            for _ in range(3):
                response = await client.request("GET", url + "/")
                assert (response.status, response.body) == (200, b"ok")
            assert len(connections) == 1

    run(main())


# -- connection lifecycle -----------------------------------------------------------------------------


def test_connection_close_from_the_server_is_honoured(run: Runner[None]) -> None:
    seen = Seen()

    async def main() -> None:
        async with aiohttp_server(seen) as url, FastClient(2, 5.0, {}) as client:
            for _ in range(3):
                response = await client.request("GET", url + "/close")
                assert (response.status, response.body) == (200, b"bye")
            assert client.open_connections == 0

    run(main())
    assert len(seen.ports) == 3


def test_idle_connection_closed_by_the_server_is_replaced(run: Runner[None]) -> None:
    seen = Seen()

    async def main() -> None:
        async with aiohttp_server(seen, keepalive_timeout=0.05) as url, FastClient(2, 5.0, {}) as client:
            assert (await client.request("GET", url + "/")).status == 200
            await asyncio.sleep(0.3)  # the server's keep-alive timeout closes the idle connection
            assert client.open_connections == 0
            assert (await client.request("GET", url + "/")).status == 200

    run(main())
    assert len(seen.ports) == 2


def test_request_racing_an_idle_close_is_retried_once_on_a_fresh_connection(run: Runner[None]) -> None:
    # Each connection answers its first request, then closes on the second without a byte: what a
    # client sees when its request crosses the server's keep-alive close on the wire.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + str(n).encode())
        await writer.drain()
        await read_request(reader)

    async def main() -> None:
        async with raw_server(handler) as (url, connections), FastClient(1, 5.0, {}) as client:
            bodies = [(await client.request("GET", url + "/")).body for _ in range(3)]
            assert bodies == [b"0", b"1", b"2"]
            assert len(connections) == 3

    run(main())


def test_fresh_connection_closed_without_response_is_not_retried(run: Runner[None]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)

    async def main() -> None:
        async with raw_server(handler) as (url, connections), FastClient(1, 5.0, {}) as client:
            with pytest.raises(ServerDisconnected, match=r"^server closed the connection before responding$"):
                await client.request("GET", url + "/")
            assert len(connections) == 1
            assert client.open_connections == 0

    run(main())


def test_refused_connection(run: Runner[None]) -> None:
    port = free_port()

    async def main() -> None:
        async with FastClient(1, 5.0, {}) as client:
            for _ in range(2):  # the failed attempt gave its slot back
                with pytest.raises(ConnectError) as info:
                    await client.request("GET", f"http://127.0.0.1:{port}/")
                assert str(info.value) == f"cannot connect to 127.0.0.1:{port}: Connection refused"
                assert isinstance(info.value, ConnectionError)
            assert client.open_connections == 0

    run(main())


def test_timeout_closes_the_connection(run: Runner[None]) -> None:
    closed: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if await reader.read() == b"":  # never answer; wait for the client to hang up
            closed.append(n)

    async def main() -> None:
        async with raw_server(handler) as (url, _connections), FastClient(1, 0.2, {}) as client:
            start = time.perf_counter()
            with pytest.raises(RequestTimeout, match=r"^timeout after 0\.2s$") as info:
                await client.request("GET", url + "/")
            assert 0.19 <= time.perf_counter() - start < 1.0
            assert isinstance(info.value, TimeoutError)
            assert client.open_connections == 0
            await asyncio.sleep(0.05)
            assert closed == [0]

    run(main())


def test_timeout_counts_the_wait_for_a_connection(run: Runner[None]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        await reader.read()

    async def main() -> None:
        async with raw_server(handler) as (url, connections), FastClient(1, 0.2, {}) as client:
            start = time.perf_counter()
            first = asyncio.create_task(client.request("GET", url + "/"))
            await asyncio.sleep(0.1)
            with pytest.raises(RequestTimeout):  # queued behind the first, for its whole budget
                await client.request("GET", url + "/")
            assert 0.29 <= time.perf_counter() - start < 1.0
            with pytest.raises(RequestTimeout):
                await first
            assert len(connections) == 2  # the queued request got the slot freed by the timeout

    run(main())


@pytest.mark.parametrize("reset", [False, True])
def test_close_or_reset_mid_body(run: Runner[None], reset: bool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await asyncio.sleep(0.02)
        if reset:  # close with SO_LINGER 0: an RST instead of a FIN
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    async def main() -> None:
        async with raw_server(handler) as (url, _connections), FastClient(1, 5.0, {}) as client:
            with pytest.raises(ServerDisconnected) as info:
                await client.request("GET", url + "/")
            expected = "server closed the connection mid-response"
            if reset:
                expected += " (Connection reset by peer)"
            assert str(info.value) == expected
            assert client.open_connections == 0

    run(main())


def test_invalid_response(run: Runner[None]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with raw_server(handler) as (url, _connections), FastClient(1, 5.0, {}) as client:
            with pytest.raises(InvalidResponse, match=r"^invalid HTTP response from 127\.0\.0\.1:"):
                await client.request("GET", url + "/")
            assert client.open_connections == 0

    run(main())


def test_cancelled_requests_give_their_connection_and_place_back(run: Runner[None]) -> None:
    seen = Seen()

    async def main() -> None:
        async with aiohttp_server(seen) as url, FastClient(1, 5.0, {}) as client:
            in_flight = asyncio.create_task(client.request("GET", url + "/delay?s=0.05"))
            queued = asyncio.create_task(client.request("GET", url + "/"))
            await asyncio.sleep(0.01)
            in_flight.cancel()
            queued.cancel()
            await asyncio.gather(in_flight, queued, return_exceptions=True)
            response = await client.request("GET", url + "/")  # waits for the cancelled one's response
            assert response.body == b"hello"
            assert client.open_connections == 1

    run(main())
    assert len(seen.ports) == 1


def test_close_fails_waiting_requests_and_closes_connections(run: Runner[None]) -> None:
    seen = Seen()

    async def main() -> None:
        async with aiohttp_server(seen) as url:
            client = FastClient(1, 5.0, {})
            tasks = [asyncio.create_task(client.request("GET", url + "/delay?s=1")) for _ in range(3)]
            await asyncio.sleep(0.05)
            await client.close()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, ClientClosed) for r in results)
            assert client.open_connections == 0
            with pytest.raises(ClientClosed):
                await client.request("GET", url + "/")

    run(main())


# -- preparing requests -------------------------------------------------------------------------------


def test_prepare_encodes_the_whole_request_once(run: Runner[None]) -> None:
    async def main() -> None:
        async with FastClient(1, 1.0, {"User-Agent": "harness", "X-Common": "1"}) as client:
            prepared = client.prepare("post", "http://localhost:8080/a b?q=1&r=é", {"x-common": "2"}, b"hi")
            assert prepared.data == (
                b"POST /a%20b?q=1&r=%C3%A9 HTTP/1.1\r\n"
                b"User-Agent: harness\r\nx-common: 2\r\nHost: localhost:8080\r\n"
                b"Connection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"
            )
            assert (prepared.host, prepared.port, prepared.method) == ("localhost", 8080, "POST")
            assert client.prepare("GET", "http://127.0.0.1").data.startswith(
                b"GET / HTTP/1.1\r\nUser-Agent: harness\r\nX-Common: 1\r\nHost: 127.0.0.1\r\n"
            )
            with pytest.raises(ValueError, match="only http://"):
                client.prepare("GET", "https://127.0.0.1/")
            with pytest.raises(ValueError, match="invalid header value"):
                client.prepare("GET", "http://127.0.0.1/", {"X-A": "1\r\nX-B: 2"})
            with pytest.raises(ValueError, match="invalid method"):
                client.prepare("GE T", "http://127.0.0.1/")

    run(main())


def test_echo_target_round_trip(run: Runner[None], echo: str) -> None:
    async def main() -> None:
        async with FastClient(4, 5.0, {}) as client:
            post = client.prepare("POST", echo + "/echo", {"Content-Type": "application/json"}, b'{"q": 1}')
            responses = await asyncio.gather(*(client.send(post) for _ in range(50)))
            assert all(r.status == 200 and b'"q"' in r.body for r in responses)
            assert (await client.request("GET", echo + "/status/503")).status == 503
            assert isinstance(responses[0], Response)

    run(main())

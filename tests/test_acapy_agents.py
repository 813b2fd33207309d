"""Real ACA-Py 1.7.0 agents (mediator + multitenant, from .venv-acapy) driven through the admin client."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web

from harness.errors import UsageError
from simulators.acapy import agents as agents_mod
from simulators.acapy.admin import (
    FORWARDS,
    AdminClient,
    AdminError,
    MediationDeniedError,
    b58encode,
    fetch_status,
    handler_counts,
    raw_wallet_key,
)
from simulators.acapy.agents import (
    AcapyNotInstalledError,
    AcapyTargets,
    Agents,
    AgentStartError,
    invitation_url,
    launch_agents,
    mediator_invitation,
    parse_invitation_url,
)

pytestmark = pytest.mark.slow

API_KEY = "test-admin-key-0123456789"
MESSAGES = 20
TIMINGS: dict[str, Any] = {}
"""Measured latencies, printed at the end of the module (pytest -s)."""


def acapy_processes(pids: set[int] | None = None, under: Path | None = None) -> list[str]:
    """Live aca-py processes: of these pids, or every `aca-py start` working in a folder under `under`
    (not those of other tests, which may run at the same time under pytest-xdist)."""
    out = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(proc.info["cmdline"] or [])
            if (pids is not None and proc.pid in pids) or (
                under is not None
                and "aca-py" in cmd
                and "start" in cmd
                and Path(proc.cwd()).is_relative_to(under)
            ):
                out.append(f"{proc.pid} {cmd[:160]}")
        except psutil.Error:
            continue
    return out


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    """A mediator and a multitenant agent (one sub-wallet store), admin APIs behind an API key."""
    began = time.monotonic()
    launched = launch_agents(tmp_path_factory.mktemp("acapy"), admin_api_key=API_KEY)
    TIMINGS["launch both incl. priming (s)"] = round(time.monotonic() - began, 2)
    TIMINGS["priming (s)"] = round(launched.primed_in or 0, 2)
    TIMINGS["ready: mediator / multitenant (s)"] = (
        round(launched.mediator.started_in, 2) if launched.mediator else None,
        round(launched.multitenant.started_in, 2) if launched.multitenant else None,
    )
    with launched:
        yield launched
    print("\nACA-Py timings:", json.dumps(TIMINGS, indent=1))


class Hooks:
    """A loopback webhook listener: every POST kept as (topic, wallet id, body, arrival time)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, dict[str, Any], float]] = []
        self.changed = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        topic = request.match_info["topic"]
        self.events.append(
            (topic, request.headers.get("x-wallet-id"), await request.json(), time.monotonic())
        )
        self.changed.set()
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/topic/{topic}/", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def of(self, topic: str, wallet_id: str) -> list[dict[str, Any]]:
        return [body for t, w, body, _ in self.events if t == topic and w == wallet_id]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("webhooks did not arrive")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass


async def _timed(coro: Awaitable[Any]) -> tuple[Any, float]:
    began = time.monotonic()
    return await coro, time.monotonic() - began


async def _forwards(mediator: AdminClient, expect: int, settle: float = 0.3) -> int:
    """The mediator's forward count once it reached `expect` (or 10 s passed) and stayed for `settle` s."""
    deadline = time.monotonic() + 10
    while (count := handler_counts(await mediator.status()).get(FORWARDS, 0)) < expect:
        if time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.05)
    await asyncio.sleep(settle)  # a duplicate forward would show up here
    return handler_counts(await mediator.status()).get(FORWARDS, 0)


async def _settled_forwards(mediator: AdminClient, quiet: float = 0.6) -> int:
    """The mediator's forward count once it has not changed for `quiet` seconds (at most 10 s)."""
    deadline = time.monotonic() + 10
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = handler_counts(await mediator.status()).get(FORWARDS, 0)
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        await asyncio.sleep(0.1)
    return last


async def _connect_to_mediator(
    client: AdminClient, token: str, invitation: dict[str, Any]
) -> tuple[str, dict[str, Any], float, float]:
    """Connect a sub-wallet to the mediator and get mediation granted; (mediation id, grant, times)."""
    began = time.monotonic()
    oob = await client.receive_invitation(token, invitation, "mediator")
    await client.wait_connection_active(token, oob["connection_id"], timeout=20)
    connected = time.monotonic() - began
    began = time.monotonic()
    record = await client.request_mediation(token, oob["connection_id"])
    grant = await client.wait_mediation_granted(token, record["mediation_id"], timeout=20)
    granted = time.monotonic() - began
    await client.set_default_mediator(token, record["mediation_id"])
    return record["mediation_id"], grant, connected, granted


def test_full_flow_through_the_mediator(agents: Agents) -> None:
    """Two sub-wallets, mediation granted, alice↔bob via the mediator, basic messages once each, a ping."""
    med_agent, multi_agent = agents.mediator, agents.multitenant
    assert med_agent is not None and multi_agent is not None
    targets = agents.targets()
    assert targets.multitenant.api_key == API_KEY
    invitation = targets.mediator_invitation(alias="harness-test")  # read from the mediator, multi-use
    assert invitation["services"][0]["serviceEndpoint"] == med_agent.endpoint

    async def flow() -> None:
        hooks = Hooks()
        await hooks.start()
        client = AdminClient(multi_agent.admin_url, api_key=API_KEY, connections=16)
        mediator = AdminClient(med_agent.admin_url, api_key=API_KEY, connections=2)
        try:
            med_before = await mediator.status()
            assert med_before["conductor"]["task_failed"] == 0
            # priming (one grant, so concurrent first grants do not race) left one of each on the mediator
            assert await mediator.connections_by_state() == {"completed": 1, "invitation": 1}
            assert await mediator.mediation_by_state() == {"granted": 1}

            alice, t_raw = await _timed(
                client.create_wallet("alice", key_derivation="RAW", webhook_url=hooks.url)
            )
            bob, t_argon = await _timed(
                client.create_wallet("bob", key_derivation="ARGON2I_MOD", webhook_url=hooks.url)
            )
            carol, t_third = await _timed(client.create_wallet("carol", key_derivation="RAW"))
            TIMINGS["wallet create ms, shared store (created by priming): RAW / ARGON2I_MOD / RAW"] = [
                round(t * 1000) for t in (t_raw, t_argon, t_third)
            ]
            ta, tb = alice["token"], bob["token"]
            assert alice["wallet_id"] != bob["wallet_id"] and ta and tb and carol["token"]

            (ma, grant_a, conn_a, gr_a), (mb, _, conn_b, gr_b) = await asyncio.gather(
                _connect_to_mediator(client, ta, invitation), _connect_to_mediator(client, tb, invitation)
            )
            TIMINGS["mediator connection active ms (alice, bob)"] = [
                round(conn_a * 1000),
                round(conn_b * 1000),
            ]
            TIMINGS["mediation granted ms (alice, bob)"] = [round(gr_a * 1000), round(gr_b * 1000)]
            assert grant_a["state"] == "granted" and grant_a["routing_keys"]
            assert grant_a["endpoint"] == med_agent.endpoint
            assert (await client.connection_by_alias(ta, "mediator")) is not None

            # alice invites bob through her mediator; bob accepts through his
            began = time.monotonic()
            inv = await client.create_invitation(ta, "bob", ma)
            service = inv["invitation"]["services"][0]
            assert service["serviceEndpoint"] == med_agent.endpoint and service["routingKeys"]
            oob = await client.receive_invitation(tb, inv["invitation"], "alice", mb)
            bob_side = await client.wait_connection_active(tb, oob["connection_id"], timeout=20)
            alice_side = await client.wait_invitation_connection(ta, inv["invi_msg_id"], timeout=20)
            TIMINGS["alice<->bob connection active ms"] = round((time.monotonic() - began) * 1000)
            by_alias = await client.connection_by_alias(ta, "bob")
            assert by_alias is not None and by_alias["connection_id"] == alice_side["connection_id"]

            # basic messages alice -> bob arrive once each at bob's webhook, forwarded by the mediator
            sent: dict[str, float] = {}

            async def send(i: int) -> None:
                content = f"hello bob #{i}"
                sent[content] = time.monotonic()
                await client.send_message(ta, alice_side["connection_id"], content)

            forwards0 = await _settled_forwards(mediator)  # --auto-ping-connection pings come after "active"
            before = await mediator.status()
            began = time.monotonic()
            await asyncio.gather(*(send(i) for i in range(MESSAGES)))
            bob_id = bob["wallet_id"]
            await hooks.wait_for(lambda: len(hooks.of("basicmessages", bob_id)) >= MESSAGES)
            elapsed = time.monotonic() - began
            await asyncio.sleep(0.5)  # a duplicate would show up here
            got = Counter(b["content"] for b in hooks.of("basicmessages", bob_id))
            assert got == Counter(list(sent)), got
            assert all(
                b["connection_id"] == bob_side["connection_id"] for b in hooks.of("basicmessages", bob_id)
            )
            assert not hooks.of("basicmessages", alice["wallet_id"])
            arrival = {
                b["content"]: t for tp, w, b, t in hooks.events if tp == "basicmessages" and w == bob_id
            }
            lat = sorted((arrival[c] - sent[c]) * 1000 for c in sent)
            TIMINGS[f"basic message delivery ms ({MESSAGES} concurrent): p50 / max"] = [
                round(statistics.median(lat)),
                round(lat[-1]),
            ]
            TIMINGS["basic messages/s end to end"] = round(MESSAGES / elapsed, 1)

            # single message latency, nothing else in flight
            began = time.monotonic()
            await client.send_message(ta, alice_side["connection_id"], "solo")
            await hooks.wait_for(
                lambda: any(b["content"] == "solo" for b in hooks.of("basicmessages", bob_id))
            )
            TIMINGS["one basic message delivery ms"] = round((time.monotonic() - began) * 1000)

            # the mediator forwarded each message once: its ForwardHandler count (--timing) rose by exactly N
            forwarded = await _forwards(mediator, forwards0 + MESSAGES + 1) - forwards0
            TIMINGS[f"mediator forwards for {MESSAGES + 1} basic messages"] = forwarded
            assert MESSAGES + 1 <= forwarded <= MESSAGES + 3  # + a straggling auto-ping and its response
            after = await mediator.status()
            # conductor.task_done also rose, by the forwards plus one per admin request (the /status reads)
            assert after["conductor"]["task_done"] - before["conductor"]["task_done"] >= MESSAGES + 1
            bob_counts = handler_counts(await client.status())
            assert bob_counts.get("BasicMessageHandler.handle", 0) >= MESSAGES + 1

            thread_id = await client.send_ping(ta, alice_side["connection_id"], "alice pinging")
            assert thread_id
            # the ping to bob and bob's response to alice, both through the mediator
            assert await _forwards(mediator, forwards0 + forwarded + 2) - forwards0 - forwarded == 2
            assert (await mediator.status())["conductor"]["task_failed"] == 0
            assert (await fetch_status(med_agent.admin_url, API_KEY))["label"] == "Mediator"
            # the mediator's own records: two active client connections, two granted mediations
            assert (await mediator.connections_by_state()) == {"completed": 3, "invitation": 1}
            assert (await mediator.mediation_by_state()) == {"granted": 3}
            assert (await client.mediation_by_state(ta)) == {"granted": 1}
            assert (await client.connections_by_state(ta)) == {"completed": 2}

            # a denied mediation: bob asks alice (a sub-wallet without open mediation), alice denies
            asked = await client.request_mediation(tb, bob_side["connection_id"])
            for _ in range(100):
                server = await client.mediation_requests(ta, connection_id=alice_side["connection_id"])
                if server:
                    break
                await asyncio.sleep(0.1)
            assert server and server[0]["role"] == "server" and server[0]["state"] == "request"
            await client.deny_mediation(ta, server[0]["mediation_id"])
            with pytest.raises(MediationDeniedError, match="mediation denied"):
                await client.wait_mediation_granted(tb, asked["mediation_id"], timeout=10)
        finally:
            await client.close()
            await mediator.close()
            await hooks.close()

    asyncio.run(flow())


def test_admin_errors_are_one_line(agents: Agents) -> None:
    """Bad token, missing API key, unknown ids, a second mediation request, removed RFC 0160 routes."""
    med_agent, multi_agent = agents.mediator, agents.multitenant
    assert med_agent is not None and multi_agent is not None

    async def errors() -> None:
        async with AdminClient(multi_agent.admin_url, api_key=API_KEY) as client:
            wallet = await client.create_wallet("dave", key_derivation="RAW")
            token = wallet["token"]
            with pytest.raises(AdminError) as bad_token:
                await client.connections("not-a-jwt")
            assert bad_token.value.status == 401

            conn_id = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
            with pytest.raises(AdminError) as unknown:
                await client.send_message(token, conn_id, "hi")
            err = unknown.value
            assert err.status == 404 and err.path == f"/connections/{conn_id}/send-message"
            assert str(err).startswith("HTTP 404 POST /connections/{conn_id}/send-message: ")
            assert conn_id not in str(err) and "\n" not in str(err)

            with pytest.raises(AdminError) as legacy:
                await client.create_invitation(token, "x", protocol="connections")
            assert legacy.value.status in (404, 405)

            oob = await client.receive_invitation(
                token, mediator_invitation(med_agent.admin_url, API_KEY), "m"
            )
            await client.wait_connection_active(token, oob["connection_id"], timeout=20)
            first = await client.request_mediation(token, oob["connection_id"])
            await client.wait_mediation_granted(token, first["mediation_id"], timeout=20)
            with pytest.raises(AdminError) as again:
                await client.request_mediation(token, oob["connection_id"])
            assert again.value.status == 400 and "\n" not in str(again.value)

            with pytest.raises(ValueError, match="key_derivation"):
                await client.create_wallet("eve", key_derivation="ARGON2I_INT")  # type: ignore[arg-type]

        async with AdminClient(multi_agent.admin_url) as keyless:
            with pytest.raises(AdminError) as no_key:
                await keyless.status()
            assert no_key.value.status == 401

    asyncio.run(errors())
    with pytest.raises(AdminError) as exc:
        mediator_invitation(med_agent.admin_url)  # no API key
    assert exc.value.status == 401


def test_invitation_url_round_trip(agents: Agents) -> None:
    """The URL ACA-Py prints parses back to its invitation; ours too; garbage is a UsageError."""
    med_agent = agents.mediator
    assert med_agent is not None

    async def create() -> dict[str, Any]:
        async with AdminClient(med_agent.admin_url, api_key=API_KEY) as mediator:
            return await mediator.create_invitation(None, "url-test", multi_use=True)

    record = asyncio.run(create())
    assert parse_invitation_url(record["invitation_url"]) == record["invitation"]
    assert parse_invitation_url(invitation_url(record["invitation"])) == record["invitation"]
    legacy = invitation_url({"@type": "https://didcomm.org/connections/1.0/invitation", "label": "M"})
    assert parse_invitation_url(legacy.replace("?oob=", "?c_i="))["label"] == "M"
    for bad in ("http://x/?foo=1", "http://x/?oob=%%%", "http://x/?oob=" + invitation_url({"a": 1})[-8:]):
        with pytest.raises(UsageError):
            parse_invitation_url(bad)
    with pytest.raises(UsageError):
        parse_invitation_url(invitation_url({"label": "no type"}))


def test_external_targets(agents: Agents) -> None:
    """External agents: by admin URLs or an invitation URL; a JSON round trip; bad input is a UsageError."""
    med_agent, multi_agent = agents.mediator, agents.multitenant
    assert med_agent is not None and multi_agent is not None
    by_admin = AcapyTargets.external(
        multi_agent.admin_url + "/",
        multitenant_api_key=API_KEY,
        mediator_admin_url=med_agent.admin_url,
        mediator_api_key=API_KEY,
    )
    assert by_admin == agents.targets()
    assert AcapyTargets.from_dict(json.loads(json.dumps(by_admin.as_dict()))) == by_admin
    assert by_admin.multitenant.headers() == {"X-API-Key": API_KEY}
    invitation = by_admin.mediator_invitation(alias="ext")
    by_url = AcapyTargets.external(multi_agent.admin_url, mediator_invitation_url=invitation_url(invitation))
    assert by_url.mediator is None and by_url.mediator_invitation() == invitation
    with pytest.raises(UsageError, match="no mediator"):
        AcapyTargets.external(multi_agent.admin_url).mediator_invitation()
    with pytest.raises(UsageError, match="admin URL"):
        AcapyTargets.external("127.0.0.1:8031")
    with pytest.raises(UsageError, match="invitation URL"):
        AcapyTargets.external(multi_agent.admin_url, mediator_invitation_url="http://x/?oob=bm9wZQ")


def test_raw_key_is_askar_compatible() -> None:
    """32 bytes in base58 (44 or 43 characters); leading zero bytes become '1's."""
    assert b58encode(b"\0\0\x01") == "112"
    assert b58encode(bytes(32)) == "1" * 32
    keys = {raw_wallet_key() for _ in range(50)}
    assert len(keys) == 50 and all(42 <= len(k) <= 44 for k in keys)


def test_raw_keys_open_separate_stores(tmp_path: Path) -> None:
    """One askar store per sub-wallet: our base58 RAW key opens one, a malformed one is refused (400)."""

    async def create(admin_url: str) -> None:
        async with AdminClient(admin_url) as client:
            raw, t_raw = await _timed(client.create_wallet("raw", key_derivation="RAW"))
            argon, t_argon = await _timed(client.create_wallet("argon", key_derivation="ARGON2I_MOD"))
            assert raw["token"] and argon["token"] and raw["settings"]["wallet.type"] == "askar"
            assert await client.connections(raw["token"]) == []
            TIMINGS["separate stores: wallet create ms RAW / ARGON2I_MOD"] = [
                round(t_raw * 1000),
                round(t_argon * 1000),
            ]
            with pytest.raises(AdminError) as bad:
                await client.create_wallet("bad", key_derivation="RAW", wallet_key="0OIl-not-base58")
            assert bad.value.status == 400 and "\n" not in str(bad.value)

    with launch_agents(tmp_path, mediator=False, multitenancy_single_store=False) as launched:
        assert launched.multitenant is not None and launched.primed_in is None
        asyncio.run(create(launched.multitenant.admin_url))


def test_launch_stop_leaves_nothing(tmp_path: Path) -> None:
    """A default (insecure) mediator alone: context manager, idempotent stop, no processes or homes left."""
    with launch_agents(tmp_path, multitenant=False) as launched:
        assert launched.multitenant is None and launched.mediator is not None
        pids = {launched.mediator.pid}
        home = launched.mediator.home
        assert home.is_dir() and home.parent == tmp_path
        assert acapy_processes(pids)
        invitation = mediator_invitation(launched.mediator.admin_url)  # insecure mode: no key needed
        assert invitation["@type"].endswith("/invitation")
        with pytest.raises(UsageError, match="no multitenant agent"):
            launched.targets()
    assert launched.stopped and not acapy_processes(pids)
    assert not home.exists() and launched.mediator.log_path.exists()
    launched.stop()  # idempotent


def test_agent_that_dies_reports_its_log(tmp_path: Path) -> None:
    """An agent that exits at start: AgentStartError with the log tail; the other agent is stopped too."""
    with pytest.raises(AgentStartError) as exc:
        launch_agents(tmp_path, mediator_args=["--no-such-flag"], timeout=30)
    assert "mediator exited" in str(exc.value) and "no-such-flag" in str(exc.value)
    assert not acapy_processes(under=tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_missing_binary_names_the_install_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No aca-py: an error naming scripts/install-acapy, from an argument, the env or the default."""
    with pytest.raises(AcapyNotInstalledError, match="scripts/install-acapy"):
        launch_agents(tmp_path, binary=tmp_path / "aca-py")
    monkeypatch.setenv("HARNESS_ACAPY_BIN", str(tmp_path / "nope"))
    with pytest.raises(AcapyNotInstalledError, match="HARNESS_ACAPY_BIN"):
        launch_agents(tmp_path)
    monkeypatch.delenv("HARNESS_ACAPY_BIN")
    monkeypatch.setattr(agents_mod, "DEFAULT_BIN", tmp_path / "missing" / "aca-py")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AcapyNotInstalledError, match="scripts/install-acapy") as exc:
        launch_agents(tmp_path)
    assert isinstance(exc.value, UsageError) and not os.listdir(tmp_path)

"""`acapy-tenant`: tenants of a multitenant ACA-Py agent that get mediation and message each other.

The seed (`hyperledger/aries-mediator-service` multi-demo load test, `seed-systems.md` §5) stepped
Locust users up against a multitenant agent: each created a sub-wallet, connected to a mediator, paired
with another tenant and pinged both connections. This simulator runs the same load shape (the profile
`acapy-mediator`) with the journey the seed's README promised:

    groups:
      tenants:
        simulator: acapy-tenant
        shape: {type: steps, step_time: 30s, users_per_step: 10, max_users: 100, spawn_fraction: 0.5}
        think_time: {type: uniform, min: 2s, max: 5s}
        options:
          agents: {launch: true}            # or {multitenant_admin_url: ..., mediator_admin_url: ...}
          messages_per_iteration: 2

Each virtual user is one tenant. `start_user` is its journey, each step a request of kind `acapy` with
its latency: `wallet_create` (a managed askar sub-wallet whose webhooks come to this worker),
`mediator_connect` (accept the mediator's invitation, until the connection is active),
`mediation_grant` (request mediation, until granted; a denial fails with "mediation denied by the
mediator"), `default_mediator` (new connections route through it) and `pair_connect` (the inviter
creates an invitation through its mediator, the partner accepts it through its own, until both sides
are active). A failed step records its reason and leaves that tenant idle; the others go on.

Pairing is even/odd per worker, as in the seed: a tenant that finds no one waiting waits for the next
one (`pair_timeout`); if none appears it records a `pair_connect` failure "no partner appeared within
Ns" and carries on unpaired, pinging only the mediator. Each iteration then sends a trust ping to the
partner (`ping_rtt`, until the ping-response webhook; unpaired: `ping_mediator_rtt`) and
`messages_per_iteration` basic messages, each with a unique id in its content: `message_send` (the admin
call) and `message_delivery` (send → the partner's webhook receipt; "not delivered within Ns" after
`delivery_timeout`). Counters `messages_sent`, `messages_delivered`, `messages_duplicated` (a second
receipt of an id), `messages_late` (after the timeout), `tenants_ready`, `tenants_paired`,
`tenants_unpaired`, `tenants_failed`; worker 0 keeps the gauge `mediator_forwards` (the mediator's
`ForwardHandler` count, every 5 s); each tenant leaves a data point with its step latencies.

Agents: by default `prepare_run` launches a mediator (open mediation) and a multitenant agent (one askar
store for all sub-wallets, `--monitor-ping` for ping webhooks) from `.venv-acapy` on loopback ports, with
a random admin API key, and `finish_run` stops them. External agents are named by their admin URLs (and
API keys), the mediator by its admin URL or an invitation URL. Either way the mediator's invitation is
read by the harness, and the agents' own figures — the mediator's forward and handler counts, its
connection and mediation records by state, the multitenant agent's handler counts and wallets — are
stored as data points (`mediator`, `multitenant`) at the start and the end of the run.

Fixed from the seed: mediation is really requested, granted and used (the seed never asked for it);
the mediator's invitation is fetched, not copied by hand from a console into `MEDIATOR_INVITATION_URL`;
an even tenant without a partner (`fetch_previous` returning None) crashed the seed's user, here it is
a recorded failure; and delivery is measured end to end, with duplicates counted, instead of only the
admin call's latency. `protocol: connections` keeps the seed's RFC 0160 flow for older agents (ACA-Py
1.7.0 removed it); the default is out-of-band with didexchange/1.1.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import secrets
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.durations import Duration
from harness.errors import HarnessError, UsageError
from harness.simulator import Simulator, User
from simulators.acapy.admin import (
    FORWARDS,
    RFC23_STATES,
    AdminClient,
    AdminError,
    AgentStateError,
    handler_counts,
)
from simulators.acapy.agents import AcapyTargets, Agents, admin_call, launch_agents
from simulators.acapy.webhooks import WebhookListener, message_content, message_id

KIND = "acapy"
JOURNEY = ("wallet_create", "mediator_connect", "mediation_grant", "default_mediator", "pair_connect")
ITERATION_NAMES = ("ping_rtt", "ping_mediator_rtt", "message_send", "message_delivery")
MESSAGE_COUNTERS = ("messages_sent", "messages_delivered", "messages_duplicated", "messages_late")
_LAUNCHED: dict[str, Agents] = {}
"""Agents `prepare_run` launched, by `prepared["launch_key"]`, until `finish_run` stops them."""


@atexit.register
def _stop_launched() -> None:
    """Stop agents a controller launched but never finished (it crashed or was interrupted)."""
    for agents in list(_LAUNCHED.values()):
        agents.stop()
    _LAUNCHED.clear()


class AgentsOptions(BaseModel):
    """Where the agents come from: launched for the run (default) or external ones."""

    model_config = ConfigDict(extra="forbid")
    launch: bool | None = None
    """Launch a mediator and a multitenant agent from `.venv-acapy` (default unless an admin URL is given)."""
    single_store: bool = True
    """Launched: keep every sub-wallet as a profile of one askar store (fast wallet creation)."""
    log_level: str = "warning"
    """Launched: the agents' `--log-level`."""
    start_timeout: Duration = Field(default=90.0, gt=0)
    """Launched: how long the agents may take to get ready."""
    keep_logs: bool = False
    """Launched: keep the agents' log files (their folder is named in the `agents` data point)."""
    extra_args: list[str] = Field(default_factory=list)
    """Launched: more `aca-py start` flags for both agents."""
    multitenant_admin_url: str | None = None
    """External: the multitenant agent's admin URL."""
    multitenant_api_key: str | None = None
    """External: its admin API key (`X-API-Key`), if it has one."""
    mediator_admin_url: str | None = None
    """External: the mediator's admin URL (its invitation is created there, its figures read)."""
    mediator_api_key: str | None = None
    mediator_invitation_url: str | None = None
    """External: the mediator's invitation URL (`?oob=` or `?c_i=`), when its admin API is out of reach."""

    @model_validator(mode="after")
    def _one_source(self) -> AgentsOptions:
        external = self.multitenant_admin_url is not None
        if self.launch is None:
            self.launch = not external
        if self.launch and external:
            raise ValueError("launch: true with multitenant_admin_url: choose launched or external agents")
        if not self.launch:
            if not external:
                raise ValueError("external agents need multitenant_admin_url")
            if not (self.mediator_admin_url or self.mediator_invitation_url):
                raise ValueError("external agents need mediator_admin_url or mediator_invitation_url")
        return self


class TenantOptions(BaseModel):
    """Options of the `acapy-tenant` simulator."""

    model_config = ConfigDict(extra="forbid")
    agents: AgentsOptions = Field(default_factory=AgentsOptions)
    key_derivation: Literal["ARGON2I_MOD", "RAW"] = "ARGON2I_MOD"
    """Sub-wallet key derivation (the seed: a uuid4 key, ACA-Py's default ARGON2I_MOD)."""
    protocol: Literal["oob", "connections"] = "oob"
    """Tenant pairing: out-of-band didexchange/1.1, or RFC 0160 connections (the seed; older agents)."""
    pair: bool = True
    """Pair tenants and message the partner; off: every tenant only pings the mediator."""
    messages_per_iteration: int = Field(default=2, ge=0)
    """Basic messages to the partner per iteration."""
    message_size: int = Field(default=64, ge=16, le=65536)
    """Characters per basic message (its id, then padding)."""
    ping: bool = True
    """A trust ping per iteration (to the partner, else the mediator), timed until its response webhook."""
    pair_timeout: Duration = Field(default=60.0, gt=0)
    """How long a tenant waits for a partner before it goes on unpaired."""
    connect_timeout: Duration = Field(default=30.0, gt=0)
    """How long a connection (to the mediator, to the partner) may take to become active."""
    mediation_timeout: Duration = Field(default=30.0, gt=0)
    """How long a mediation request may take to be granted."""
    delivery_timeout: Duration = Field(default=10.0, gt=0)
    """How long a basic message or a ping response may take to arrive."""
    admin_timeout: Duration = Field(default=30.0, gt=0)
    """One admin call's time limit."""
    admin_connections: int = Field(default=100, ge=1)
    """The admin client's connection pool per worker."""
    remove_wallets: bool = False
    """Delete a tenant's sub-wallet when its user stops."""
    forwards_interval: Duration = Field(default=5.0, ge=0)
    """Worker 0 reads the mediator's forward count this often (gauge `mediator_forwards`); 0: never."""


class StepFailed(Exception):
    """A journey step that failed; its reason is already recorded."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass(eq=False)
class Tenant:
    """One tenant's sub-wallet, connections and partner."""

    label: str
    wallet_id: str = ""
    token: str = field(default="", repr=False)
    mediator_conn: str = ""
    mediation_id: str = ""
    partner: Tenant | None = None
    partner_conn: str = ""
    failed: str | None = None
    """The journey step that failed and why; the tenant then idles."""
    steps: dict[str, float] = field(default_factory=dict)
    """Step latencies in ms, for the tenant's data point."""


@dataclass(eq=False)
class _Waiting:
    """A tenant waiting for a partner; `result` gets None (paired) or the pairing's failure reason."""

    user: User
    tenant: Tenant
    result: asyncio.Future[str | None]
    claimed: bool = False


def describe(exc: BaseException, timeout: float | None = None) -> str:
    """A one-line reason for a failed step (admin errors, state errors, timeouts, transport errors)."""
    if isinstance(exc, (AdminError, AgentStateError)):
        return str(exc)
    if isinstance(exc, TimeoutError):
        text = str(exc)
        return text or (f"admin call timed out after {timeout:g}s" if timeout else "timed out")
    if isinstance(exc, aiohttp.ClientError):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _seconds(value: float) -> str:
    return f"{value:g}s"


# --- agent-side evidence (blocking; in the controller) ----------------------------------------------------


def _records_by_state(admin_url: str, api_key: str | None, path: str) -> dict[str, int]:
    """Records of the agent's base wallet by state (`/connections` paged, `/mediation/requests`)."""
    counts: dict[str, int] = {}
    offset, page = 0, 1000
    while True:
        params = {"limit": page, "offset": offset} if path == "/connections" else None
        answer = admin_call(admin_url, "GET", path, api_key=api_key, params=params)
        results = answer.get("results", []) if isinstance(answer, dict) else []
        for record in results:
            state = str(record.get("state"))
            state = RFC23_STATES.get(state, state) if path == "/connections" else state
            counts[state] = counts.get(state, 0) + 1
        if params is None or len(results) < page:
            return counts
        offset += page


def agent_evidence(targets: AcapyTargets) -> dict[str, dict[str, Any]]:
    """The agents' own figures: the mediator's forwards, handler counts and records; the multitenant
    agent's handler counts and wallets. A part that cannot be read holds its `error`."""
    out: dict[str, dict[str, Any]] = {}
    agents = [("multitenant", targets.multitenant)]
    if targets.mediator is not None:
        agents.insert(0, ("mediator", targets.mediator))
    for role, agent in agents:
        values: dict[str, Any] = {}
        try:
            status = admin_call(agent.admin_url, "GET", "/status", api_key=agent.api_key)
            counts = handler_counts(status)
            conductor = status.get("conductor") or {}
            values.update(
                {
                    "forwards": counts.get(FORWARDS, 0),
                    "basic_messages_received": counts.get("BasicMessageHandler.handle", 0),
                    "inbound_messages": counts.get("Dispatcher.handle_v1_message", 0),
                    "task_failed": conductor.get("task_failed"),
                    "handler_counts": counts,
                }
            )
            if role == "mediator":
                values["connections"] = _records_by_state(agent.admin_url, agent.api_key, "/connections")
                values["mediations"] = _records_by_state(
                    agent.admin_url, agent.api_key, "/mediation/requests"
                )
            else:
                wallets = admin_call(agent.admin_url, "GET", "/multitenancy/wallets", api_key=agent.api_key)
                values["wallets"] = len(wallets.get("results", [])) if isinstance(wallets, dict) else None
        except (AdminError, OSError, ValueError) as exc:
            values["error"] = str(exc)
        out[role] = values
    return out


def _evidence_points(start: dict[str, Any], end: dict[str, Any], t_start: float) -> list[dict[str, Any]]:
    """Data points for both moments, the end ones with the rise of the main figures since the start."""
    points: list[dict[str, Any]] = []
    for role, values in start.items():
        points.append({"t": t_start, "entity": role, "values": {"at": "start", **values}})
    now = time.time()
    for role, values in end.items():
        before = start.get(role, {})
        rise = {
            f"{key}_delta": values[key] - before[key]
            for key in ("forwards", "basic_messages_received", "inbound_messages")
            if isinstance(values.get(key), int) and isinstance(before.get(key), int)
        }
        points.append({"t": now, "entity": role, "values": {"at": "end", **values, **rise}})
    return points


class TenantSimulator(Simulator):
    """Tenants of a multitenant ACA-Py agent: sub-wallet, mediation, a partner, pings and messages."""

    name = "acapy-tenant"
    description = "ACA-Py tenants: sub-wallets with mediation, pairs of tenants pinging and messaging"
    Options = TenantOptions
    threads: ClassVar[int] = 4

    # --- the run (controller) --------------------------------------------------------------------------

    @classmethod
    def prepare_run(
        cls, options: TenantOptions, targets: dict[str, str], run_id: str, log: logging.Logger
    ) -> dict[str, Any]:
        """Launch the agents (or check the external ones), read the mediator's invitation and the agents'
        figures at the start: what every worker gets as `ctx.prepared`."""
        opts = options.agents
        agents: Agents | None = None
        launch_key: str | None = None
        work_dir: Path | None = None
        try:
            if opts.launch:
                work_dir = Path(tempfile.mkdtemp(prefix=f"harness-acapy-{run_id}-"))
                began = time.monotonic()
                try:
                    agents = launch_agents(
                        work_dir,
                        multitenancy_single_store=opts.single_store,
                        admin_api_key=secrets.token_urlsafe(24),
                        log_level=opts.log_level,
                        extra_args=opts.extra_args,
                        multitenant_args=("--monitor-ping",),
                        timeout=opts.start_timeout,
                    )
                except HarnessError as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise UsageError(f"acapy-tenant: launching ACA-Py failed: {first}") from None
                launch_key = f"{run_id}:{secrets.token_hex(4)}"
                _LAUNCHED[launch_key] = agents
                log.info("ACA-Py agents ready in %.1fs: %r", time.monotonic() - began, agents)
                acapy = agents.targets()
            else:
                assert opts.multitenant_admin_url is not None
                acapy = AcapyTargets.external(
                    opts.multitenant_admin_url,
                    multitenant_api_key=opts.multitenant_api_key,
                    mediator_admin_url=opts.mediator_admin_url,
                    mediator_api_key=opts.mediator_api_key,
                    mediator_invitation_url=opts.mediator_invitation_url,
                )
                try:
                    admin_call(
                        acapy.multitenant.admin_url, "GET", "/status", api_key=acapy.multitenant.api_key
                    )
                except AdminError as exc:
                    raise UsageError(f"acapy-tenant: the multitenant agent: {exc}") from None
            invitation = cls._mediator_invitation(acapy, options, run_id)
            started_at = time.time()
            start = agent_evidence(acapy)
        except BaseException:
            if launch_key is not None:
                _LAUNCHED.pop(launch_key, None)
            if agents is not None:
                agents.stop()
            if work_dir is not None:
                shutil.rmtree(work_dir, ignore_errors=True)
            raise
        kind = str(invitation.get("@type", ""))
        return {
            "targets": acapy.as_dict(),
            "invitation": invitation,
            "mediator_protocol": "oob" if "out-of-band" in kind or "out_of_band" in kind else "connections",
            "launch_key": launch_key,
            "work_dir": str(work_dir) if work_dir else None,
            "keep_logs": opts.keep_logs,
            "started_at": started_at,
            "start": start,
        }

    @classmethod
    def _mediator_invitation(cls, acapy: AcapyTargets, options: TenantOptions, run_id: str) -> dict[str, Any]:
        """The mediator's multi-use invitation: given as a URL, or created on its admin API."""
        alias = f"harness-{run_id}"
        try:
            if options.protocol == "connections" and not acapy.mediator_invitation_url and acapy.mediator:
                record = admin_call(
                    acapy.mediator.admin_url,
                    "POST",
                    "/connections/create-invitation",
                    api_key=acapy.mediator.api_key,
                    params={"alias": alias, "auto_accept": True, "multi_use": True},
                    body={},
                )
                invitation: dict[str, Any] = record["invitation"]
                return invitation
            return acapy.mediator_invitation(alias=alias, multi_use=True)
        except AdminError as exc:
            raise UsageError(f"acapy-tenant: the mediator's invitation: {exc}") from None

    @classmethod
    def finish_run(cls, prepared: Any, run_id: str, log: logging.Logger) -> list[dict[str, Any]]:
        """The agents' figures at the start and now (data points `mediator`, `multitenant`), then stop
        the agents `prepare_run` launched."""
        if not prepared:
            return []
        points: list[dict[str, Any]] = []
        key = prepared.get("launch_key")
        agents = _LAUNCHED.pop(key, None) if key else None
        try:
            acapy = AcapyTargets.from_dict(prepared["targets"])
            end = agent_evidence(acapy)
            points = _evidence_points(
                prepared.get("start") or {}, end, prepared.get("started_at", time.time())
            )
            ends = {p["entity"]: p["values"] for p in points if p["values"].get("at") == "end"}
            log.info(
                "ACA-Py evidence: mediator forwards +%s, mediations %s; multitenant basic messages +%s",
                ends.get("mediator", {}).get("forwards_delta", "?"),
                ends.get("mediator", {}).get("mediations", "?"),
                ends.get("multitenant", {}).get("basic_messages_received_delta", "?"),
            )
        finally:
            if agents is not None:
                began = time.monotonic()
                agents.stop()
                work_dir = prepared.get("work_dir")
                points.append(
                    {
                        "entity": "agents",
                        "values": {
                            "launched": True,
                            "stopped_in_s": round(time.monotonic() - began, 3),
                            "logs": work_dir if prepared.get("keep_logs") else None,
                        },
                    }
                )
                if work_dir and not prepared.get("keep_logs"):
                    shutil.rmtree(work_dir, ignore_errors=True)
        return points

    @classmethod
    def summary_tables(
        cls, group: str, endpoints: list[dict[str, Any]], counters: dict[str, float]
    ) -> list[dict[str, Any]]:
        """The journey (per step: ok, failed, p50, p95) and the messages sent, delivered and duplicated."""
        by_name = {e["name"]: e for e in endpoints}
        rows = []
        for name in (*JOURNEY, *ITERATION_NAMES):
            e = by_name.get(name)
            if e is None:
                continue
            requests, failures = int(e["requests"]), int(e["failures"])
            rows.append(
                [
                    name,
                    requests - failures,
                    failures,
                    float(e.get("p50_ms") or 0),
                    float(e.get("p95_ms") or 0),
                ]
            )
        if not rows:
            return []
        tables = [
            {
                "title": "ACA-Py tenant journey",
                "columns": ["step", "ok", "failed", "p50 ms", "p95 ms"],
                "rows": rows,
            }
        ]
        sent, delivered, duplicated, late = (int(counters.get(c, 0)) for c in MESSAGE_COUNTERS)
        if sent or delivered:
            exact = sent == delivered and not duplicated
            tables.append(
                {
                    "title": "ACA-Py messages",
                    "columns": ["sent", "delivered", "duplicated", "late"],
                    "rows": [[sent, delivered, duplicated, late]],
                    "note": "every message delivered exactly once"
                    if exact
                    else f"{sent - delivered} not delivered in time, {duplicated} duplicated",
                }
            )
        return tables

    # --- the worker --------------------------------------------------------------------------------------

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.options: TenantOptions = ctx.options
        self.client: AdminClient | None = None
        self.hooks = WebhookListener()
        self.targets: AcapyTargets | None = None
        self.invitation: dict[str, Any] = {}
        self.mediator_protocol: Literal["oob", "connections"] = "oob"
        self._waiting: deque[_Waiting] = deque()
        self._poller: asyncio.Task[None] | None = None

    async def setup(self) -> None:
        prepared = self.ctx.prepared
        if not prepared:
            raise UsageError("acapy-tenant: no agents were prepared for this group")
        self.targets = AcapyTargets.from_dict(prepared["targets"])
        self.invitation = prepared["invitation"]
        self.mediator_protocol = prepared.get("mediator_protocol", "oob")
        self.client = AdminClient(
            self.targets.multitenant.admin_url,
            api_key=self.targets.multitenant.api_key,
            connections=self.options.admin_connections,
            timeout=self.options.admin_timeout,
        )
        await self.hooks.start()
        self.hooks.on_duplicate = lambda _: self.metrics.counter("messages_duplicated")
        self.hooks.on_late = lambda _: self.metrics.counter("messages_late")
        for name in MESSAGE_COUNTERS:  # so a zero is stored, and visible
            self.metrics.counter(name, 0)
        mediator = self.targets.mediator
        if self.ctx.worker_index == 0 and mediator is not None and self.options.forwards_interval > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forwards())

    async def teardown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except (asyncio.CancelledError, Exception):
                pass
        if self.client is not None:
            await self.client.close()
        await self.hooks.close()

    async def _poll_forwards(self) -> None:
        """Gauge `mediator_forwards`: the mediator's ForwardHandler count, every `forwards_interval`."""
        assert self.targets is not None and self.targets.mediator is not None
        mediator = self.targets.mediator
        warned = False
        async with AdminClient(mediator.admin_url, api_key=mediator.api_key, connections=1, timeout=5) as c:
            while True:
                try:
                    self.metrics.gauge("mediator_forwards", handler_counts(await c.status()).get(FORWARDS, 0))
                except (AdminError, aiohttp.ClientError, TimeoutError) as exc:
                    if not warned:
                        warned = True
                        self.log.warning("reading the mediator's /status failed: %s", describe(exc))
                await asyncio.sleep(self.options.forwards_interval)

    async def _step(self, tenant: Tenant, name: str, call: Any) -> Any:
        """Await one journey step, recorded as request `name`; StepFailed (recorded) if it fails."""
        began = time.perf_counter()
        try:
            result = await call
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = describe(exc, self.options.admin_timeout)
            elapsed = time.perf_counter() - began
            self.metrics.request(name, elapsed, kind=KIND, ok=False, error=reason)
            tenant.steps[name] = round(elapsed * 1000, 1)
            raise StepFailed(name, reason) from None
        elapsed = time.perf_counter() - began
        self.metrics.request(name, elapsed, kind=KIND)
        tenant.steps[name] = round(elapsed * 1000, 1)
        return result

    async def start_user(self, user: User) -> None:
        assert self.client is not None
        opts = self.options
        client = self.client
        tenant = Tenant(label=f"tenant-{self.ctx.worker_index}-{user.id}")
        user.data = {"tenant": tenant}
        try:
            wallet = await self._step(
                tenant,
                "wallet_create",
                client.create_wallet(
                    tenant.label, key_derivation=opts.key_derivation, webhook_url=self.hooks.url
                ),
            )
            tenant.wallet_id, tenant.token = wallet["wallet_id"], wallet["token"]
            tenant.mediator_conn = await self._step(
                tenant, "mediator_connect", self._connect_mediator(tenant)
            )
            record = await self._step(tenant, "mediation_grant", self._mediation(tenant))
            tenant.mediation_id = record["mediation_id"]
            await self._step(
                tenant, "default_mediator", client.set_default_mediator(tenant.token, tenant.mediation_id)
            )
        except StepFailed as exc:
            tenant.failed = str(exc)
            self.metrics.counter("tenants_failed")
            self._tenant_point(tenant)
            return
        self.metrics.counter("tenants_ready")
        if opts.pair:
            await self._pair(user, tenant)
        self._tenant_point(tenant)

    def _tenant_point(self, tenant: Tenant) -> None:
        self.metrics.datapoint(
            tenant.label,
            {
                "wallet_id": tenant.wallet_id,
                "steps_ms": tenant.steps,
                "partner": tenant.partner.label if tenant.partner else None,
                "failed": tenant.failed,
            },
        )

    async def _connect_mediator(self, tenant: Tenant) -> str:
        """Accept the mediator's invitation; the connection id once it is active."""
        assert self.client is not None
        record = await self.client.receive_invitation(
            tenant.token, self.invitation, "mediator", protocol=self.mediator_protocol
        )
        conn_id = str(record["connection_id"])
        await self.client.wait_connection_active(tenant.token, conn_id, timeout=self.options.connect_timeout)
        return conn_id

    async def _mediation(self, tenant: Tenant) -> dict[str, Any]:
        """Request mediation on the mediator connection; the record once granted."""
        assert self.client is not None
        record = await self.client.request_mediation(tenant.token, tenant.mediator_conn)
        return await self.client.wait_mediation_granted(
            tenant.token, record["mediation_id"], timeout=self.options.mediation_timeout
        )

    # --- pairing -----------------------------------------------------------------------------------------

    async def _pair(self, user: User, tenant: Tenant) -> None:
        """Pair with the tenant waiting in this worker, or wait `pair_timeout` for the next one."""
        while self._waiting:
            waiting = self._waiting.popleft()
            if waiting.user.stopping or waiting.result.done():
                continue
            waiting.claimed = True
            reason = await self._connect_pair(waiting.tenant, tenant)
            if not waiting.result.done():
                waiting.result.set_result(reason)
            return
        loop = asyncio.get_running_loop()
        waiting = _Waiting(user, tenant, loop.create_future())
        self._waiting.append(waiting)
        began = time.perf_counter()
        deadline = time.monotonic() + self.options.pair_timeout
        while not waiting.result.done():
            if waiting.claimed:
                await waiting.result  # the partner drives the pairing, bounded by its own timeouts
                break
            if user.stopping:  # the run (or a scale-down) ended this tenant: not a failure
                self._unqueue(waiting)
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self._unqueue(waiting)
                reason = f"no partner appeared within {_seconds(self.options.pair_timeout)}"
                self.metrics.request(
                    "pair_connect", time.perf_counter() - began, kind=KIND, ok=False, error=reason
                )
                self.metrics.counter("tenants_unpaired")
                tenant.steps["pair_wait"] = round((time.perf_counter() - began) * 1000, 1)
                return
            await asyncio.wait({waiting.result}, timeout=min(left, 0.5))
        tenant.steps["pair_wait"] = round((time.perf_counter() - began) * 1000, 1)

    def _unqueue(self, waiting: _Waiting) -> None:
        try:
            self._waiting.remove(waiting)
        except ValueError:
            pass
        if not waiting.result.done():
            waiting.result.cancel()

    async def _connect_pair(self, inviter: Tenant, invitee: Tenant) -> str | None:
        """Connect two tenants, each through its mediator (`pair_connect`); None, or the failure reason."""
        assert self.client is not None
        client, opts = self.client, self.options
        began = time.perf_counter()
        try:
            invitation = await client.create_invitation(
                inviter.token,
                invitee.label,
                inviter.mediation_id,
                my_label=inviter.label,
                protocol=opts.protocol,
            )
            received = await client.receive_invitation(
                invitee.token,
                invitation["invitation"],
                inviter.label,
                invitee.mediation_id,
                protocol=opts.protocol,
            )
            invitee_side = await client.wait_connection_active(
                invitee.token, str(received["connection_id"]), timeout=opts.connect_timeout
            )
            if opts.protocol == "oob":
                inviter_side = await client.wait_invitation_connection(
                    inviter.token, invitation["invi_msg_id"], timeout=opts.connect_timeout
                )
            else:
                inviter_side = await client.wait_connection_active(
                    inviter.token, str(invitation["connection_id"]), timeout=opts.connect_timeout
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = describe(exc, opts.admin_timeout)
            elapsed = time.perf_counter() - began
            self.metrics.request("pair_connect", elapsed, kind=KIND, ok=False, error=reason)
            self.metrics.counter("tenants_unpaired", 2)
            return reason
        elapsed = time.perf_counter() - began
        self.metrics.request("pair_connect", elapsed, kind=KIND)
        self.metrics.counter("tenants_paired", 2)
        inviter.partner, inviter.partner_conn = invitee, str(inviter_side["connection_id"])
        invitee.partner, invitee.partner_conn = inviter, str(invitee_side["connection_id"])
        inviter.steps["pair_connect"] = invitee.steps["pair_connect"] = round(elapsed * 1000, 1)
        return None

    # --- iterations --------------------------------------------------------------------------------------

    async def iteration(self, user: User) -> None:
        tenant: Tenant | None = (user.data or {}).get("tenant")
        if tenant is None or tenant.failed or not tenant.mediator_conn:
            return  # a tenant whose journey failed idles; its reason is recorded
        partner = tenant.partner
        if self.options.ping:
            if partner is not None:
                await self._ping(tenant, tenant.partner_conn, "ping_rtt")
            else:
                await self._ping(tenant, tenant.mediator_conn, "ping_mediator_rtt")
        if partner is not None and self.options.messages_per_iteration:
            await asyncio.gather(
                *(self._message(tenant, partner) for _ in range(self.options.messages_per_iteration))
            )

    async def _ping(self, tenant: Tenant, conn_id: str, name: str) -> None:
        """A trust ping, timed until the response webhook (`name`)."""
        assert self.client is not None
        began = time.monotonic()
        try:
            thread_id = await self.client.send_ping(tenant.token, conn_id, f"{tenant.label} pinging")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = describe(exc, self.options.admin_timeout)
            self.metrics.request(name, time.monotonic() - began, kind=KIND, ok=False, error=reason)
            return
        response = self.hooks.expect_ping(thread_id)
        try:
            arrived = await asyncio.wait_for(response, self.options.delivery_timeout)
        except TimeoutError:
            self.hooks.forget_ping(thread_id)
            reason = (
                f"no ping response within {_seconds(self.options.delivery_timeout)} "
                "(the multitenant agent needs --monitor-ping)"
            )
            self.metrics.request(name, time.monotonic() - began, kind=KIND, ok=False, error=reason)
            return
        self.metrics.request(name, arrived - began, kind=KIND)

    async def _message(self, tenant: Tenant, partner: Tenant) -> None:
        """One basic message to the partner: `message_send`, then `message_delivery` until its webhook."""
        assert self.client is not None
        msg_id = message_id(tenant.label)
        arrival = self.hooks.expect_message(msg_id, partner.wallet_id)
        began = time.monotonic()
        try:
            await self.client.send_message(
                tenant.token, tenant.partner_conn, message_content(msg_id, self.options.message_size)
            )
        except asyncio.CancelledError:
            self.hooks.forget_message(msg_id, late=False)
            raise
        except Exception as exc:
            self.hooks.forget_message(msg_id, late=False)
            reason = describe(exc, self.options.admin_timeout)
            self.metrics.request("message_send", time.monotonic() - began, kind=KIND, ok=False, error=reason)
            return
        self.metrics.request("message_send", time.monotonic() - began, kind=KIND)
        self.metrics.counter("messages_sent")
        try:
            arrived = await asyncio.wait_for(arrival, self.options.delivery_timeout)
        except TimeoutError:
            self.hooks.forget_message(msg_id)
            reason = f"not delivered within {_seconds(self.options.delivery_timeout)}"
            self.metrics.request(
                "message_delivery", time.monotonic() - began, kind=KIND, ok=False, error=reason
            )
            return
        except RuntimeError as exc:  # delivered to another wallet
            self.metrics.request(
                "message_delivery", time.monotonic() - began, kind=KIND, ok=False, error=str(exc)
            )
            return
        self.metrics.request("message_delivery", arrived - began, kind=KIND)
        self.metrics.counter("messages_delivered")

    async def stop_user(self, user: User) -> None:
        tenant: Tenant | None = (user.data or {}).get("tenant")
        if tenant is None:
            return
        for waiting in list(self._waiting):
            if waiting.tenant is tenant:
                self._unqueue(waiting)
        if self.options.remove_wallets and tenant.wallet_id and self.client is not None:
            partner = tenant.partner
            if partner is not None and partner.partner is tenant:
                partner.partner, partner.partner_conn = None, ""  # it pings the mediator from now on
            try:
                await self.client.remove_wallet(tenant.wallet_id)
            except (AdminError, aiohttp.ClientError, TimeoutError) as exc:
                self.log.debug("removing %s failed: %s", tenant.label, describe(exc))

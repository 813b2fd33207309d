"""The `acapy-tenant` simulator against real ACA-Py 1.7.0 agents (.venv-acapy), through the CLI."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from harness.simulator import load_simulator
from simulators.acapy.agents import admin_call, invitation_url, launch_agents
from simulators.acapy.tenant import TenantOptions, TenantSimulator
from simulators.acapy.webhooks import WebhookListener, message_content, message_id
from tests.test_run import rows, start

pytestmark = pytest.mark.slow

SCALED = (
    "--duration",
    "1m",
    "--set",
    "groups.tenants.shape.users_per_step=4",
    "--set",
    "groups.tenants.shape.step_time=10s",
    "--set",
    "groups.tenants.shape.max_users=12",
)
JOURNEY = ("wallet_create", "mediator_connect", "mediation_grant", "default_mediator", "pair_connect")
DENIED = "tenant-0-1"
"""The tenant the failure-isolation test's mediator denies."""


def acapy_pids(run_id: str) -> set[int]:
    """Live `aca-py start` processes that the run `run_id` launched: they work in its folder
    harness-acapy-<run id>-* (agents of other tests, which may run at the same time under pytest-xdist,
    are not this run's)."""
    out = set()
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if (
                proc.info["status"] != psutil.STATUS_ZOMBIE
                and "aca-py" in cmd
                and " start " in cmd
                and f"/harness-acapy-{run_id}-" in proc.cwd()
            ):
                out.add(proc.pid)
        except psutil.Error:
            continue
    return out


def endpoints(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in summary["endpoints"] if e["group"] == "tenants"}


def errors(summary: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in summary["errors"]:
        out.setdefault(e["name"], []).append(e["message"])
    return out


def points(db: Path, entity: str) -> list[dict[str, Any]]:
    return [
        json.loads(v)
        for (v,) in rows(db, "SELECT values_json FROM datapoint WHERE entity=? ORDER BY t", entity)
    ]


@pytest.fixture(scope="module")
def acceptance(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Any, dict[str, Any], Path, set[int]]]:
    """The built-in profile scaled to a minute and a dozen tenants, run once through the CLI."""
    proc, summary, db = start(tmp_path_factory.mktemp("acceptance"), "acapy-mediator", *SCALED, timeout=170)
    leftover = acapy_pids(summary["run_id"]) if summary else set()
    yield proc, summary, db, leftover


def test_acceptance_run_launches_agents_and_measures_the_journey(
    acceptance: tuple[Any, dict[str, Any], Path, set[int]],
) -> None:
    """Exit 0; every step with latencies and no failures; the mediator forwarded; no agent left."""
    proc, summary, db, leftover = acceptance
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_name = endpoints(summary)
    for name in (*JOURNEY, "ping_rtt", "message_send", "message_delivery"):
        assert by_name[name]["requests"] > 0 and by_name[name]["failures"] == 0, (name, by_name.get(name))
        assert 0 < by_name[name]["p50_ms"] <= by_name[name]["p95_ms"], by_name[name]
    assert by_name["wallet_create"]["requests"] == 12 and by_name["mediation_grant"]["requests"] == 12
    assert by_name["pair_connect"]["requests"] == 6
    assert summary["thresholds"] and all(t["ok"] for t in summary["thresholds"]), summary["thresholds"]
    titles = [t["title"] for t in summary["tables"]]
    assert "ACA-Py tenant journey" in titles and "ACA-Py messages" in titles

    delivered = summary["counters"]["tenants"]["messages_delivered"]
    mediator = {p["at"]: p for p in points(db, "mediator")}
    multitenant = {p["at"]: p for p in points(db, "multitenant")}
    # every basic message and every ping (and its response) to a partner passed through the mediator
    assert mediator["end"]["forwards"] - mediator["start"]["forwards"] >= delivered
    assert mediator["end"]["forwards_delta"] >= delivered + 2 * by_name["ping_rtt"]["requests"]
    assert mediator["end"]["mediations"].get("granted", 0) - mediator["start"]["mediations"]["granted"] == 12
    assert mediator["end"]["connections"].get("completed", 0) >= 12
    assert multitenant["end"]["basic_messages_received_delta"] == delivered
    assert multitenant["end"]["wallets"] == 12
    gauges = rows(db, "SELECT MAX(value) FROM metric WHERE type='gauge' AND name='mediator_forwards'")
    assert gauges[0][0] and gauges[0][0] > 0
    tenants = [
        json.loads(v) for (v,) in rows(db, "SELECT values_json FROM datapoint WHERE entity LIKE 'tenant-%'")
    ]
    assert len(tenants) == 12 and all(t["partner"] and not t["failed"] for t in tenants)
    assert points(db, "agents")[0]["launched"] is True
    assert not leftover, f"aca-py processes left after the run: {leftover}"


def test_every_message_is_delivered_exactly_once(
    acceptance: tuple[Any, dict[str, Any], Path, set[int]],
) -> None:
    """messages_sent == messages_delivered, none duplicated or late; the receivers' agent agrees."""
    _, summary, db, _ = acceptance
    counters = summary["counters"]["tenants"]
    assert counters["messages_sent"] > 0
    assert counters["messages_sent"] == counters["messages_delivered"]
    assert counters["messages_duplicated"] == 0 and counters["messages_late"] == 0
    assert endpoints(summary)["message_delivery"]["requests"] == counters["messages_sent"]
    table = next(t for t in summary["tables"] if t["title"] == "ACA-Py messages")
    assert table["rows"] == [[counters["messages_sent"], counters["messages_sent"], 0, 0]]
    assert table["note"] == "every message delivered exactly once"
    receivers = next(p for p in points(db, "multitenant") if p["at"] == "end")
    assert receivers["basic_messages_received_delta"] == counters["messages_sent"]  # once each, agent-side


class Moderator(threading.Thread):
    """A mediator's operator: grants every mediation request, one at a time, except DENIED's."""

    def __init__(self, admin_url: str, api_key: str) -> None:
        super().__init__(daemon=True)
        self.admin_url, self.api_key = admin_url, api_key
        self.stopping = threading.Event()
        self.decided: dict[str, str] = {}

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                pending = admin_call(
                    self.admin_url,
                    "GET",
                    "/mediation/requests",
                    api_key=self.api_key,
                    params={"state": "request"},
                )["results"]
                for record in pending:
                    conn = admin_call(
                        self.admin_url, "GET", f"/connections/{record['connection_id']}", api_key=self.api_key
                    )
                    label = str(conn.get("their_label"))
                    action = "deny" if label == DENIED else "grant"
                    admin_call(
                        self.admin_url,
                        "POST",
                        f"/mediation/requests/{record['mediation_id']}/{action}",
                        api_key=self.api_key,
                        body={},
                    )
                    self.decided[label] = action
            except Exception:  # the agent is stopping, or a record changed under us
                pass
            self.stopping.wait(0.1)


def test_denied_mediation_and_missing_partner_fail_one_tenant_each(tmp_path: Path) -> None:
    """External agents whose mediator denies one tenant, and an odd number of the rest: two clear failures,
    the other two tenants pair and deliver."""
    key = "isolation-test-key-0123456789"
    with launch_agents(
        tmp_path / "agents",
        admin_api_key=key,
        open_mediation=False,
        prime=False,
        multitenant_args=["--monitor-ping"],
    ) as agents:
        assert agents.mediator is not None and agents.multitenant is not None
        moderator = Moderator(agents.mediator.admin_url, key)
        moderator.start()
        profile = {
            "name": "acapy-isolation",
            "duration": "18s",
            "stop_grace": "10s",
            "groups": {
                "tenants": {
                    "simulator": "simulators.acapy.tenant:TenantSimulator",
                    "users": 4,
                    "spawn_rate": 4,
                    "think_time": {"type": "uniform", "min": "1s", "max": "2s"},
                    "options": {
                        "agents": {
                            "multitenant_admin_url": agents.multitenant.admin_url,
                            "multitenant_api_key": key,
                            "mediator_admin_url": agents.mediator.admin_url,
                            "mediator_api_key": key,
                        },
                        "pair_timeout": "5s",
                        "messages_per_iteration": 2,
                    },
                }
            },
        }
        try:
            proc, summary, db = start(tmp_path, profile, timeout=90)
        finally:
            moderator.stopping.set()
            moderator.join(5)
        pids = {a.pid for a in agents.running}
        assert all(psutil.pid_exists(p) for p in pids)  # external agents are not the harness's to stop
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert moderator.decided.get(DENIED) == "deny" and list(moderator.decided.values()).count("grant") == 3
    by_name, errs = endpoints(summary), errors(summary)
    assert by_name["wallet_create"]["requests"] == 4 and by_name["wallet_create"]["failures"] == 0
    assert by_name["mediation_grant"]["failures"] == 1
    assert errs["mediation_grant"] == ["mediation denied by the mediator"]
    assert "default_mediator" in by_name and by_name["default_mediator"]["requests"] == 3
    assert by_name["pair_connect"]["requests"] == 2 and by_name["pair_connect"]["failures"] == 1
    assert errs["pair_connect"] == ["no partner appeared within 5s"]
    assert by_name["message_delivery"]["requests"] > 0 and by_name["message_delivery"]["failures"] == 0
    assert by_name["ping_mediator_rtt"]["requests"] > 0 and by_name["ping_mediator_rtt"]["failures"] == 0
    counters = summary["counters"]["tenants"]
    assert counters["tenants_failed"] == 1 and counters["tenants_unpaired"] == 1
    assert counters["tenants_paired"] == 2
    assert counters["messages_sent"] == counters["messages_delivered"] > 0
    denied = points(db, DENIED)
    assert denied and denied[0]["failed"] == "mediation_grant: mediation denied by the mediator"
    assert "(iteration)" not in by_name and "(start_user)" not in by_name
    assert not points(db, "agents")  # nothing launched, nothing stopped
    assert points(db, "mediator")[-1]["mediations"] == {"granted": 3, "denied": 1}


def test_options_pick_launched_or_external_agents() -> None:
    """Launched by default; external needs a multitenant URL and a mediator; mixing both is refused."""
    assert load_simulator("simulators.acapy.tenant:TenantSimulator") is TenantSimulator
    assert TenantOptions().agents.launch is True
    external = TenantOptions.model_validate(
        {
            "agents": {
                "multitenant_admin_url": "http://127.0.0.1:1",
                "mediator_admin_url": "http://127.0.0.1:2",
            }
        }
    )
    assert external.agents.launch is False
    for bad, match in (
        ({"launch": True, "multitenant_admin_url": "http://x"}, "choose launched or external"),
        ({"multitenant_admin_url": "http://x"}, "mediator_admin_url or mediator_invitation_url"),
        ({"launch": False}, "need multitenant_admin_url"),
    ):
        with pytest.raises(ValueError, match=match):
            TenantOptions.model_validate({"agents": bad})


def test_webhook_listener_counts_duplicates_late_and_misrouted() -> None:
    """Receipts resolve their waiter once; a second one is a duplicate; after giving up, late."""

    async def flow() -> None:
        async with WebhookListener() as hooks, aiohttp.ClientSession() as http:
            dups: list[str] = []
            hooks.on_duplicate = dups.append

            async def post(topic: str, wallet: str, body: dict[str, Any]) -> None:
                async with http.post(
                    f"{hooks.url}/topic/{topic}/", json=body, headers={"x-wallet-id": wallet}
                ):
                    pass

            first, second, third = (message_id("t") for _ in range(3))
            got = hooks.expect_message(first, "w1")
            await post("basicmessages", "w1", {"content": message_content(first, 40)})
            assert isinstance(await asyncio.wait_for(got, 2), float)
            await post("basicmessages", "w1", {"content": message_content(first, 40)})
            assert dups == [first] and hooks.duplicates == 1
            hooks.expect_message(second, "w1")
            hooks.forget_message(second)
            await post("basicmessages", "w1", {"content": message_content(second, 40)})
            assert hooks.late == 1
            wrong = hooks.expect_message(third, "w1")
            await post("basicmessages", "w2", {"content": message_content(third, 40)})
            with pytest.raises(RuntimeError, match="another wallet"):
                await asyncio.wait_for(wrong, 2)
            await post("ping", "w1", {"state": "response_received", "thread_id": "th-1"})  # before its waiter
            assert isinstance(await asyncio.wait_for(hooks.expect_ping("th-1"), 2), float)
            await post("connections", "w1", {"connection_id": "c1", "state": "active"})
            assert (hooks.record("connections", "c1") or {})["state"] == "active"
            assert hooks.topics[("connections", "active")] == 1

    asyncio.run(flow())
    assert len(message_content(message_id("x"), 100)) == 100


def test_missing_agents_are_a_usage_error(tmp_path: Path) -> None:
    """An unreachable external multitenant agent: exit 2 with a one-line reason, nothing recorded."""
    profile = {
        "name": "acapy-unreachable",
        "duration": "5s",
        "groups": {
            "tenants": {
                "simulator": "simulators.acapy.tenant:TenantSimulator",
                "users": 1,
                "options": {
                    "agents": {
                        "multitenant_admin_url": "http://127.0.0.1:9",
                        "mediator_invitation_url": invitation_url(
                            {"@type": "https://didcomm.org/out-of-band/1.1/invitation", "label": "M"}
                        ),
                    }
                },
            }
        },
    }
    began = time.monotonic()
    proc, _, _ = start(tmp_path, profile, timeout=60)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "acapy-tenant: the multitenant agent:" in proc.stderr and "unreachable" in proc.stderr
    assert time.monotonic() - began < 30

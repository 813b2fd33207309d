"""The Peers view of the panel: `GET /api/runs/<id>/peers` on a store filled with crafted WebRTC peer
data points (the layout of simulators/webrtc: `{F}PerSecond`, `{F}BytesPerSecond`, … per family),
and the Peers section in a real Chromium for a run whose simulator publishes such data points."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from flask import Flask
from flask.testing import FlaskClient
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from harness.simulator import Simulator, User
from harness.store import Run, Store
from tests import test_web_browser as wb
from web import create_app

FAMILIES = ("sent", "received", "relayed", "all", "relevant", "duplicate", "expired")
T0 = 1_000_000.0

panel = wb.panel
browser = wb.browser


def peer_values(sent: float, kind: str = "aiortc", **extra: Any) -> dict[str, Any]:
    """A peer data point as simulators/webrtc writes it: family f's rate is sent × (its index + 1)."""
    values: dict[str, Any] = {}
    for i, family in enumerate(FAMILIES):
        rate = sent * (i + 1)
        values.update(
            {
                family: int(rate * 2),
                f"{family}Total": int(rate * 20),
                f"{family}PerSecond": rate,
                f"{family}Bytes": int(rate * 200),
                f"{family}TotalBytes": int(rate * 2000),
                f"{family}BytesPerSecond": rate * 100,
                f"{family}AveragePacketSize": 100.0,
            }
        )
    values.update(
        {
            "connectedPeers": ["a", "b"],
            "knownPeersCount": 3,
            "position": [1.5, 0, -2.25],
            "kind": kind,
            "routine": "catalyst",
            "receivedFrom": {"a": 4},
        }
    )
    values.update(extra)
    return values


def point(offset: float, group: str, entity: str, values: dict[str, Any]) -> dict[str, Any]:
    return {"t": T0 + offset, "group": group, "entity": entity, "values": values}


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app = create_app({"HARNESS_DB": str(tmp_path / "h.db")})
    yield app
    app.extensions["harness_runs"].shutdown(who="test teardown", timeout=30)
    app.extensions["harness_store"].close()


@pytest.fixture
def store(app: Flask) -> Store:
    """The panel's store with three runs (see `fill_store`)."""
    return fill_store(app.extensions["harness_store"])


def fill_store(store: Store) -> Store:
    """Three runs: `peers` (two groups of peers and one other data point), `plain` (only another
    family's data points) and `none` (no data points). Also used by test_store_postgres."""
    for run_id in ("peers", "plain", "none"):
        store.create_run(Run(id=run_id, profile="p", started_at=T0, status="passed"))
    browser_values = peer_values(100, "browser", memoryMB=512.5, webrtc={"rttMs": 12.0, "bytesSent": 9})
    store.write_second(
        "peers",
        [],
        [],
        [],
        [
            # buckets of 2 s: b0 = [0, 2), b1 = [2, 4), b2 = [4, 6); b10 = [20, 22)
            point(0.5, "room", "a", peer_values(10)),
            point(0.6, "room", "b", peer_values(1)),
            point(0.7, "room", "user-1", {"n": 1}),  # another family: never a peer
            point(1.5, "room", "a", peer_values(20)),
            point(2.1, "web", "c", browser_values),
            point(2.5, "room", "a", peer_values(30, averageLatency=42.0)),
            point(4.2, "room", "b", peer_values(3)),
            point(20.0, "room", "b", peer_values(5)),
        ],
        [],
        [],
        [],
    )
    store.write_second("plain", [], [], [], [point(1.0, "g", "user-1", {"n": 1})], [], [], [])
    return store


@pytest.fixture
def client(app: Flask, store: Store) -> FlaskClient:
    return app.test_client()


def sums(body: dict[str, Any], family: str = "sent") -> list[tuple[int, str | None, int, float]]:
    return [(r["t"], r["group"], r["peers"], r[f"{family}PerSecond"]) for r in body["series"]]


def test_peer_table_rows(client: FlaskClient) -> None:
    body = client.get("/api/runs/peers/peers").get_json()
    assert body["families"] == list(FAMILIES) and body["bucket"] == 2 and body["by"] == "run"
    assert body["started_at"] == T0 and body["last_t"] == 20.0 and body["truncated"] is False
    rows = {r["peer"]: r for r in body["peers"]}
    assert list(rows) == ["a", "b", "c"]  # by group, then peer; user-1 is not a peer
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert a == {
        "peer": "a",
        "group": "room",
        "kind": "aiortc",
        "routine": "catalyst",
        "connected": 2,
        "known": 3.0,
        "sent_per_s": 30.0,
        "received_per_s": 60.0,
        "relayed_per_s": 90.0,
        "all_per_s": 120.0,
        "relevant_per_s": 150.0,
        "duplicate_per_s": 180.0,
        "expired_per_s": 210.0,
        "sent_bytes_per_s": 3000.0,
        "received_bytes_per_s": 6000.0,
        "latency_ms": 42.0,
        "rtt_ms": None,
        "memory_mb": None,
        "position": [1.5, 0.0, -2.25],
        "last_seen": 2.5,
        "age_s": 17.5,
    }
    assert b["sent_per_s"] == 5.0 and b["last_seen"] == 20.0 and b["age_s"] == 0.0
    assert c["kind"] == "browser" and c["group"] == "web" and c["memory_mb"] == 512.5
    assert c["rtt_ms"] == 12.0 and c["latency_ms"] is None and c["sent_per_s"] == 100.0

    one = client.get("/api/runs/peers/peers?peers=1").get_json()
    assert [r["peer"] for r in one["peers"]] == ["a"] and one["truncated"] is True
    assert client.get("/api/runs/peers/peers?peers=0").get_json()["peers"] == []


def test_peer_series_sums(client: FlaskClient) -> None:
    body = client.get("/api/runs/peers/peers").get_json()
    # b0: a's two points averaged (15) + b (1); b1: a 30 + b held (1) + c 100;
    # b2: a held (30) + b 3 + c held (100); b10: only b (a and c are more than 5 s old)
    assert sums(body) == [(0, None, 2, 16.0), (2, None, 3, 131.0), (4, None, 3, 133.0), (20, None, 1, 5.0)]
    assert [r["sentBytesPerSecond"] for r in body["series"]] == [1600.0, 13100.0, 13300.0, 500.0]
    # every family and its bytes: family i is sent × (i + 1)
    for i, family in enumerate(FAMILIES):
        assert [r[f"{family}PerSecond"] for r in body["series"]] == [v * (i + 1) for v in (16, 131, 133, 5)]
        assert [r[f"{family}BytesPerSecond"] for r in body["series"]] == [
            v * (i + 1) * 100 for v in (16, 131, 133, 5)
        ]

    by_group = client.get("/api/runs/peers/peers?by=group").get_json()
    assert sums(by_group) == [
        (0, "room", 2, 16.0),
        (2, "room", 2, 31.0),
        (2, "web", 1, 100.0),
        (4, "room", 2, 33.0),
        (4, "web", 1, 100.0),
        (20, "room", 1, 5.0),
    ]
    wide = client.get("/api/runs/peers/peers?bucket=10").get_json()
    assert wide["bucket"] == 10
    assert sums(wide) == [(0, None, 3, 122.0), (20, None, 1, 5.0)]  # a: (10+20+30)/3, b: (1+3)/2, c


def test_peer_series_incremental(client: FlaskClient) -> None:
    # since: the buckets from there on, the held values still counted (read from before `since`)
    body = client.get("/api/runs/peers/peers?since=4").get_json()
    assert sums(body) == [(4, None, 3, 133.0), (20, None, 1, 5.0)]
    assert [r["peer"] for r in body["peers"]] == ["b"]  # the only peer heard from since then
    later = client.get("/api/runs/peers/peers?since=5.5").get_json()
    assert sums(later) == [(4, None, 3, 133.0), (20, None, 1, 5.0)]  # 5.5 is in the bucket from 4
    newest = client.get("/api/runs/peers/peers?since=20").get_json()
    assert sums(newest) == [(20, None, 1, 5.0)] and [r["peer"] for r in newest["peers"]] == ["b"]
    assert newest["last_t"] == 20.0
    nothing = client.get("/api/runs/peers/peers?since=30").get_json()
    assert nothing["series"] == [] and nothing["peers"] == [] and nothing["last_t"] is None
    # limit: the newest buckets (counted from the newest data point, empty ones included)
    assert sums(client.get("/api/runs/peers/peers?limit=1").get_json()) == [(20, None, 1, 5.0)]
    for limit, buckets in ((8, [20]), (9, [4, 20]), (10, [2, 4, 20]), (11, [0, 2, 4, 20])):
        body = client.get(f"/api/runs/peers/peers?limit={limit}").get_json()
        assert [r[0] for r in sums(body)] == buckets, limit
    # the held values still count in the first bucket answered
    assert sums(client.get("/api/runs/peers/peers?limit=9").get_json())[0] == (4, None, 3, 133.0)


@pytest.mark.parametrize("run_id", ["plain", "none"])
def test_runs_without_peers(client: FlaskClient, run_id: str) -> None:
    body = client.get(f"/api/runs/{run_id}/peers?by=group").get_json()
    assert body["peers"] == [] and body["series"] == [] and body["last_t"] is None
    assert body["run_id"] == run_id and body["families"] == list(FAMILIES)


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ("bucket=0", "bucket", "expected 1..3600, got 0"),
        ("bucket=2.5", "bucket", "expected a whole number"),
        ("bucket=x", "bucket", "expected a whole number"),
        ("by=name", "by", "expected run or group"),
        ("since=-1", "since", "expected a number of seconds >= 0"),
        ("since=soon", "since", "expected seconds since the run started"),
        ("since=nan", "since", "expected a number of seconds >= 0"),
        ("limit=0", "limit", "expected 1..100000"),
        ("peers=-1", "peers", "expected 0..10000"),
        ("peers=lots", "peers", "expected a whole number"),
    ],
)
def test_bad_arguments(client: FlaskClient, query: str, field: str, message: str) -> None:
    response = client.get(f"/api/runs/peers/peers?{query}")
    assert response.status_code == 400
    body = response.get_json()
    assert body["field"] == field and message in body["error"], body


def test_unknown_run(client: FlaskClient) -> None:
    response = client.get("/api/runs/nope/peers")
    assert response.status_code == 404 and "nope" in response.get_json()["error"]


# -- the panel in Chromium ---------------------------------------------------------------------------
class FakePeers(Simulator):
    """Each user is a WebRTC-like peer that publishes a peer data point every iteration (no WebRTC)."""

    name = "fake-peers"

    async def iteration(self, user: User) -> None:
        kind = "browser" if self.ctx.group == "web" else "aiortc"
        extra: dict[str, Any] = {"memoryMB": 300.0, "webrtc": {"rttMs": 8.0}} if kind == "browser" else {}
        sent = 10.0 * (user.id + 1)
        self.metrics.datapoint(f"{self.ctx.group}-peer-{user.id}", peer_values(sent, kind, **extra))
        self.metrics.request("tick", 0.001, kind="test")
        await asyncio.sleep(0.5)


PEERS_PROFILE = """
name: fake-peers
description: peers that publish WebRTC-like data points
duration: 40s
stop_grace: 2s
groups:
  room:
    simulator: tests.test_web_peers:FakePeers
    users: 3
  web:
    simulator: tests.test_web_peers:FakePeers
    users: 1
"""

PEERS_STATE = """
var box = document.getElementById(arguments[0] + '-peers');
var rows = document.querySelectorAll('#' + arguments[0] + '-peers-table tbody tr');
return {
  hidden: !box || box.hidden,
  rows: rows.length,
  peers: Array.from(rows).map(r => r.dataset.peer).sort(),
  browser: document.querySelectorAll('#' + arguments[0] + '-peers-table .peer-kind-browser').length,
  charts: box ? box.querySelectorAll('.peer-charts .chart-card[data-drawn] canvas').length : 0,
  titles: box ? Array.from(box.querySelectorAll('.peer-charts h3')).map(h => h.textContent) : [],
  points: box ? +(box.querySelector('.peer-charts').dataset.points || 0) : 0,
  datapoints: !document.getElementById('datapoints-section').hidden
};
"""


def wait_peers(driver: Any, view: str, what: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Wait for the Peers section of `view` (live or detail) to satisfy `check`; fail showing its state."""
    seen: list[dict[str, Any]] = [{}]

    def ready(d: Any) -> Any:
        seen[0] = d.execute_script(PEERS_STATE, view)
        return seen[0] if not seen[0]["hidden"] and check(seen[0]) else None

    try:
        return cast(dict[str, Any], wb.wait_for(driver, what, ready, timeout=40))
    except AssertionError as exc:
        logs = [e["message"] for e in driver.get_log("browser")]
        raise AssertionError(f"{exc}; Peers section {seen[0]}; console {logs}") from None


PEER_IDS = ["room-peer-0", "room-peer-1", "room-peer-2", "web-peer-0"]
TITLES = ["Sent", "Received", "Relayed", "All", "Relevant", "Duplicate", "Expired"]


@pytest.mark.slow
def test_panel_peers_section(panel: str, browser: Any, tmp_path: Path) -> None:
    browser.get(panel)
    wb.wait_for(
        browser,
        "the profile list",
        lambda d: d.find_elements(By.CSS_SELECTOR, "#profile-select option[value=__custom__]"),
    )
    Select(browser.find_element(By.ID, "profile-select")).select_by_value("__custom__")
    browser.execute_script("document.getElementById('profile-yaml').value = arguments[0]", PEERS_PROFILE)
    browser.find_element(By.ID, "start-btn").click()
    wb.wait_for(browser, "the live run", lambda d: wb.text(d, "run-status") == "running", timeout=40)

    def complete(s: dict[str, Any]) -> bool:
        return bool(s["rows"] == 4 and s["charts"] == 7)

    state = wait_peers(browser, "live", "the live Peers section", complete)
    assert state["peers"] == PEER_IDS and state["browser"] == 1, state
    assert state["titles"] == TITLES, state
    assert state["datapoints"] is False, "the generic data point table shows the peers again"
    # the charts grow with the next polls (incremental fetches)
    first = state["points"]
    wb.wait_for(
        browser,
        "more peer chart points",
        lambda d: d.execute_script(PEERS_STATE, "live")["points"] > first,
        timeout=30,
    )
    # the sent/s column: the peers' own rates (10 × (user + 1); the browser peer is user 0 of `web`)
    sent = browser.execute_script(
        "return Array.from(document.querySelectorAll('#live-peers-table tbody tr'))"
        ".map(r => [r.dataset.peer, r.cells[6].textContent])"
    )
    assert sorted(sent) == [
        ["room-peer-0", "10.0"],
        ["room-peer-1", "20.0"],
        ["room-peer-2", "30.0"],
        ["web-peer-0", "10.0"],
    ]
    # sorting by sent/s: the largest first
    browser.find_element(By.CSS_SELECTOR, "#live-peers-table th[data-key=sent_per_s]").click()
    order = browser.execute_script(
        "return Array.from(document.querySelectorAll('#live-peers-table tbody tr')).map(r => r.dataset.peer)"
    )
    assert order[0] == "room-peer-2", order
    # bytes/s instead of packets/s
    Select(browser.find_element(By.ID, "live-peers-unit")).select_by_value("bytes")
    wb.wait_for(
        browser,
        "the charts in bytes/s",
        lambda d: "bytes per second" in wb.text(d, "live-peer-charts-sent"),
        timeout=10,
    )
    browser.execute_script("document.getElementById('live-peers').scrollIntoView()")
    browser.save_screenshot(str(tmp_path / "peers-live.png"))
    print(f"screenshot: {tmp_path / 'peers-live.png'}")

    # the finished run's detail view has the same section, over the whole run
    browser.execute_script("window.scrollTo(0, 0)")
    browser.find_element(By.ID, "stop-btn").click()
    wb.wait_for(browser, "the end of the run", lambda d: wb.text(d, "run-status") == "aborted", timeout=45)
    run_id = browser.execute_script("return location.hash.split('/')[1]")
    browser.find_element(By.ID, "tab-history").click()
    wb.wait_for(
        browser,
        "the run in the history",
        lambda d: d.find_elements(By.CSS_SELECTOR, f"#history-table tbody tr[data-run='{run_id}']"),
    )[0].click()
    detail = wait_peers(browser, "detail", "the detail Peers section", complete)
    assert detail["peers"] == PEER_IDS and not detail["hidden"] and detail["points"] >= 3, detail
    browser.execute_script("document.getElementById('detail-peers').scrollIntoView()")
    browser.save_screenshot(str(tmp_path / "peers-detail.png"))
    print(f"screenshot: {tmp_path / 'peers-detail.png'}")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

"""Remote agents on loopback: a headless controller (`harness start` of a profile with `agents:`) and
`harness agent` processes, all real subprocesses; a TCP proxy between agent and hub to cut the link."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.agent import Outbox, shift_times
from harness.remote import jsonable, restore
from harness.supervisor import _split
from tests.clitools import ROOT, free_port, wait_for
from tests.test_run import rows

pytestmark = pytest.mark.slow

TOKEN = "agents-test-token"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


class Procs:
    """The subprocesses of one test, killed at the end whatever happened."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[str]:
        out = (self.tmp_path / f"{name}.out").open("w")
        err = (self.tmp_path / f"{name}.err").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness", *args],
            cwd=self.tmp_path,
            env=_env(),
            stdout=out,
            stderr=err,
            text=True,
        )
        out.close()
        err.close()
        self.procs.append(proc)
        return proc

    def controller(self, profile: dict[str, Any], port: int, *extra: str) -> subprocess.Popen[str]:
        path = self.tmp_path / "profile.yaml"
        path.write_text(yaml.safe_dump(profile))
        return self.start(
            "controller",
            "start",
            "--profile",
            str(path),
            "--headless",
            "--quiet",
            "--port",
            str(port),
            "--db",
            str(self.tmp_path / "h.db"),
            "--report-dir",
            str(self.tmp_path / "report"),
            *extra,
        )

    def agent(self, name: str, url: str, *extra: str) -> subprocess.Popen[str]:
        work = str(self.tmp_path / f"work-{name}")
        return self.start(name, "agent", "--controller", url, "--name", name, "--work-dir", work, *extra)

    def text(self, name: str) -> str:
        return (self.tmp_path / f"{name}.err").read_text() + (self.tmp_path / f"{name}.out").read_text()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


def profile(**agents: Any) -> dict[str, Any]:
    """Four recorder users, 25 iterations each, one worker per agent."""
    return {
        "name": "agents",
        "duration": "40s",
        "stop_grace": "2s",
        "agents": {"min": 2, "wait": "30s", **agents},
        "groups": {
            "rec": {
                "simulator": "tests.sims:Recorder",
                "users": 4,
                "iterations": 25,
                "think_time": "20ms",
                "processes": 1,
                "options": {"sleep": 0.01},
            }
        },
    }


def summary(tmp_path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((tmp_path / "report" / "summary.json").read_text())
    return result


def events(tmp_path: Path) -> list[tuple[str, str | None, dict[str, Any]]]:
    return [
        (t, g, json.loads(d))
        for t, g, d in rows(tmp_path / "h.db", 'SELECT type, "group", detail FROM event ORDER BY t')
    ]


# -- pure pieces ---------------------------------------------------------------------------------------
def test_outbox_keeps_order_acks_cumulatively_and_drops_non_batches_first() -> None:
    box = Outbox(max_messages=3)
    for kind in ("batch", "log", "batch", "log"):
        box.add({"kind": kind, "payload": {}})
    assert [m["seq"] for m in box.after(0)] == [1, 3, 4] and box.dropped == 1  # the oldest log went
    box.add({"kind": "batch", "payload": {}})
    assert [m["seq"] for m in box.after(0)] == [1, 3, 5]  # then the other log, not a batch
    box.ack(3)
    assert [m["seq"] for m in box.after(0)] == [5] and box.first_seq() == 5
    assert [m["seq"] for m in box.after(5)] == []


def test_timestamps_move_onto_the_controllers_clock() -> None:
    batch = {
        "windows": [{"t": 100, "name": "op"}],
        "metrics": [{"t": 100, "name": "ops"}],
        "datapoints": [{"t": 100.25, "entity": "e"}],
        "events": [{"t": 100.5, "type": "x"}],
        "health": {"t": 100.75},
    }
    moved = shift_times("batch", batch, 2.6)
    assert moved["windows"][0]["t"] == 103 and moved["metrics"][0]["t"] == 103
    assert moved["datapoints"][0]["t"] == pytest.approx(102.85)
    assert moved["health"]["t"] == pytest.approx(103.35)
    assert shift_times("log", {"t": 5.0}, -1.5) == {"t": 3.5}
    assert batch["windows"][0]["t"] == 100  # the original is untouched


def test_relayed_messages_have_no_binary_attachments_and_lose_no_bytes() -> None:
    from socketio import packet

    from harness.metrics import new_histogram

    hist = new_histogram()
    for value in (1_000, 2_500, 900_000):
        hist.record_value(value)
    encoded = hist.encode()
    assert isinstance(encoded, bytes) and encoded.startswith(b"HIST")
    payload = {
        "windows": [{"t": 5, "hist": encoded, "hist_intended": None}],
        "raw": b"\x00\xffb64:",
        "n": [1],
    }
    sent = jsonable(payload)
    # one text frame per event: nothing for a closed session's leftovers to be misread as
    assert isinstance(packet.Packet(packet.EVENT, data=["msg", sent], namespace="/agents").encode(), str)
    assert restore(sent) == payload
    assert restore(jsonable(b"b64:looks-encoded")) == b"b64:looks-encoded"
    assert Outbox().add({"kind": "batch", "payload": sent}) == 1


def test_weighted_split_follows_capacity_and_equal_weights_split_as_before() -> None:
    assert _split(5, 2, True, [2.0, 2.0]) == _split(5, 2, True) == [3.0, 2.0]
    assert _split(9, 3, True, [4.0, 2.0, 2.0]) == [5.0, 2.0, 2.0]
    assert sum(_split(7, 3, True, [3.0, 1.0, 1.0])) == 7
    assert _split(6.0, 2, False, [2.0, 1.0]) == [4.0, 2.0]


# -- end to end ----------------------------------------------------------------------------------------
def test_two_agents_share_a_run_and_the_totals_add_up(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    controller = procs.controller(profile(), port, "--token", TOKEN)
    procs.agent("a1", url, "--token", TOKEN, "--processes", "1")
    procs.agent("a2", url, "--token", TOKEN, "--processes", "3")  # three times the weight
    assert controller.wait(timeout=50) == 0, procs.text("controller")
    s = summary(tmp_path)
    assert s["totals"]["requests"] == 100 and s["totals"]["failures"] == 0
    seen = events(tmp_path)
    joined = {d["name"] for t, _, d in seen if t == "agent_joined"}
    assert joined == {"a1", "a2"}
    placed = {d["agent"] for t, _, d in seen if t == "worker_started"}
    assert placed == {"a1", "a2"}
    # users split by capacity: a2 offers three times what a1 does
    users = dict(rows(tmp_path / "h.db", "SELECT worker, MAX(target) FROM health GROUP BY worker"))
    by_agent = {d["agent"]: d["worker"] for t, _, d in seen if t == "worker_started"}
    assert [users[by_agent["a1"]], users[by_agent["a2"]]] == [1, 3]
    # each agent's worker wrote its files on the agent
    assert (tmp_path / "work-a1" / "runs" / s["run_id"]).is_dir()


def test_an_agent_without_the_token_is_refused(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db = str(tmp_path / "h.db")
    serve = procs.start("serve", "serve", "--port", str(port), "--db", db, "--token", TOKEN)
    wait_for(lambda: urllib.request.urlopen(f"{url}/api/session", timeout=2).status == 200)
    for extra in ((), ("--token", "wrong")):
        refused = procs.agent("nope", url, *extra)
        assert refused.wait(timeout=30) == 2
        lines = procs.text("nope").strip().splitlines()
        assert lines == ["harness: error: controller refused the agent: unauthorized"], lines
    good = procs.agent("good", url, "--token", TOKEN, "--labels", "x,y")

    def listed() -> list[dict[str, Any]]:
        request = urllib.request.Request(f"{url}/api/agents", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            agents: list[dict[str, Any]] = json.loads(response.read())["agents"]
        return agents

    agents = wait_for(listed)
    assert [(a["name"], a["labels"], a["health"]) for a in agents] == [("good", ["x", "y"], "ok")]
    assert agents[0]["capacity"]["cores"] == (os.cpu_count() or 1)
    assert abs(agents[0]["clock_offset_s"]) < 0.5
    good.send_signal(signal.SIGTERM)
    assert good.wait(timeout=30) == 0
    serve.terminate()
    serve.wait(timeout=30)


def test_too_few_agents_is_bad_input(procs: Procs) -> None:
    controller = procs.controller(profile(wait="1s"), free_port())
    assert controller.wait(timeout=30) == 2
    lines = procs.text("controller").strip().splitlines()
    assert "harness: error: profile needs 2 agents, 0 connected after 1s" in lines, lines


@pytest.mark.parametrize("policy", ["move", "fail"])
def test_a_killed_agent_is_lost_and_the_policy_decides(procs: Procs, tmp_path: Path, policy: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = profile(on_lost=policy, lost_timeout="2s")
    del p["groups"]["rec"]["iterations"]
    p["duration"] = "12s"
    controller = procs.controller(p, port)
    procs.agent("a1", url)
    doomed = procs.agent("a2", url)
    wait_for(lambda: len(rows(tmp_path / "h.db", "SELECT DISTINCT worker FROM health")) == 2)
    doomed.kill()
    code = controller.wait(timeout=50)
    seen = events(tmp_path)
    types = [t for t, _, _ in seen]
    assert "agent_disconnected" in types and "agent_lost" in types, types
    lost = next(d for t, _, d in seen if t == "agent_lost")
    assert lost["name"] == "a2" and lost["policy"] == policy
    s = summary(tmp_path)
    if policy == "fail":
        assert code == 3, procs.text("controller")
        assert s["status"] == "aborted" and "'a2' was lost" in s["reason"]
    else:
        assert code == 0, procs.text("controller")
        lines = [line for line in procs.text("controller").splitlines() if "a2" in line]
        assert len([line for line in lines if "disconnected" in line]) == 1, lines  # one line each
        assert len([line for line in lines if "lost" in line]) == 1, lines
        assert any("lost (away for 2s): 1 worker's share moved to the others" in line for line in lines), (
            lines
        )
        # the surviving agent's worker took all four users
        a1 = next(d["worker"] for t, _, d in seen if t == "worker_started" and d["agent"] == "a1")
        lost_at = "(SELECT t FROM event WHERE type='agent_lost')"
        after = rows(tmp_path / "h.db", f"SELECT MAX(users) FROM health WHERE worker=? AND t > {lost_at}", a1)
        assert after[0][0] == 4


def test_an_agent_that_came_mid_run_takes_over_a_lost_agents_workers(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = profile(on_lost="move", lost_timeout="2s")
    del p["groups"]["rec"]["iterations"]
    p["duration"] = "14s"
    controller = procs.controller(p, port)
    procs.agent("a1", url)
    doomed = procs.agent("a2", url)
    wait_for(lambda: len(rows(tmp_path / "h.db", "SELECT DISTINCT worker FROM health")) == 2)
    procs.agent("a3", url)
    wait_for(lambda: [d for t, _, d in events(tmp_path) if t == "agent_idle" and d["name"] == "a3"])
    doomed.kill()
    assert controller.wait(timeout=50) == 0, procs.text("controller")
    seen = events(tmp_path)
    assert [d["name"] for t, _, d in seen if t == "agent_lost"] == ["a2"]
    assert [(d["name"], d.get("replaces")) for t, _, d in seen if t == "agent_joined"][-1] == ("a3", "a2")
    slot = next(d["worker"] for t, _, d in seen if t == "worker_started" and d["agent"] == "a2")
    moved = [d for t, _, d in seen if t == "worker_restarted"]
    assert [(d["worker"], d["agent"]) for d in moved] == [(slot, "a3")], moved
    # a3 ran the lost worker's two users; a1 kept its own two
    lost_at = "(SELECT t FROM event WHERE type='agent_lost')"
    after = dict(
        rows(tmp_path / "h.db", f"SELECT worker, MAX(users) FROM health WHERE t > {lost_at} GROUP BY worker")
    )
    assert after == {0: 2, 1: 2}, after
    assert "lost (away for 2s): 1 worker moved to agent a3" in procs.text("controller")


def test_an_agent_that_connects_mid_run_is_recorded_and_listed_idle(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = profile(min=1)
    del p["groups"]["rec"]["iterations"]
    p["duration"] = "8s"
    controller = procs.controller(p, port)
    procs.agent("a1", url)
    wait_for(lambda: rows(tmp_path / "h.db", "SELECT COUNT(*) FROM health")[0][0] > 0)
    procs.agent("late", url, "--labels", "x")
    idle = wait_for(lambda: [d for t, _, d in events(tmp_path) if t == "agent_idle"])
    assert [d["name"] for d in idle] == ["late"]
    with urllib.request.urlopen(f"{url}/api/agents", timeout=5) as response:
        listed = {a["name"]: a for a in json.loads(response.read())["agents"]}
    assert listed["late"]["state"] == "idle" and listed["late"]["run_id"] is None
    assert listed["a1"]["state"] == "running" and listed["a1"]["run_id"] is not None
    assert controller.wait(timeout=50) == 0, procs.text("controller")
    started = {d["agent"] for t, _, d in events(tmp_path) if t == "worker_started"}
    assert started == {"a1"}  # the run keeps the agents it started with
    assert procs.text("controller").count("agent late connected: idle until the next run") == 1


def test_an_agent_that_connects_mid_run_takes_a_share_with_joining_grow(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = profile(min=1, joining="grow")
    del p["groups"]["rec"]["iterations"]
    p["duration"] = "12s"
    controller = procs.controller(p, port)
    procs.agent("a1", url)
    wait_for(lambda: rows(tmp_path / "h.db", "SELECT COUNT(*) FROM health")[0][0] > 0)
    procs.agent("a2", url)
    joined = wait_for(lambda: [d for t, _, d in events(tmp_path) if t == "agent_joined" and d.get("mid_run")])
    assert joined[0]["name"] == "a2"
    assert controller.wait(timeout=50) == 0, procs.text("controller")
    seen = events(tmp_path)
    assert "agent_idle" not in [t for t, _, _ in seen]
    workers = {d["agent"]: d["worker"] for t, _, d in seen if t == "worker_started"}
    assert sorted(workers) == ["a1", "a2"], workers
    db = tmp_path / "h.db"
    joined_at = "(SELECT t FROM event WHERE type='agent_joined' AND detail LIKE '%mid_run%')"
    before = rows(db, f"SELECT MAX(users) FROM health WHERE worker=? AND t < {joined_at}", workers["a1"])
    assert before[0][0] == 4  # a1 alone ran the four users
    # from two seconds after the join, the four users are split two and two
    after = dict(rows(db, f"SELECT worker, MAX(users) FROM health WHERE t > {joined_at} + 2 GROUP BY worker"))
    assert after == {workers["a1"]: 2, workers["a2"]: 2}, after
    text = procs.text("controller")
    assert "agent a2 connected: the run takes it (joining: grow)" in text
    assert "agent a2 joined the run: 1 worker of rec" in text


class Proxy:
    """A TCP proxy on loopback whose link can be cut (every connection closed, new ones refused), or
    frozen (nothing passes either way, nothing is closed: a silent cut, as a pulled cable)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.up = True
        self.flowing = threading.Event()
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                self.flowing.wait()
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def restore(self) -> None:
        self.up = True

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.flowing.set()
        self.server.close()
        with self.lock:
            for s in self.sockets:
                s.close()


def _paced_run_behind_a_proxy(procs: Procs, tmp_path: Path, iterations: int) -> tuple[Any, Proxy]:
    """A controller and one agent whose link goes through a Proxy: two users at 10 iterations/s each,
    `iterations` each; returns once 20 are stored."""
    port = free_port()
    proxy = Proxy(port)
    p = profile(min=1)
    pacing = {"type": "pacing", "interval": "100ms"}
    p["groups"]["rec"].update(users=2, iterations=iterations, think_time=pacing)
    controller = procs.controller(p, port)
    procs.agent("a1", f"http://127.0.0.1:{proxy.port}")
    try:
        wait_for(lambda: rows(tmp_path / "h.db", "SELECT SUM(count) FROM window")[0][0] >= 20)
    except BaseException:
        proxy.close()
        raise
    return controller, proxy


def test_a_cut_link_loses_no_windows(procs: Procs, tmp_path: Path) -> None:
    controller, proxy = _paced_run_behind_a_proxy(procs, tmp_path, iterations=60)
    try:
        proxy.cut()
        cut_at = time.time()
        time.sleep(3)
        proxy.restore()
        assert controller.wait(timeout=50) == 0, procs.text("controller")
    finally:
        proxy.close()
    s = summary(tmp_path)
    assert s["totals"]["requests"] == 120  # every iteration, the ones recorded while cut off too
    types = [t for t, _, _ in events(tmp_path)]
    assert "agent_disconnected" in types and "agent_reconnected" in types, types
    assert "agent_lost" not in types and "worker_restarted" not in types
    # frames of the cut connection are not decoded as packets, and werkzeug reads no WebSocket frame
    # as an HTTP request: nothing but the run's own lines reaches the terminal
    out = procs.text("controller")
    for noise in ("Traceback", "handler error", "Bad request syntax", "Bad HTTP/0.9"):
        assert noise not in out, out
    lines = out.splitlines()
    assert len([line for line in lines if "agent a1 disconnected" in line]) == 1, out  # one line each
    assert len([line for line in lines if "agent a1 reconnected" in line]) == 1, out
    # the seconds recorded during the cut arrived late and were written as usual
    seconds = [t for (t,) in rows(tmp_path / "h.db", "SELECT DISTINCT t FROM window ORDER BY t")]
    assert seconds == list(range(seconds[0], seconds[-1] + 1))
    assert any(cut_at <= t <= cut_at + 3 for t in seconds)


def test_a_silent_cut_is_noticed_within_seconds_and_loses_nothing(procs: Procs, tmp_path: Path) -> None:
    controller, proxy = _paced_run_behind_a_proxy(procs, tmp_path, iterations=120)
    try:
        frozen_at = time.time()
        proxy.freeze()  # no FIN, no RST: only the agent going quiet tells
        time.sleep(5)
        proxy.thaw()
        thawed_at = time.time()
        assert controller.wait(timeout=60) == 0, procs.text("controller")
    finally:
        proxy.close()
    assert summary(tmp_path)["totals"]["requests"] == 240, procs.text("controller")
    seen = events(tmp_path)
    assert [t for t, _, _ in seen if t.startswith("agent_") and t != "agent_joined"] == [
        "agent_disconnected",
        "agent_reconnected",
    ], procs.text("controller")
    noticed = rows(tmp_path / "h.db", "SELECT t FROM event WHERE type='agent_disconnected'")[0][0]
    assert frozen_at + 1.5 < noticed < thawed_at, (frozen_at, noticed, thawed_at)
    out = procs.text("controller")
    for noise in ("Traceback", "handler error", "Bad request syntax", "Bad HTTP/0.9"):
        assert noise not in out, out


def test_two_agents_record_exactly_what_one_host_records(procs: Procs, tmp_path: Path) -> None:
    """tests.sims:Synthetic's latencies depend only on (global user, iteration): two agents with one
    worker each must record the same multiset as one host with two workers — merged percentiles equal."""
    p = profile()
    p["groups"]["rec"] = {
        "simulator": "tests.sims:Synthetic",
        "users": 4,
        "iterations": 50,
        "processes": 2,
        "options": {"sleep": 0.005},
    }
    del p["agents"]
    local = tmp_path / "local"
    local.mkdir()
    alone = Procs(local)
    try:
        assert alone.controller(p, free_port()).wait(timeout=50) == 0, alone.text("controller")
    finally:
        alone.close()
    p["agents"] = {"min": 2, "wait": "30s"}
    p["groups"]["rec"]["processes"] = 1
    port = free_port()
    controller = procs.controller(p, port)
    for name in ("a1", "a2"):
        procs.agent(name, f"http://127.0.0.1:{port}", "--processes", "1")
    assert controller.wait(timeout=50) == 0, procs.text("controller")
    one, two = summary(local)["totals"], summary(tmp_path)["totals"]
    assert one["requests"] == two["requests"] == 200
    for key in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms"):
        assert one[key] == two[key], key

"""Remote agents on separate network stacks: the controller in namespace `hc`, agents in `ha1`, `ha2`.

Each agent namespace is linked to `hc` by its own veth pair (10.231.N.1 on hc's side, 10.231.N.2 on the
agent's), so cutting one link, or killing one agent, is what happens to a real remote host. Every process
is the real CLI. Root and iproute2 (scripts/install-system) are required; the namespaces are removed
after each test.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.metrics import merge_into, new_histogram
from tests import netns
from tests.sims import synthetic_latency

# One worker for the module under pytest-xdist: every lab's fixture removes the namespaces of dead runs,
# and the crash test plants exactly such a namespace, which another worker's lab would remove.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("netns")]

ROOT = Path(__file__).resolve().parent.parent
PORT = 8099
TOKEN = "agents-netns-token"
USERS = 4
ITERATIONS = 50
CUT_S = 5.0
"""How long a link is cut: the hub must notice within it (agents report every second; silent 3.5 s
is out of reach), and the connection must come back by itself."""
NOISE = ("Traceback", "handler error", "Bad request syntax", "Bad HTTP/0.9")
"""What must never reach a terminal."""
PERCENTILES = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")


def _env() -> dict[str, str]:
    """The caller's environment without HARNESS_* settings, with the repository importable (tests.sims)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _profile(processes: int, sleep: float, agents: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `tests.sims:Synthetic` group: USERS users, ITERATIONS iterations each, no think time."""
    group = {
        "simulator": "tests.sims:Synthetic",
        "users": USERS,
        "iterations": ITERATIONS,
        "processes": processes,
        "options": {"sleep": sleep},
    }
    doc: dict[str, Any] = {
        "name": "synthetic",
        "duration": "60s",
        "stop_grace": "3s",
        "groups": {"syn": group},
    }
    if agents is not None:
        doc["agents"] = agents
    return doc


def _rows(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def _events(db: Path, kind: str) -> list[dict[str, Any]]:
    return [json.loads(d) for (d,) in _rows(db, "SELECT detail FROM event WHERE type=? ORDER BY id", kind)]


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path.name}: no file)"
    text = path.read_text(errors="replace").splitlines()
    return f"--- {path.name} (last {lines} lines) ---\n" + "\n".join(text[-lines:])


class Cluster:
    """The controller and agents of one test, each in its namespace, with their logs in `tmp`."""

    def __init__(self, lab: netns.Lab, tmp: Path, agents: int = 2) -> None:
        self.lab = lab
        self.tmp = tmp
        self.links = [lab.link("hc", f"ha{n}", n) for n in range(1, agents + 1)]
        self.db = tmp / "h.db"
        self.report = tmp / "report"
        self.controller: subprocess.Popen[Any] | None = None
        self.agents: dict[int, subprocess.Popen[Any]] = {}

    def start_controller(self, profile: dict[str, Any]) -> subprocess.Popen[Any]:
        """`harness start` inside hc on 0.0.0.0:PORT with the token; waits until agents can reach it."""
        path = self.tmp / "profile.yaml"
        path.write_text(yaml.safe_dump(profile))
        argv = [sys.executable, "-m", "harness", "start", "--profile", str(path), "--headless", "--quiet"]
        argv += ["--host", "0.0.0.0", "--port", str(PORT), "--token", TOKEN]
        argv += ["--db", str(self.db), "--report-dir", str(self.report)]
        self.controller = self.lab.spawn(
            "hc", argv, env=_env(), cwd=self.tmp, log=self.tmp / "controller.log"
        )
        deadline = time.monotonic() + 30
        while not self.lab.wait_port("ha1", self.links[0].hub_addr, PORT, timeout=2):
            if self.controller.poll() is not None:
                pytest.fail(f"the controller exited ({self.controller.returncode})\n{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the controller never listened on {PORT}\n{self.logs()}")
        return self.controller

    def start_agent(self, n: int, token: str = TOKEN, stderr_apart: bool = False) -> subprocess.Popen[Any]:
        """`harness agent` inside haN, connecting to hc's side of link N, in its own work folder."""
        work = self.tmp / f"a{n}"
        work.mkdir(exist_ok=True)
        url = f"http://{self.links[n - 1].hub_addr}:{PORT}"
        argv = [sys.executable, "-m", "harness", "agent", "--controller", url, "--token", token]
        argv += ["--name", f"a{n}"]
        proc = self.lab.spawn(
            f"ha{n}",
            argv,
            env=_env(),
            cwd=work,
            log=self.tmp / f"a{n}.log",
            stderr_log=self.tmp / f"a{n}.err" if stderr_apart else None,
        )
        self.agents[n] = proc
        return proc

    def wait_controller(self, timeout: float) -> int:
        """The controller's exit code; on a timeout it is killed and the test fails with the logs."""
        assert self.controller is not None
        try:
            return self.controller.wait(timeout)
        except subprocess.TimeoutExpired:
            self.lab.stop(self.controller, grace=3)
            pytest.fail(f"the controller did not finish within {timeout:.0f}s\n{self.logs()}")

    def wait_joined(self, count: int, timeout: float = 40) -> None:
        """Until `count` agent_joined events are in the database, then one more second of running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.controller is not None
            if self.controller.poll() is not None:
                pytest.fail(f"the controller exited early ({self.controller.returncode})\n{self.logs()}")
            try:
                if len(_events(self.db, "agent_joined")) >= count:
                    time.sleep(1.0)
                    return
            except sqlite3.Error:
                pass  # not created yet
            time.sleep(0.2)
        pytest.fail(f"{count} agents never joined the run\n{self.logs()}")

    def summary(self) -> dict[str, Any]:
        path = self.report / "summary.json"
        assert path.exists(), f"no summary.json\n{self.logs()}"
        return json.loads(path.read_text())

    def logs(self) -> str:
        names = ["controller.log"] + [f"a{n}.log" for n in self.agents] + [f"a{n}.err" for n in self.agents]
        return "\n".join(_tail(self.tmp / name) for name in names if (self.tmp / name).exists())


@pytest.fixture
def lab() -> Iterator[netns.Lab]:
    """A fresh set of namespaces (hc plus what the test links to it), removed whatever happens."""
    reason = netns.unavailable()
    if reason:
        pytest.fail(f"{reason}: scripts/install-system installs iproute2; the tests run as root")
    netns.clean_stale()
    lab = netns.Lab()
    lab.namespace("hc")
    try:
        yield lab
    finally:
        lab.close()
        assert not [ns for ns in netns.namespaces() if ns.startswith(lab.prefix)]


def _merged_op(db: Path) -> list[int]:
    """The bucket counts of every `op` window of the database, merged."""
    hist = new_histogram()
    for (encoded,) in _rows(db, "SELECT hist FROM window WHERE name='op'"):
        merge_into(hist, encoded)
    return list(hist.counts)


def _op(summary: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in summary["endpoints"] if e["group"] == "syn" and e["name"] == "op")


# -- the plumbing alone ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_namespaces_reach_each_other_only_over_their_link(lab: netns.Lab, tmp_path: Path) -> None:
    link1 = lab.link("hc", "ha1", 1)
    lab.link("hc", "ha2", 2)
    (tmp_path / "marker.txt").write_text("inside hc")
    server = [sys.executable, "-m", "http.server", str(PORT), "--bind", link1.hub_addr]
    lab.spawn("hc", [*server, "--directory", str(tmp_path)], log=tmp_path / "server.log")
    assert lab.wait_port("ha1", link1.hub_addr, PORT), _tail(tmp_path / "server.log")
    fetch = (
        "import sys, urllib.request\n"
        "try:\n"
        f"    url = 'http://{link1.hub_addr}:{PORT}/marker.txt'\n"
        "    print(urllib.request.urlopen(url, timeout=2).read().decode())\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "    sys.exit(1)\n"
    )
    ok = lab.run("ha1", [sys.executable, "-c", fetch])
    assert ok.returncode == 0 and ok.stdout.strip() == "inside hc", ok
    # ha2 has no route to ha1's subnet: the server is out of its reach
    other = lab.run("ha2", [sys.executable, "-c", fetch])
    assert other.returncode == 1 and "unreachable" in other.stdout.lower(), other
    # the link down: ha1 cannot reach it any more; up again: it can
    lab.set_link(link1, up=False)
    cut = lab.run("ha1", [sys.executable, "-c", fetch])
    assert cut.returncode == 1, cut
    lab.set_link(link1, up=True)
    assert lab.wait_port("ha1", link1.hub_addr, PORT, timeout=10)
    again = lab.run("ha1", [sys.executable, "-c", fetch])
    assert again.returncode == 0 and again.stdout.strip() == "inside hc", again
    # the host's own network has none of it
    assert "10.231." not in subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout


@pytest.mark.timeout(60)
def test_namespaces_of_a_crashed_run_are_removed(lab: netns.Lab) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = f"{netns.PREFIX}{gone.pid}-1-hc"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in netns.clean_stale()
        assert stale not in netns.namespaces()
        assert lab.names["hc"] in netns.namespaces()  # this run's own stay
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)


def test_synthetic_latencies_are_spread_and_placement_free() -> None:
    values = [synthetic_latency(u, i) for u in range(USERS) for i in range(1, ITERATIONS + 1)]
    assert 0.001 <= min(values) < 0.01 and 1.0 < max(values) <= 2.0
    assert len({round(v, 6) for v in values}) > 0.9 * len(values)
    # users 0..3 over 2 workers (global user = id * workers + index) or 1 worker: the same multiset
    two = sorted(synthetic_latency(uid * 2 + w, i) for w in (0, 1) for uid in (0, 1) for i in range(1, 51))
    one = sorted(synthetic_latency(uid, i) for uid in range(4) for i in range(1, 51))
    assert two == one


# -- agents ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_two_agents_record_what_one_host_records(lab: netns.Lab, tmp_path: Path) -> None:
    # the baseline: one host, two worker processes
    base = tmp_path / "base"
    base.mkdir()
    (base / "profile.yaml").write_text(yaml.safe_dump(_profile(processes=2, sleep=0.02)))
    argv = [sys.executable, "-m", "harness", "start", "--profile", str(base / "profile.yaml"), "--headless"]
    argv += ["--quiet", "--db", str(base / "h.db"), "--report-dir", str(base / "report")]
    one = subprocess.run(argv, cwd=base, env=_env(), capture_output=True, text=True, timeout=60)
    assert one.returncode == 0, one.stdout + one.stderr
    baseline = json.loads((base / "report" / "summary.json").read_text())
    assert _op(baseline)["requests"] == USERS * ITERATIONS

    # the same users on two agents, one worker process each
    work = tmp_path / "agents"
    work.mkdir()
    cluster = Cluster(lab, work)
    cluster.start_controller(_profile(processes=1, sleep=0.02, agents={"min": 2, "wait": "30s"}))
    cluster.start_agent(1)
    cluster.start_agent(2)
    code = cluster.wait_controller(75)
    assert code == 0, cluster.logs()
    summary = cluster.summary()
    assert summary["status"] == "passed"
    assert summary["totals"]["requests"] == baseline["totals"]["requests"] == USERS * ITERATIONS
    ours, theirs = _op(summary), _op(baseline)
    assert ours["requests"] == theirs["requests"]
    assert {p: ours[p] for p in PERCENTILES} == {p: theirs[p] for p in PERCENTILES}
    db = cluster.db
    assert _rows(db, "SELECT SUM(count) FROM window WHERE name='op'")[0][0] == USERS * ITERATIONS
    # more than five percentiles: the merged histograms are the same, bucket for bucket
    assert _merged_op(db) == _merged_op(base / "h.db")
    assert _rows(db, "SELECT SUM(value) FROM metric WHERE name='synthetic_ops'")[0][0] == USERS * ITERATIONS
    # each agent ran one worker, with half of the users as its target
    joined = _events(db, "agent_joined")
    assert sorted(e["name"] for e in joined) == ["a1", "a2"], joined
    assert len({e["agent"] for e in joined}) == 2
    workers = _rows(db, 'SELECT "index", exit_code FROM worker WHERE "group"=\'syn\' ORDER BY "index"')
    assert [w[0] for w in workers] == [0, 1], workers
    placed = {e["worker"]: str(e.get("agent")) for e in _events(db, "worker_started")}
    assert sorted(placed) == [0, 1] and sorted(placed.values()) == ["a1", "a2"], placed
    targets = _rows(db, "SELECT worker, MAX(target) FROM health WHERE \"group\"='syn' GROUP BY worker")
    assert sorted(targets) == [(0, 2.0), (1, 2.0)], targets


@pytest.mark.timeout(150)
def test_a_cut_link_loses_nothing(lab: netns.Lab, tmp_path: Path) -> None:
    cluster = Cluster(lab, tmp_path)
    # 50 iterations of 0.3 s: about 15 s of running, with the cut well inside it
    cluster.start_controller(_profile(processes=1, sleep=0.3, agents={"min": 2, "wait": "30s"}))
    cluster.start_agent(1)
    cluster.start_agent(2)
    cluster.wait_joined(2)
    # a silent cut (no FIN, no RST) of exactly CUT_S: only the agent going quiet can tell
    cut_at = time.time()
    lab.set_link(cluster.links[0], up=False)
    time.sleep(CUT_S)
    lab.set_link(cluster.links[0], up=True)
    restored_at = time.time()
    code = cluster.wait_controller(75)
    assert code == 0, cluster.logs()
    summary = cluster.summary()
    assert summary["status"] == "passed"
    assert _op(summary)["requests"] == USERS * ITERATIONS, cluster.logs()
    assert _rows(cluster.db, "SELECT SUM(count) FROM window WHERE name='op'")[0][0] == USERS * ITERATIONS
    disconnected = _events(cluster.db, "agent_disconnected")
    reconnected = _events(cluster.db, "agent_reconnected")
    assert [e["name"] for e in disconnected] == ["a1"], (disconnected, cluster.logs())
    assert [e["name"] for e in reconnected] == ["a1"], (reconnected, cluster.logs())
    assert not _events(cluster.db, "agent_lost")
    # noticed while the link was down, not after it came back
    (noticed,) = _rows(cluster.db, "SELECT t FROM event WHERE type='agent_disconnected'")[0]
    assert cut_at < noticed < restored_at, (cut_at, noticed, restored_at)
    text = (tmp_path / "controller.log").read_text() + (tmp_path / "a1.log").read_text()
    assert not [n for n in NOISE if n in text], cluster.logs()
    # the agent's worker was never restarted: one worker row per slot
    assert len(_rows(cluster.db, "SELECT id FROM worker WHERE \"group\"='syn'")) == 2


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("on_lost", "expected"), [("fail", 3), ("move", 0)])
def test_a_killed_agent_is_lost(lab: netns.Lab, tmp_path: Path, on_lost: str, expected: int) -> None:
    cluster = Cluster(lab, tmp_path)
    agents = {"min": 2, "wait": "30s", "on_lost": on_lost, "lost_timeout": "3s"}
    cluster.start_controller(_profile(processes=1, sleep=0.3, agents=agents))
    cluster.start_agent(1)
    cluster.start_agent(2)
    cluster.wait_joined(2)
    # the whole host goes: the agent and the workers it started
    assert cluster.agents[2].pid in lab.kill_all("ha2")
    code = cluster.wait_controller(75)
    assert code == expected, cluster.logs()
    lost = _events(cluster.db, "agent_lost")
    assert [e["name"] for e in lost] == ["a2"], (lost, cluster.logs())
    summary = cluster.summary()
    if on_lost == "fail":
        assert summary["status"] == "aborted"
        assert "a2" in summary.get("reason", ""), summary.get("reason")
    else:
        assert summary["status"] == "passed"
        # agent 1 took all four users and ran each of them to the end
        assert _op(summary)["requests"] >= USERS * ITERATIONS
        users = _rows(cluster.db, "SELECT MAX(users) FROM health WHERE \"group\"='syn'")
        assert users == [(USERS,)], users


@pytest.mark.timeout(90)
def test_an_agent_with_a_wrong_token_exits_2(lab: netns.Lab, tmp_path: Path) -> None:
    cluster = Cluster(lab, tmp_path, agents=1)
    cluster.start_controller(_profile(processes=1, sleep=0.02, agents={"min": 1, "wait": "10s"}))
    agent = cluster.start_agent(1, token="not-the-token", stderr_apart=True)
    try:
        code = agent.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the refused agent kept running\n{cluster.logs()}")
    err = (tmp_path / "a1.err").read_text()
    out = (tmp_path / "a1.log").read_text()
    assert code == 2, cluster.logs()
    assert "Traceback" not in err + out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "controller refused the agent: unauthorized" in lines[0], err
    # nobody else came: the controller gives up after `wait`
    assert cluster.wait_controller(40) == 2, cluster.logs()
    assert "needs 1 agent" in (tmp_path / "controller.log").read_text(), cluster.logs()


@pytest.mark.timeout(150)
def test_agents_reach_the_controllers_embedded_target(lab: netns.Lab, tmp_path: Path) -> None:
    """An embedded target runs beside the controller, on the hub's address: each agent reaches it at the
    address it reaches the hub on (10.231.1.1 for a1, 10.231.2.1 for a2), never at its own loopback."""
    profile: dict[str, Any] = {
        "name": "echo-on-agents",
        "duration": "60s",
        "stop_grace": "3s",
        "targets": {"echo": {"embedded": True, "concurrency": 16}},
        "groups": {
            "web": {
                "simulator": "http",
                "users": USERS,
                "iterations": 25,
                "processes": 1,
                "options": {"requests": [{"name": "home", "url": "/", "checks": {"status": 200}}]},
            }
        },
        "agents": {"min": 2, "wait": "30s"},
    }
    cluster = Cluster(lab, tmp_path)
    cluster.start_controller(profile)
    cluster.start_agent(1)
    cluster.start_agent(2)
    assert cluster.wait_controller(75) == 0, cluster.logs()
    summary = cluster.summary()
    home = next(e for e in summary["endpoints"] if e["group"] == "web" and e["name"] == "home")
    assert home["requests"] == USERS * 25 and home["failures"] == 0, (home, cluster.logs())
    placed = {e["worker"]: str(e.get("agent")) for e in _events(cluster.db, "worker_started")}
    assert sorted(placed.values()) == ["a1", "a2"], placed

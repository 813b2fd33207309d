"""The `webrtc-room` profile end to end: ten aiortc peers and a real Chromium peer in one room, headless.

The issue's acceptance run: every peer, the browser included, publishes data points with all seven
packet families; the browser's messages reach aiortc peers and theirs reach the browser; every data
point also reaches InfluxDB (a small receiving server here) in the original's line layout.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from simulators.webrtc.common import FAMILIES
from tests.test_run import rows, start

pytestmark = pytest.mark.slow

FIELDS = ("", "Total", "PerSecond", "Bytes", "TotalBytes", "BytesPerSecond", "AveragePacketSize")


class InfluxReceiver(ThreadingHTTPServer):
    """Collects the bodies POSTed to /write (an InfluxDB 1.x write endpoint as far as the client knows)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.queries: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                with receiver.lock:
                    receiver.queries.append(self.path)
                    receiver.lines.extend(line for line in body.splitlines() if line)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_webrtc_room_aiortc_and_browser_peers_share_a_room(tmp_path: Path) -> None:
    influx = InfluxReceiver()
    thread = threading.Thread(target=influx.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{influx.server_address[1]}/write?db=comms&precision=ms"
    try:
        proc, summary, db = start(
            tmp_path,
            "webrtc-room",
            "--duration",
            "25s",
            "--set",
            "groups.browsers.users=1",
            "--set",
            f"groups.peers.options.influx_url={url}",
            "--set",
            f"groups.browsers.options.influx_url={url}",
            timeout=150,
        )
    finally:
        influx.shutdown()
        influx.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["status"] == "passed"

    latest: dict[str, dict[str, Any]] = {}
    for entity, values in rows(db, "SELECT entity, values_json FROM datapoint ORDER BY id"):
        latest[entity] = json.loads(values)
    kinds = {peer: values["kind"] for peer, values in latest.items()}
    assert sorted(kinds.values()) == ["aiortc"] * 10 + ["browser"]
    for peer, values in latest.items():
        missing = [f + s for f in FAMILIES for s in FIELDS if not isinstance(values.get(f + s), (int, float))]
        assert not missing, (peer, missing)
        assert values["sentTotal"] > 0 and values["receivedTotal"] > 0, peer
        assert values["connectedPeers"] and values["knownPeersCount"] >= 1, peer

    browser = next(p for p, k in kinds.items() if k == "browser")
    heard_by_browser = {s for s, n in latest[browser]["receivedFrom"].items() if n > 0}
    assert heard_by_browser & {p for p, k in kinds.items() if k == "aiortc"}
    hearing_browser = [p for p, k in kinds.items() if k == "aiortc" and browser in latest[p]["receivedFrom"]]
    assert hearing_browser

    names = {(e["group"], e["name"]) for e in summary["endpoints"]}
    assert {("peers", "deliver position"), ("browsers", "deliver position"), ("peers", "connect")} <= names
    titles = [t["title"] for t in summary.get("tables", [])]
    assert "Packets by family (all peers)" in titles

    # InfluxDB got every peer's data points in the original's layout: measurement test-{run id}, tag peer
    measurement = f"test-{summary['run_id']}"
    assert influx.lines and all(q.startswith("/write?db=comms") for q in influx.queries)
    tagged = {line.split(" ", 1)[0] for line in influx.lines}
    assert {f"{measurement},peer={peer}" for peer in kinds} <= tagged
    browser_lines = [line for line in influx.lines if line.startswith(f"{measurement},peer={browser} ")]
    assert any(" sentCount=" in line for line in browser_lines)
    assert any(" x=" in line and ",knownPeers=" in line for line in browser_lines)

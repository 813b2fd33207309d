"""`webrtc-browser`: real headless Chromium peers (Selenium) in a lighthouse room, next to aiortc peers.

Each virtual user is one headless Chromium running the browser client (`client/peer.js`, the same
protocol as the aiortc peers) for `peers_per_browser` peers:

    groups:
      browsers:
        simulator: webrtc-browser
        users: 2
        options:
          target: lighthouse          # a `lighthouse` target (or lighthouse_url)
          peers_per_browser: 1
          memory_interval: 10s

Every worker serves the page and a results API for its run (`page_server`: 127.0.0.1, a free port);
the page's `testId` is the run id, so the page starts at once, joins the layer and the room, connects
to up to `min_connections` room members and PUTs a data point per peer every `stats_interval` (the 49
family fields, `connectedPeers`, `knownPeersCount`, `position`, `averageLatency`, `kind: "browser"`,
`routine`, `receivedFrom`, `webrtc` from getStats, and `memoryMB` added by the simulator). Delivery
latencies come with each data point and are recorded as `deliver {sub}` requests (kind `webrtc`).

Requests (kind `webrtc`): `browser start` (Chromium and ChromeDriver launch to page loaded), `join
room` (per peer, signal socket to room joined, timed by the page), `connect` (per offered connection,
to both data channels open), `deliver {sub}`, and failures the page reports (one line each). Counters:
`webrtc_offers_rejected`, `webrtc_answers_failed`, `webrtc_routine_errors`. Gauges:
`browser_memory_mb` (PSS of this worker's browsers' processes, ChromeDriver excluded; gauges add up
across workers, so it is the group's total) and `browsers` (open browsers).

`start_user` launches the browser and waits until its peers have joined; `iteration` reads the page's
status every `status_interval` (failures, counters) and the browser's memory every `memory_interval`;
`stop_user` calls the page's `harnessStop()` (final data point, LEAVE to every connection), quits the
driver and removes the browser's profile folder; `teardown` kills whatever is left, even after errors.

Loopback only: the page never asks for media permission, so Chromium binds its ICE sockets to the
wildcard address and the page announces them as 127.0.0.1 (sending to 127.0.0.1 from a wildcard socket
uses 127.0.0.1 as the source); mDNS candidate names and the media router's discovery are switched off.
Granting media permission (`fake_media`) makes Chromium enumerate and use every interface — only for a
network namespace that has nothing but `lo`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from pydantic import Field, model_validator

from harness.durations import Duration
from harness.errors import UsageError
from harness.simulator import Simulator, StopUser, User
from simulators.webrtc.common import RoomOptions, family_table, new_peer_id
from simulators.webrtc.page_server import KIND, PageServer

FOREVER_S = 365 * 24 * 3600
"""The page's testDuration when the browser runs until its user stops."""
SLEEP_SLICE = 0.25
"""Iterations wait in slices this long so a stopping user ends promptly."""
RETRY_BACKOFF = (1.0, 2.0)
"""A user whose browser could not start waits U[1, 2) s before ending (the worker starts another)."""
DISABLED_FEATURES = (
    "WebRtcHideLocalIpsWithMdns",  # raw host candidates: no mDNS names, no multicast announcements
    "MediaRouter",  # no DIAL/SSDP/mDNS discovery of cast devices
    "DialMediaRouteProvider",
    "Translate",
    "OptimizationHints",
)
BASE_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-pings",
    "--mute-audio",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--allow-loopback-in-peer-connection",
    "--window-size=800,600",
    "--disable-features=" + ",".join(DISABLED_FEATURES),
)
FAKE_MEDIA_FLAGS = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")
STATUS_SCRIPT = (
    "var s = window.harnessPeer || null;"
    " var ops = window.harnessTakeOps ? window.harnessTakeOps() : [];"
    " return {status: s, ops: ops};"
)
STOP_SCRIPT = (
    "var done = arguments[arguments.length - 1];"
    " if (!window.harnessStop) { done({status: null, ops: []}); return; }"
    " window.harnessStop().then(function (s) {"
    "   done({status: s, ops: window.harnessTakeOps ? window.harnessTakeOps() : []}); },"
    "   function (e) { done({status: null, ops: [], error: String(e)}); });"
)


class BrowserOptions(RoomOptions):
    """Options of the `webrtc-browser` simulator: the room options plus the browser's."""

    peers_per_browser: int = Field(default=1, ge=1, le=16)
    """Peers each browser page runs (the original client's `numberOfPeers`)."""
    fake_media: bool = False
    """Add `--use-fake-device-for-media-stream --use-fake-ui-for-media-stream`. Off by default: with
    media permission Chromium gathers on every interface and checks from the host's other addresses,
    so only use it where the browsers' network namespace has nothing but `lo`."""
    chromium: str = "/usr/bin/chromium"
    """The Chromium binary."""
    chromedriver: str = "/usr/bin/chromedriver"
    """The ChromeDriver binary (its version must match Chromium's; never downloaded)."""
    extra_flags: list[str] = Field(default_factory=list)
    """More Chromium command-line flags."""
    page_timeout: Duration = Field(default=30.0, gt=0)
    """How long launching the browser, loading the page and joining the room may take."""
    status_interval: Duration = Field(default=2.0, gt=0)
    """Each iteration reads the page's status (failures, counters) this often."""
    memory_interval: Duration = Field(default=10.0, gt=0)
    """How often each browser's memory (PSS of its processes) is measured."""
    stop_timeout: Duration = Field(default=3.0, gt=0)
    """How long the page may take to send its last data point and leave when its user stops."""
    test_duration: Duration | None = Field(default=None, gt=0)
    """The page's `testDuration`: after it the page says "Test finished" and its user ends; none:
    the browser runs until its user is stopped."""

    @model_validator(mode="after")
    def _browser_routines(self) -> BrowserOptions:
        custom = [name for name in self.routines if ":" in name]
        if custom:
            raise ValueError(
                f"routines {custom} are Python functions; browser peers run catalyst, silent or walk"
            )
        return self


def _one_line(exc: BaseException | str) -> str:
    """A short message for an error: Selenium's `Message:` without its stack trace."""
    if isinstance(exc, BaseException):
        text = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    else:
        text = exc
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    first = lines[0] if lines else "failed"
    return first.removeprefix("Message: ")[:300]


class Browser:
    """One headless Chromium driven by ChromeDriver (blocking calls: run them in the worker's pool)."""

    def __init__(self, options: BrowserOptions, profile_dir: Path, peer_ids: list[str]) -> None:
        self.options = options
        self.profile_dir = profile_dir
        self.peer_ids = peer_ids
        self.driver: Any = None
        self.driver_pid: int | None = None
        self.procs: dict[int, psutil.Process] = {}
        self.memory_mb: float | None = None
        self.closed = False
        self._lock = threading.Lock()

    def flags(self) -> list[str]:
        """Chromium's command line flags for this browser."""
        flags = [*BASE_FLAGS, f"--user-data-dir={self.profile_dir}"]
        if self.options.fake_media:
            flags.extend(FAKE_MEDIA_FLAGS)
        flags.extend(self.options.extra_flags)
        return flags

    def launch(self, url: str) -> float:
        """Start Chromium and ChromeDriver and load the page; seconds from launch to page loaded."""
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        chrome_options = webdriver.ChromeOptions()
        chrome_options.binary_location = self.options.chromium
        for flag in self.flags():
            chrome_options.add_argument(flag)
        service = Service(executable_path=self.options.chromedriver, log_output=subprocess.DEVNULL)
        began = time.perf_counter()
        with self._lock:
            if self.closed:
                raise RuntimeError("browser closed before it started")
            self.driver = webdriver.Chrome(service=service, options=chrome_options)
            process = getattr(self.driver.service, "process", None)
            self.driver_pid = process.pid if process is not None else None
        self.track()
        self.driver.set_page_load_timeout(self.options.page_timeout)
        self.driver.set_script_timeout(self.options.stop_timeout + 2.0)
        self.driver.get(url)
        loaded = time.perf_counter() - began
        self.track()
        return loaded

    def track(self) -> list[psutil.Process]:
        """The browser's processes now (ChromeDriver's descendants), remembered for `kill`."""
        if self.driver_pid is None:
            return []
        try:
            children = psutil.Process(self.driver_pid).children(recursive=True)
        except psutil.Error:
            return [p for p in self.procs.values() if p.is_running()]
        for proc in children:
            self.procs.setdefault(proc.pid, proc)
        return children

    def wait_joined(self, timeout: float) -> dict[str, Any]:
        """Poll the page until its peers run (or it aborted, or `timeout`); its status and ops."""
        deadline = time.monotonic() + timeout
        ops: list[dict[str, Any]] = []
        while True:
            answer = self.poll()
            ops.extend(answer.get("ops") or [])
            status = answer.get("status") or {}
            if status.get("state") in ("running", "aborted", "finished", "stopped"):
                return {"status": status, "ops": ops}
            if time.monotonic() > deadline:
                state = status.get("state", "not loaded")
                ops.append(
                    {"name": "join room", "ms": timeout * 1000, "ok": False, "error": f"page still {state}"}
                )
                return {"status": status, "ops": ops}
            time.sleep(0.1)

    def poll(self) -> dict[str, Any]:
        """The page's `harnessPeer` status and the operations it recorded since the last poll."""
        answer = self.driver.execute_script(STATUS_SCRIPT)
        return answer if isinstance(answer, dict) else {}

    def measure(self) -> float:
        """PSS (MB) of the browser's processes, ChromeDriver excluded."""
        total = 0
        for proc in self.track():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_full_info().pss
        self.memory_mb = total / 1e6
        return self.memory_mb

    def stop_page(self) -> dict[str, Any]:
        """`harnessStop()`: the page's final data point, LEAVE to every connection; status and ops."""
        if self.driver is None or self.closed:
            return {}
        answer = self.driver.execute_async_script(STOP_SCRIPT)
        return answer if isinstance(answer, dict) else {}

    def pairs(self) -> list[dict[str, Any]]:
        """Every ICE candidate pair of the page's connections (addresses, check and byte counts)."""
        script = (
            "var done = arguments[arguments.length - 1];"
            " window.harnessPairs().then(done, function () { done([]); });"
        )
        answer = self.driver.execute_async_script(script)
        return answer if isinstance(answer, list) else []

    def quit(self) -> None:
        """Quit the driver, kill any process left, remove the profile folder. Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            driver, self.driver = self.driver, None
        self.track()
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        self.kill()
        shutil.rmtree(self.profile_dir, ignore_errors=True)

    def kill(self) -> None:
        """Kill ChromeDriver and every Chromium process seen (no waiting for a polite exit)."""
        self.closed = True
        procs = list(self.procs.values())
        if self.driver_pid is not None:
            with contextlib.suppress(psutil.Error):
                driver = psutil.Process(self.driver_pid)
                procs.extend(driver.children(recursive=True))
                procs.append(driver)
        alive = []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    proc.kill()
                    alive.append(proc)
        psutil.wait_procs(alive, timeout=3)


def profile_processes(root: Path) -> list[psutil.Process]:
    """Live processes whose command line names a folder under `root` (Chromium's `--user-data-dir`)."""
    marker = str(root)
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
    return found


class BrowserSimulator(Simulator):
    """One headless Chromium per virtual user, running the browser peer in a lighthouse room."""

    name = "webrtc-browser"
    description = (
        "WebRTC peers in real headless Chromium (Selenium) in a lighthouse room, with memory per browser"
    )
    Options = BrowserOptions
    extra = "webrtc"
    threads = 32

    @classmethod
    def check_profile(cls, options: Any, profile: Any) -> None:
        """The lighthouse is one of the profile's targets, or an explicit `lighthouse_url`."""
        RoomOptions.check_room(options, profile)

    @classmethod
    def summary_tables(
        cls, group: str, endpoints: list[dict[str, Any]], counters: dict[str, float]
    ) -> list[dict[str, Any]]:
        return family_table(counters)

    async def setup(self) -> None:
        """Check the binaries, then serve the page and the results API on 127.0.0.1."""
        options: BrowserOptions = self.options
        for what, path in (("chromium", options.chromium), ("chromedriver", options.chromedriver)):
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise UsageError(
                    f"webrtc-browser: {what} not found at {path}: scripts/install-system installs "
                    "chromium and chromium-driver"
                )
        try:
            import selenium  # noqa: F401
        except ImportError:
            raise UsageError("webrtc-browser needs selenium: pip install 'harness[webrtc]'") from None
        os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads a driver
        self.lighthouse = options.lighthouse(self.ctx)
        self.root = Path(tempfile.mkdtemp(prefix=f"harness-browsers-{self.ctx.run_id[:24]}-"))
        self.browsers: dict[int, Browser] = {}
        self.server = PageServer(self.metrics, self.ctx.run_id, influx_url=options.influx_url)
        await self.server.start()

    def page_params(self, peer_ids: list[str], routines: list[str]) -> dict[str, Any]:
        """The page's query parameters for one browser."""
        o: BrowserOptions = self.options
        return {
            "numberOfPeers": len(peer_ids),
            "testDuration": o.test_duration or FOREVER_S,
            "statsSubmitInterval": round(o.stats_interval * 1000),
            "lighthouseUrl": self.lighthouse,
            "statsServerUrl": self.server.url,
            "testId": self.ctx.run_id,
            "pingInterval": o.ping_interval,
            "peerId": peer_ids,
            "routine": routines,
            "layer": o.layer,
            "room": o.room,
            "minConnections": o.min_connections,
            "maxConnections": o.max_connections,
            "periods": [
                round(o.position_every * 1000),
                round(o.profile_every * 1000),
                round(o.chat_every * 1000),
            ],
            "startJitter": round(o.start_jitter * 1000),
            "tickMs": round(1000 / o.tick_hz, 3),
            "connectTimeout": o.connect_timeout,
            "area": o.area,
        }

    def record(self, answer: dict[str, Any]) -> dict[str, Any]:
        """Record the page's operations (requests, failures, counters); its status."""
        for entry in answer.get("ops") or []:
            if not isinstance(entry, dict):
                continue
            if "counter" in entry:
                self.metrics.counter(str(entry["counter"]), float(entry.get("value") or 1))
                continue
            ms = entry.get("ms")
            seconds = float(ms) / 1000 if isinstance(ms, int | float) and ms >= 0 else 0.0
            ok = bool(entry.get("ok", True))
            self.metrics.request(
                str(entry.get("name") or "page"),
                seconds,
                kind=KIND,
                ok=ok,
                error=None if ok else _one_line(str(entry.get("error") or "failed")),
            )
        status = answer.get("status")
        return status if isinstance(status, dict) else {}

    async def start_user(self, user: User) -> None:
        """Launch the user's browser at the page and wait until its peers have joined the room."""
        o: BrowserOptions = self.options
        peer_ids = [new_peer_id(self.ctx.rng) for _ in range(o.peers_per_browser)]
        routines = [o.pick_routine(self.ctx.rng) for _ in peer_ids]
        profile_dir = self.root / f"user-{user.id}"
        browser = Browser(o, profile_dir, peer_ids)
        user.data = {"browser": browser, "peers": peer_ids, "memory_due": 0.0}
        self.browsers[user.id] = browser
        url = self.server.page_url(self.page_params(peer_ids, routines))
        began = time.perf_counter()
        try:
            loaded = await self.ctx.run_blocking(browser.launch, url)
        except Exception as exc:
            self.metrics.request(
                "browser start", time.perf_counter() - began, kind=KIND, ok=False, error=_one_line(exc)
            )
            await self._give_up(user)
            raise StopUser from None
        self.metrics.request("browser start", loaded, kind=KIND)
        try:
            answer = await self.ctx.run_blocking(browser.wait_joined, o.page_timeout)
        except Exception as exc:
            self.metrics.request("join room", 0.0, kind=KIND, ok=False, error=_one_line(exc))
            await self._give_up(user)
            raise StopUser from None
        status = self.record(answer)
        if status.get("state") != "running":
            await self._give_up(user)
            raise StopUser
        await self._measure(user, browser)

    async def _give_up(self, user: User) -> None:
        browser = self.browsers.pop(user.id, None)
        if browser is not None:
            await self.ctx.run_blocking(browser.quit)
        self._publish_memory()
        await asyncio.sleep(random.uniform(*RETRY_BACKOFF))

    async def _measure(self, user: User, browser: Browser) -> None:
        assert user.data is not None
        user.data["memory_due"] = time.monotonic() + self.options.memory_interval
        memory = await self.ctx.run_blocking(browser.measure)
        for peer_id in browser.peer_ids:
            self.server.memory_mb[peer_id] = memory
        self._publish_memory()

    def _publish_memory(self) -> None:
        open_browsers = [b for b in self.browsers.values() if not b.closed]
        self.metrics.gauge("browsers", len(open_browsers))
        self.metrics.gauge("browser_memory_mb", sum(b.memory_mb or 0.0 for b in open_browsers))

    async def iteration(self, user: User) -> None:
        """Read the page's status (and, when due, the browser's memory), then wait for the next read."""
        assert user.data is not None
        browser: Browser = user.data["browser"]
        began = time.monotonic()
        try:
            status = self.record(await self.ctx.run_blocking(browser.poll))
        except Exception as exc:
            if user.stopping or browser.closed:
                raise StopUser from None
            self.metrics.request("browser", 0.0, kind=KIND, ok=False, error=f"browser lost: {_one_line(exc)}")
            raise StopUser from None
        if status.get("state") in ("aborted", "finished", "stopped"):
            raise StopUser
        if time.monotonic() >= user.data["memory_due"]:
            await self._measure(user, browser)
        until = began + self.options.status_interval
        while not user.stopping and time.monotonic() < until:
            await asyncio.sleep(min(SLEEP_SLICE, max(0.0, until - time.monotonic())))

    async def stop_user(self, user: User) -> None:
        """Stop the page (final data point, LEAVE), quit the browser, remove its profile folder."""
        browser = self.browsers.get(user.id)
        if browser is None:
            return
        try:
            if not browser.closed:
                self.record(await self.ctx.run_blocking(browser.stop_page))
        except Exception as exc:
            self.metrics.request("browser stop", 0.0, kind=KIND, ok=False, error=_one_line(exc))
        finally:
            await self.ctx.run_blocking(browser.quit)
            self.browsers.pop(user.id, None)
            for peer_id in browser.peer_ids:
                self.server.memory_mb.pop(peer_id, None)
            self._publish_memory()

    async def teardown(self) -> None:
        """Close every browser left (killing what does not quit in time), the page server and the folder."""
        browsers = list(getattr(self, "browsers", {}).values())
        if browsers:
            quits = [self.ctx.run_blocking(b.quit) for b in browsers]
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*quits, return_exceptions=True), timeout=4.0)
            for browser in browsers:
                browser.kill()
            self.browsers.clear()
        root = getattr(self, "root", None)
        if root is not None:
            for proc in profile_processes(root):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            shutil.rmtree(root, ignore_errors=True)
        server = getattr(self, "server", None)
        if server is not None:
            await server.close()

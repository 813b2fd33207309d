"""Simulators the tests name as `simulator: tests.sims:Name`, as a user's own plugin would be named."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from harness.simulator import BlockingSimulator, Simulator, User


class RecorderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sleep: float = 0.01
    fail_every: int = 0


class Recorder(Simulator):
    """Records one timed operation per iteration plus a counter, a gauge, a data point and an event."""

    name = "recorder"
    Options = RecorderOptions

    async def start_user(self, user: User) -> None:
        user.data = {"n": 0}
        self.metrics.event("user_started", {"user": user.id})

    async def iteration(self, user: User) -> None:
        assert user.data is not None
        user.data["n"] += 1
        async with self.metrics.timer("op", kind="test"):
            await asyncio.sleep(self.options.sleep)
        self.metrics.counter("ops")
        self.metrics.gauge("last_user", user.id)
        self.metrics.datapoint(f"user-{user.id}", {"n": user.data["n"]})
        if self.options.fail_every and user.data["n"] % self.options.fail_every == 0:
            raise RuntimeError("planned failure")


class Phased(Simulator):
    """One request per iteration with two phases of it, one of which always fails (kind `phase`)."""

    name = "phased"

    async def iteration(self, user: User) -> None:
        self.metrics.request("op", 0.004, kind="test")
        self.metrics.phase("op_first_byte", 0.001)
        self.metrics.phase("op_check", 0.002, ok=False, error="slower than the goal")

    @classmethod
    def summary_tables(
        cls, group: str, endpoints: list[dict[str, Any]], counters: dict[str, float]
    ) -> list[dict[str, Any]]:
        ops = next(e for e in endpoints if e["name"] == "op")
        return [{"title": "ops", "columns": ["name", "count"], "rows": [["op", ops["requests"]]]}]


class SlowStop(Simulator):
    """A user whose stop hook takes a while (a training run flushing its last points)."""

    name = "slow-stop"

    async def iteration(self, user: User) -> None:
        self.metrics.request("op", 0.001)

    async def stop_user(self, user: User) -> None:
        await asyncio.sleep(1.5)
        self.metrics.counter("stopped")


class Finished(Simulator):
    """Prepares a fixture for the run, then reports on it and releases it once the workers are done."""

    name = "finished"

    @classmethod
    def prepare_run(cls, options: Any, targets: dict[str, str], run_id: str, log: Any) -> Any:
        return {"fixture": f"fx-{run_id}"}

    @classmethod
    def finish_run(cls, prepared: Any, run_id: str, log: Any) -> list[dict[str, Any]]:
        return [{"entity": "system", "values": {"released": prepared["fixture"]}}]

    async def iteration(self, user: User) -> None:
        self.metrics.request("op", 0.001)


class SlowBlocking(BlockingSimulator):
    """A blocking client (like Selenium) running in the worker's thread pool."""

    name = "slow-blocking"
    threads = 4

    def iteration_blocking(self, user: User) -> None:
        with self.metrics.timer("blocking-op", kind="test"):
            time.sleep(0.05)


class BadSetup(Simulator):
    """A simulator whose setup always fails: the worker cannot boot."""

    name = "bad-setup"

    async def setup(self) -> None:
        raise ConnectionError("cannot reach the license server")

    async def iteration(self, user: User) -> None:  # pragma: no cover - never reached
        pass


class Sleeper(Simulator):
    """Iterations that take far longer than any grace period."""

    name = "sleeper"

    async def iteration(self, user: User) -> None:
        async with self.metrics.timer("nap", kind="test"):
            await asyncio.sleep(30)


class FreezeOnce(Simulator):
    """Blocks its worker's event loop for good on the first iteration of user 0: no more heartbeats."""

    name = "freeze-once"

    async def iteration(self, user: User) -> None:
        async with self.metrics.timer("op", kind="test"):
            await asyncio.sleep(0.01)
        if user.id == 0 and user.iterations == 20 and self.ctx.worker_index == 0 and not _restarted():
            time.sleep(600)


def _restarted() -> bool:
    import os

    # the first process of this worker slot leaves a marker; its replacement sees it and does not freeze
    marker = os.path.join(os.environ.get("FREEZE_MARKER_DIR", "/tmp"), "froze-once")
    if os.path.exists(marker):
        return True
    with open(marker, "w") as f:
        f.write("1")
    return False


class Burner(Simulator):
    """Spins the CPU for 20 ms per iteration: a worker that keeps its core at 100%."""

    name = "burner"

    async def iteration(self, user: User) -> None:
        with self.metrics.timer("burn", kind="test"):
            end = time.perf_counter() + 0.02
            while time.perf_counter() < end:
                pass


class PreparedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fail: bool = False


class Prepared(Simulator):
    """Creates a shared fixture once per run and checks every worker and user sees it."""

    name = "prepared"
    Options = PreparedOptions

    @classmethod
    def prepare_run(
        cls, options: PreparedOptions, targets: dict[str, str], run_id: str, log: object
    ) -> object:
        if options.fail:
            raise RuntimeError("the fixture service said no")
        return {"conversations": [f"{run_id}-c{i}" for i in range(3)]}

    async def iteration(self, user: User) -> None:
        conversations = self.ctx.prepared["conversations"]
        mine = conversations[self.ctx.global_user(user) % len(conversations)]
        with self.metrics.timer(f"talk {mine.rsplit('-', 1)[1]}", kind="test"):
            await asyncio.sleep(0.01)


class ResultsPeer(Simulator):
    """Submits metrics for the run to a `results` target, as an original Catalyst client would."""

    name = "results-peer"

    async def iteration(self, user: User) -> None:
        import aiohttp

        url = f"{self.ctx.target_url()}/test/{self.ctx.run_id}/peer/peer-{user.id}/metrics"
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.put(url, json={"sent": user.iterations, "knownPeersCount": 1}) as response:
                ok = response.status == 200
                self.metrics.request(
                    "PUT metrics", time.monotonic() - started, ok=ok, error=str(response.status)
                )


class SyntheticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sleep: float = 0.02
    """A real pause per iteration (seconds), so a run lasts long enough to be interrupted."""


def synthetic_latency(global_user: int, iteration: int) -> float:
    """A latency in seconds, about 1 ms .. 2 s on a log scale, determined by the pair alone."""
    mixed = ((global_user * 7919 + iteration * 104729 + 12345) * 2654435761) % 2**32
    return 0.001 * 2000 ** (mixed / 2**32)


class Synthetic(Simulator):
    """Records `op` with a latency that depends only on (global user, iteration), plus a counter.

    Any placement of the same users over workers, processes or hosts records the same multiset of
    latencies, so merged percentiles of two such runs are equal when nothing was lost or repeated.
    """

    name = "synthetic"
    Options = SyntheticOptions

    async def iteration(self, user: User) -> None:
        if self.options.sleep > 0:
            await asyncio.sleep(self.options.sleep)
        self.metrics.request(
            "op", synthetic_latency(self.ctx.global_user(user), user.iterations), kind="test"
        )
        self.metrics.counter("synthetic_ops")

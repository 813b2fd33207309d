"""Locust FastHttpUser for scripts/bench: one GET / per iteration.

BENCH_WAIT (seconds, default 0) is the constant wait after each task: 0 for throughput, 3600 for
the idle-user memory measurement (each user does one request, then sleeps).
"""

import os

from locust import constant, task
from locust.contrib.fasthttp import FastHttpUser


class BenchUser(FastHttpUser):
    wait_time = constant(float(os.environ.get("BENCH_WAIT", "0")))

    @task
    def root(self) -> None:
        self.client.get("/")

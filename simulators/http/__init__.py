"""The generic `http` simulator: weighted or sequential HTTP requests with checks."""

from simulators.http.simulator import HttpOptions, HttpSimulator

__all__ = ["HttpOptions", "HttpSimulator"]

"""The generic `http` simulator: weighted or sequential HTTP requests with checks."""

from simulators.http.client import FastClient, PreparedRequest, Response
from simulators.http.simulator import HttpOptions, HttpSimulator

__all__ = ["FastClient", "HttpOptions", "HttpSimulator", "PreparedRequest", "Response"]

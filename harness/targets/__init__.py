"""Embedded reference targets: local servers speaking a seed system's API, with a realistic service model.

`TARGETS` maps each target kind's name to its `TargetKind`. `harness.targets.runner` starts one in its
own process (`EmbeddedTarget`) or in the foreground (`python -m harness target NAME`).

To add a target (genie, llm_engine, ingest, results, ...):

1. Write `harness/targets/NAME.py` with a config model that subclasses `ServiceModelConfig` (so it
   takes `concurrency`, `service_time`, `queue_limit`, `error_rate`, `timeout`; add `seed` and the
   target's own fields, keeping `extra="forbid"`), and `build_app(config) -> web.Application` that
   calls `service.instrument(app, ServiceModel(config, seed=...))` before adding its routes, so every
   route but `/health` and `/_stats` goes through the service model.
2. Register it below with `_register(TargetKind(...))`.
3. Test it in `tests/` against a real server on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from harness.errors import UsageError
from harness.targets import echo, genie, lighthouse, llm_engine, pluto, results


@dataclass(frozen=True)
class TargetKind:
    """One kind of embedded target: its config model, its app factory and its health path."""

    name: str
    config_model: type[BaseModel]
    build_app: Callable[[Any], web.Application]
    description: str
    health_path: str = "/health"

    def parse_config(
        self, config: Mapping[str, Any] | BaseModel | None, label: str | None = None
    ) -> BaseModel:
        """Validate `config`; raises `UsageError` naming the target (`label`, else the kind) and the field."""
        if isinstance(config, self.config_model):
            return config
        if config is not None and not isinstance(config, Mapping):
            raise UsageError(
                f"target {label or self.name!r}: config must be a mapping, got {type(config).__name__}"
            )
        try:
            return self.config_model.model_validate(dict(config or {}))
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                field = ".".join(str(part) for part in error["loc"])
                problems.append(f"{field}: {error['msg']}" if field else error["msg"])
            raise UsageError(f"target {label or self.name!r}: bad config: {'; '.join(problems)}") from None


TARGETS: dict[str, TargetKind] = {}


def _register(kind: TargetKind) -> None:
    TARGETS[kind.name] = kind


_register(
    TargetKind(
        name="echo",
        config_model=echo.EchoConfig,
        build_app=echo.build_app,
        description="an httpbin-like HTTP service: /echo, /status/{code}, /delay/{ms}, /bytes/{n}, /json",
    )
)

_register(
    TargetKind(
        name="llm_engine",
        config_model=llm_engine.LlmEngineConfig,
        build_app=llm_engine.build_app,
        description="the LLM Engine event assistant (auth, topics, conversations, Recall webhook) "
        "and an OpenAI-compatible /v1/chat/completions with streaming",
    )
)

_register(
    TargetKind(
        name="genie",
        config_model=genie.GenieConfig,
        build_app=genie.build_app,
        description="Databricks Genie conversations, SQL statement execution and an embeddings serving "
        "endpoint, as databricks-sdk calls them",
    )
)


_register(
    TargetKind(
        name="pluto",
        config_model=pluto.PlutoConfig,
        build_app=pluto.build_app,
        description="the mlop/pluto ML metrics stack on one port: run API, NDJSON ingest with the "
        "original's validation, heartbeat",
    )
)

_register(
    TargetKind(
        name="lighthouse",
        config_model=lighthouse.LighthouseConfig,
        build_app=lighthouse.build_app,
        description="a WebRTC lighthouse: layers and rooms over REST, WebSocket signalling with a cap "
        "on each peer's connections",
        health_path="/status",
    )
)


_register(
    TargetKind(
        name="results",
        config_model=results.ResultsConfig,
        build_app=results.build_app,
        description="the Catalyst peer performance test results server: tests as runs in the harness "
        "database, per-peer metrics as data points, optional InfluxDB export",
        health_path="/status",
    )
)


def get_target(name: str) -> TargetKind:
    """The target kind called `name`; raises `UsageError` listing the known kinds."""
    try:
        return TARGETS[name]
    except KeyError:
        known = ", ".join(sorted(TARGETS))
        raise UsageError(f"unknown target {name!r}; known targets: {known}") from None

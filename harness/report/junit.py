"""A JUnit XML file of a run's thresholds, for CI systems that show test results (Jenkins, GitLab,
GitHub Actions reporters, Azure DevOps).

One `<testsuite name="harness thresholds">` inside `<testsuites>`; one `<testcase>` per threshold,
named by its expression, with a `<failure>` when it failed ("value X violates EXPR"). A run without
thresholds gets a single testcase "run completed" instead, which fails when the run was aborted; an
aborted run with thresholds gets it as well, so that a run that did not finish is never green.
"""

from __future__ import annotations

import json
import socket
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

SUITE_NAME = "harness thresholds"


def _format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _timestamp(summary: dict[str, Any]) -> str:
    """ISO 8601 without a zone designator, as the JUnit schema wants (the value is UTC)."""
    started = str(summary.get("started_at") or "")
    if started:
        return started.rstrip("Z").split(".")[0]
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


def junit_tree(summary: dict[str, Any]) -> ET.ElementTree:
    """The JUnit document of a run summary (see the module docstring)."""
    duration = float(summary.get("duration_s") or 0.0)
    status = str(summary.get("status") or "")
    run_id = str(summary.get("run_id") or "")
    classname = f"harness.{summary.get('profile') or 'run'}"
    thresholds = [t for t in summary.get("thresholds") or [] if isinstance(t, dict)]
    cases: list[ET.Element] = []
    failures = 0
    for item in thresholds:
        expr = str(item.get("expr", ""))
        case = ET.Element("testcase", name=expr, classname=classname, time=f"{duration:.3f}")
        if not item.get("ok"):
            failures += 1
            value = _format_value(item.get("value"))
            message = f"value {value} violates {expr}"
            failure = ET.SubElement(case, "failure", message=message, type="ThresholdFailed")
            detail = {k: v for k, v in item.items() if k != "expr"}
            failure.text = f"{message}\n{json.dumps(detail, default=str, sort_keys=True)}"
        cases.append(case)
    if not thresholds or status == "aborted":
        case = ET.Element("testcase", name="run completed", classname=classname, time=f"{duration:.3f}")
        if status == "aborted":
            failures += 1
            reason = str(summary.get("reason") or "no reason recorded")
            failure = ET.SubElement(case, "failure", message=f"run aborted: {reason}", type="RunAborted")
            failure.text = f"run {run_id} was aborted: {reason}"
        cases.append(case)

    root = ET.Element(
        "testsuites",
        name="harness",
        tests=str(len(cases)),
        failures=str(failures),
        errors="0",
        time=f"{duration:.3f}",
    )
    suite = ET.SubElement(
        root,
        "testsuite",
        name=SUITE_NAME,
        tests=str(len(cases)),
        failures=str(failures),
        errors="0",
        skipped="0",
        time=f"{duration:.3f}",
        timestamp=_timestamp(summary),
        hostname=socket.gethostname(),
    )
    properties = ET.SubElement(suite, "properties")
    for key in ("run_id", "profile", "status", "started_at", "ended_at"):
        if summary.get(key) is not None:
            ET.SubElement(properties, "property", name=key, value=str(summary[key]))
    suite.extend(cases)
    totals = summary.get("totals") or {}
    if totals:
        out = ET.SubElement(suite, "system-out")
        out.text = "totals: " + ", ".join(
            f"{k}={_format_value(v)}" for k, v in totals.items() if not isinstance(v, dict | list)
        )
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(summary: dict[str, Any], path: str | Path) -> Path:
    """Write `junit.xml` for a run summary (as `summarize` returns it, or a loaded summary.json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    junit_tree(summary).write(path, encoding="utf-8", xml_declaration=True)
    return path

"""The files written into a run's report directory at the end of every run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from harness.store import Store

log = logging.getLogger(__name__)


def write_reports(store: Store, run_id: str, summary: dict[str, Any], report_dir: Path) -> dict[str, str]:
    """Write report.html, junit.xml and the CSV files next to summary.json; returns what was written.

    A report that fails is logged and skipped: it never costs the others, nor the recorded run.
    """
    from harness.report.csv import write_csv_reports
    from harness.report.html import write_html
    from harness.report.junit import write_junit
    from harness.timeline import analyze_timeline, auto_window

    written: dict[str, str] = {}
    try:
        written["junit"] = str(write_junit(summary, report_dir / "junit.xml"))
    except Exception:
        log.exception("could not write junit.xml")
    try:
        for path in write_csv_reports(store, run_id, report_dir):
            written[path.stem] = str(path)
    except Exception:
        log.exception("could not write the CSV reports")
    try:
        timeline = analyze_timeline(store, run_id, auto_window(float(summary.get("duration_s") or 0)))
        summary["timeline"] = {k: timeline.get(k) for k in ("window_s", "degradation", "capacity")}
        written["html"] = str(
            write_html(store, run_id, report_dir / "report.html", summary=summary, timeline=timeline)
        )
    except Exception:
        log.exception("could not write report.html")
    return written

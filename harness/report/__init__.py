"""Reports recomputed from the database: the run summary, per-second series, and the files written
at the end of every run. Everything here reads stored windows, never process memory."""

from harness.report.series import per_second
from harness.report.summary import summarize, write_summary

__all__ = ["per_second", "summarize", "write_summary"]

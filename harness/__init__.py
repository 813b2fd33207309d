"""harness: a multi-process simulation harness with a live control panel."""

__version__ = "0.1.0"

"""Simulator families. Each subpackage registers under the entry-point group `harness.simulators`."""

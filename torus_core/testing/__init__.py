"""Conformance suites shipped for plugins: contract test classes and state machines."""

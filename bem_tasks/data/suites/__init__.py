"""Deterministic synthetic suites, one module per mission (A..E)."""

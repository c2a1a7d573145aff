"""Fault-injection tests: stages interrupted by signals under DVC (see conftest.py)."""

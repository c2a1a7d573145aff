"""Thin DVC stage entry points: each reads its params, calls `llm`, writes its outs and metrics.

Run from the repository root as `python -m stages.<name>` (that is what dvc.yaml does).
"""

"""Test harness shared by tests/ and bench/: external tools, the daemon as a subprocess, a frozen snapshot.

Not shipped: the wheel carries only the fakes (:mod:`carbond.testing`). Importable as ``tests.harness`` from the
repository root (pytest's ``pythonpath``; ``python -m bench`` runs there).
"""

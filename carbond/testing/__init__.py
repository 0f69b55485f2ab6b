"""Shipped, typed fakes for tests, demos and benchmarks: powercap, /proc and cgroup trees, a whole fixture host,
fake ``pynvml``/``amdsmi`` modules, a fake ``powermetrics``, loopback Kubernetes and intensity-provider servers and a
manual clock.

Only fakes live here; none imports pytest. The test harness (external tools, the daemon as a subprocess, the frozen
snapshot of the golden tests) lives in ``tests/harness``.
"""
